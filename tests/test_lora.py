"""LoRA policies (``learner.lora``, peft): the config, the merge by hand, only the adapters train and have
optimizer state, the update against a direct peft + torch computation (ZeRO 0/1/2/3, shared-prefix packing),
the KL reference (the base), exact resume from a checkpoint, its layout and its refusals, and ``hicra-sft``.

The tiny Llama (``learner_fixtures.build_tiny_llama``): hidden 64, 4 heads of 16, 2 KV heads, MLP 128, 2 layers,
vocabulary 49152, tied embeddings.  Adapters of rank 4 on q_proj (64 -> 64) and v_proj (64 -> 32 = 2 KV heads
x 16): per layer A_q 4x64 + B_q 64x4 + A_v 4x64 + B_v 32x4 = 256 + 256 + 256 + 128 = 896, so 1792 trainable
parameters in 2 layers, and AdamW's two moments 2 x 1792 = 3584 numbers (14336 bytes in fp32)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from learner_fixtures import (
    build_tiny_llama,
    direct_log_probs,
    float32_model,
    free_port,
    random_rows,
    remove_shm_buffers,
    to_layout,
    ws2_batch,
)

from hicra_rl.algo.losses import PolicyLossConfig, ppo_clip_loss
from hicra_rl.batch import response_layout_mask
from hicra_rl.config import ConfigError, LearnerConfig, LearnerLoraConfig, check_learner_config
from hicra_rl.learner import checkpoint as ckpt
from hicra_rl.learner.engine import PolicyBatch, PolicyLearner
from hicra_rl.learner.lora import (
    PEFT_PREFIX,
    LoraLayerInfo,
    add_lora,
    merged_state_dict,
    peft_config,
    same_fingerprint,
    weights_fingerprint,
)
from hicra_rl.learner.sequences import build_sequences

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

LORA = LearnerLoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])   # scaling alpha / r = 2
ADAPTER_NUMEL = 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)   # 1792, see the module docstring


@pytest.fixture(scope="module")
def port():
    return free_port()


def small_llama():
    """An in-memory Llama of the tiny shapes with a small vocabulary (no DeepSpeed, no file)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def module_params(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()}


# ---------------------------------------------------------------------------- config, pure functions
@pytest.mark.parametrize("lora, key", [
    (LearnerLoraConfig(rank=-1), "learner.lora.rank"),
    (LearnerLoraConfig(rank=4, alpha=0.0), "learner.lora.alpha"),
    (LearnerLoraConfig(rank=4, dropout=1.0), "learner.lora.dropout"),
    (LearnerLoraConfig(rank=4, target_modules=[]), "learner.lora.target_modules"),
    (LearnerLoraConfig(rank=4, target_modules=["all-linear", "q_proj"]), "learner.lora.target_modules"),
    (LearnerLoraConfig(rank=4, target_modules=["q_proj", "q_proj"]), "learner.lora.target_modules"),
])
def test_bad_lora_settings_fail_fast_naming_the_key(lora, key):
    with pytest.raises(ConfigError, match=f"config error at '{key}'"):
        check_learner_config(LearnerConfig(lora=lora))
    with pytest.raises(ValueError, match=key):  # before the learner loads anything
        PolicyLearner(LearnerConfig(lora=lora), model_path="no-such-model")


def test_rank_zero_is_off_and_other_fields_are_then_not_checked():
    check_learner_config(LearnerConfig(lora=LearnerLoraConfig(rank=0, alpha=-1.0, target_modules=[])))
    assert LearnerConfig().lora.rank == 0 and LearnerConfig().lora.target_modules == ["all-linear"]


def test_peft_config_mapping():
    c = peft_config(LORA)
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias) == (4, 8.0, 0.0, "none")
    assert set(c.target_modules) == {"q_proj", "v_proj"}
    assert peft_config(LearnerLoraConfig(rank=2)).target_modules == "all-linear"   # peft's special string


def test_merged_weights_by_hand():
    """W + (alpha / r) B A: W [[1,2,3],[4,5,6]], A [[1,0,-1]], B [[2],[0.5]], alpha 3, r 1:
    B A = [[2,0,-2],[0.5,0,-0.5]], x3 = [[6,0,-6],[1.5,0,-1.5]], merged [[7,2,-3],[5.5,5,4.5]]."""
    w = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    a, b = torch.tensor([[1.0, 0, -1]]), torch.tensor([[2.0], [0.5]])
    norm = torch.tensor([0.5, 0.25])
    named = {f"{PEFT_PREFIX}model.layers.0.mlp.up_proj.base_layer.weight": w,
             f"{PEFT_PREFIX}model.layers.0.mlp.up_proj.lora_A.default.weight": a,
             f"{PEFT_PREFIX}model.layers.0.mlp.up_proj.lora_B.default.weight": b,
             f"{PEFT_PREFIX}model.norm.weight": norm}
    merged = merged_state_dict(named, {"model.layers.0.mlp.up_proj": LoraLayerInfo(scaling=3.0)})
    assert list(merged) == ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    assert merged["model.layers.0.mlp.up_proj.weight"].tolist() == [[7.0, 2.0, -3.0], [5.5, 5.0, 4.5]]
    assert merged["model.norm.weight"] is norm
    # a [in x out] base weight (GPT-2's Conv1D, fan_in_fan_out): the delta is added transposed
    named[f"{PEFT_PREFIX}model.layers.0.mlp.up_proj.base_layer.weight"] = w.T.contiguous()
    merged = merged_state_dict(named, {"model.layers.0.mlp.up_proj": LoraLayerInfo(3.0, fan_in_fan_out=True)})
    assert merged["model.layers.0.mlp.up_proj.weight"].tolist() == [[7.0, 5.5], [2.0, 5.0], [-3.0, 4.5]]
    # bf16 weights: the sum in fp32, then cast once
    named[f"{PEFT_PREFIX}model.layers.0.mlp.up_proj.base_layer.weight"] = w.to(torch.bfloat16)
    merged = merged_state_dict(named, {"model.layers.0.mlp.up_proj": LoraLayerInfo(3.0)})
    assert merged["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert merged["model.layers.0.mlp.up_proj.weight"].float().tolist() == [[7.0, 2.0, -3.0], [5.5, 5.0, 4.5]]


def test_all_linear_adapts_every_decoder_linear_but_not_the_head():
    """rank 2 on all-linear: q 2(64+64) + k 2(64+32) + v 2(64+32) + o 2(64+64) + gate 2(64+128) + up 2(64+128)
    + down 2(128+64) = 256 + 192 + 192 + 256 + 384 + 384 + 384 = 2048 per layer, 4096 in 2 layers (an adapter on
    the tied head would add 2 (64 + 256) more)."""
    model, layers = add_lora(small_llama(), LearnerLoraConfig(rank=2, alpha=4.0))
    assert len(layers) == 14 and not any("lm_head" in n for n in layers)
    assert all(info.scaling == 2.0 for info in layers.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4096
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_all_linear_on_a_reward_model_leaves_its_head_to_train_in_full():
    """SEQ_CLS (hicra-rm train): the same 14 decoder layers get adapters (4096 parameters, as above); the scalar
    head [1 x 64] gets none and trains in full as peft's trainable copy, the original frozen beside it."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    classifier = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=0))
    model, layers = add_lora(classifier, LearnerLoraConfig(rank=2, alpha=4.0), task_type="SEQ_CLS")
    assert len(layers) == 14 and not any("score" in n for n in layers)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 4096 + 64
    assert [n for n in trainable if "lora_" not in n] == ["base_model.model.score.modules_to_save.default.weight"]
    assert not dict(model.named_parameters())["base_model.model.score.original_module.weight"].requires_grad


@pytest.mark.parametrize("targets, why", [(["no_such_proj"], "learner.lora.target_modules"),
                                          (["embed_tokens"], "only linear layers")])
def test_targets_that_are_not_linear_layers_of_the_model_are_refused(targets, why):
    with pytest.raises(ValueError, match=why):
        add_lora(small_llama(), LearnerLoraConfig(rank=2, target_modules=targets))


def test_fingerprint_tolerates_summation_order_not_other_weights():
    g = torch.Generator().manual_seed(0)
    ts = [("a", torch.randn(1000, generator=g)), ("b", torch.randn(30, 7, generator=g))]
    fp = weights_fingerprint(ts)
    assert fp["numel"] == 1210
    assert fp["l1"] == pytest.approx(sum(float(t.abs().double().sum()) for _, t in ts), rel=1e-12)
    assert same_fingerprint(fp, weights_fingerprint(list(reversed(ts))))
    changed = [ts[0], ("b", ts[1][1] * (1 + 1e-6))]
    assert not same_fingerprint(fp, weights_fingerprint(changed))
    assert not same_fingerprint(fp, weights_fingerprint(ts[:1]))


# ---------------------------------------------------------------------------- the learner
def batch_of(seed: int):
    prompts, responses = random_rows(seed, [3, 5, 2, 4], [4, 2, 6, 3])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    adv = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed + 1))
    return ids, am, rm, adv


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_only_the_adapters_change_and_only_they_have_optimizer_state(tiny_llama, port, stage):
    learner = PolicyLearner(LearnerConfig(zero_stage=stage, lr=1e-2, micro_batch_size=2, lora=LORA),
                            model_path=tiny_llama, master_port=port)
    assert learner.lora and learner.trainable_params == ADAPTER_NUMEL
    assert sorted(learner.lora_layers) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    before = learner.adapter_state_dict()
    base_before = {k: v for k, v in learner.full_state_dict().items()}
    if stage != 3:  # ZeRO-3 partitions the module's parameters (empty here); the gathered views are above
        frozen_before = {n: p for n, p in module_params(learner).items() if "lora_" not in n}
    assert all(not v.any() for k, v in before.items() if "lora_B" in k)   # B starts at 0: the base policy

    for seed in (1, 2):  # step 1 moves only B (A's gradient is B^T ... = 0); step 2 moves A too
        ids, am, rm, adv = batch_of(seed)
        learner.update(PolicyBatch(ids, am, rm, None, adv))

    assert learner.optimizer_state_numel() == 2 * ADAPTER_NUMEL == 3584
    assert learner.optimizer_state_bytes() == 3584 * 4
    after = learner.adapter_state_dict()
    assert len(after) == 8 and all(not torch.equal(before[k], after[k]) for k in before)
    if stage != 3:
        for name, value in module_params(learner).items():
            if "lora_" not in name:
                assert torch.equal(value, frozen_before[name]), name   # bitwise
    merged = learner.full_state_dict()
    reference = float32_model(tiny_llama).state_dict()
    assert set(merged) == set(reference) == set(base_before)
    for name, value in merged.items():
        module = name.removesuffix(".weight")
        if module in learner.lora_layers:
            a = after[f"{PEFT_PREFIX}{module}.lora_A.default.weight"]
            b = after[f"{PEFT_PREFIX}{module}.lora_B.default.weight"]
            torch.testing.assert_close(value, reference[name] + (8.0 / 4) * b @ a, atol=1e-6, rtol=0, msg=name)
            assert (value - reference[name]).abs().max() > 1e-4, name
        else:
            assert torch.equal(value, reference[name]), name   # untouched base tensors, lm_head included


@pytest.mark.parametrize("stage, shared_prefix, attention, checkpointing", [
    (0, False, "grouped", False), (1, False, "grouped", False), (2, False, "grouped", False),
    (3, False, "grouped", False), (0, True, "grouped", False), (2, True, "grouped", False),
    (0, True, "masked", False), (2, False, "grouped", True)])
def test_lora_update_equals_a_direct_peft_computation(tiny_llama, port, stage, shared_prefix, attention,
                                                      checkpointing):
    """Two on-policy updates (6 responses in 3 prompt groups, micro-batches of 3): the learner's losses,
    gradient norms and adapters after AdamW (eps = 1: the step ~ lr * gradient) equal plain peft + torch on the
    full batch, for ZeRO 0-3, with shared-prefix packing (both attentions: the same loss and gradients as
    separate rows) and with gradient checkpointing."""
    lr, eps, clip = 0.1, 1.0, 1.0
    learner = PolicyLearner(LearnerConfig(zero_stage=stage, lr=lr, eps=eps, max_grad_norm=clip, micro_batch_size=3,
                                          shared_prefix=shared_prefix, shared_prefix_attention=attention, lora=LORA),
                            model_path=tiny_llama, master_port=port, gradient_checkpointing=checkpointing)
    initial = learner.adapter_state_dict()
    model, _ = add_lora(float32_model(tiny_llama), LORA)
    model.load_state_dict(initial, strict=False)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 8
    opt = torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=0.0)

    width = 7
    for step in range(2):
        prompts, responses = random_rows(21 + step, [4, 2, 6], [5, 3, 7, 2, 4, 6])
        group_prompts = [prompts[0], prompts[0], prompts[1], prompts[1], prompts[1], prompts[2]]
        ids, am, rm = build_sequences(group_prompts, responses, pad_id=0)
        adv = torch.randn(6, width, generator=torch.Generator().manual_seed(40 + step))
        stats = learner.update(PolicyBatch(ids, am, rm, None, adv))

        lps, _ = direct_log_probs(model, group_prompts, responses)
        logp = to_layout(lps, width)
        mask = response_layout_mask(torch.tensor([len(r) for r in responses]), width)
        loss, st = ppo_clip_loss(logp, logp.detach(), adv, mask, PolicyLossConfig())
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        opt.step()
        opt.zero_grad()
        assert stats["actor/pg_loss"] == pytest.approx(st["actor/pg_loss"], abs=1e-6)
        assert stats["actor/grad_norm"] == pytest.approx(norm, rel=1e-4)
        assert stats["actor/n_tokens"] == 27
    assert norm > 0

    trained = learner.adapter_state_dict()
    expected = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trained) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, atol=1e-6, rtol=0, msg=name)
        assert not torch.equal(value, initial[name]), name


def test_kl_reference_is_the_base_model_with_no_second_copy(tiny_llama, port):
    learner = PolicyLearner(LearnerConfig(zero_stage=0, lr=1e-2, micro_batch_size=2, lora=LORA),
                            model_path=tiny_llama, master_port=port, loss=PolicyLossConfig(kl_coef=0.1))
    assert learner.ref_engine is None
    ids, am, rm, adv = batch_of(3)
    for _ in range(2):
        lp, _ = learner.compute_log_probs(ids, am, rm, width=6)
        stats = learner.update(PolicyBatch(ids, am, rm, lp, adv))
    assert stats["actor/kl_ref"] > 0   # the policy moved away from its reference
    prompts, responses = random_rows(3, [3, 5, 2, 4], [4, 2, 6, 3])
    with torch.no_grad():
        base, _ = direct_log_probs(float32_model(tiny_llama), prompts, responses)
    ref = learner.compute_ref_log_probs(ids, am, rm, width=6)
    torch.testing.assert_close(ref, to_layout(base, 6), atol=1e-5, rtol=0)
    policy, _ = learner.compute_log_probs(ids, am, rm, width=6)
    assert (policy - ref).abs().max() > 1e-4
    assert learner.engine.training   # the reference pass leaves the engine as it found it


def lora_ws2_rank_main(rank: int, world_size: int, port: int, model_dir: str, out_dir: str, stage: int) -> None:
    """One rank of the two-rank LoRA run: two on-policy updates on its half of ``ws2_batch``, then the adapters,
    the merged weights, its optimizer-state count and a checkpoint (all collective)."""
    torch.set_num_threads(1)
    learner = PolicyLearner(LearnerConfig(zero_stage=stage, lr=0.1, eps=1.0, micro_batch_size=1, lora=LORA),
                            model_path=model_dir, rank=rank, world_size=world_size, master_port=port, timeout_s=120)
    ids, am, rm, advantages, _ = ws2_batch()
    rows = slice(2 * rank, 2 * rank + 2)
    for sign in (1.0, -0.5):
        learner.update(PolicyBatch(ids[rows], am[rows], rm[rows], None, sign * advantages[rows]))
    adapters, merged = learner.adapter_state_dict(), learner.full_state_dict()
    ckpt.save_checkpoint(learner, os.path.join(out_dir, "run"), step=2)
    torch.save({"adapters": adapters, "merged": merged, "optimizer_numel": learner.optimizer_state_numel()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_partition_the_adapters_state_and_train_like_one(tiny_llama, port, tmp_path, stage):
    """ZeRO-2/3 over 2 ranks: each rank holds half of the adapters' AdamW moments (1792 of 3584: every adapter
    tensor has an even size), the adapters after two updates equal one rank on the whole batch, and the
    checkpoint's merged model and adapters are whole."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    try:
        mp.spawn(lora_ws2_rank_main, args=(2, free_port(), tiny_llama, str(tmp_path), stage), nprocs=2, join=True)
    finally:
        remove_shm_buffers()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["optimizer_numel"] == r1["optimizer_numel"] == ADAPTER_NUMEL == 3584 // 2
    assert r1["adapters"] == {} and r1["merged"] == {}   # rank 0 gathers

    single = PolicyLearner(LearnerConfig(zero_stage=stage, lr=0.1, eps=1.0, micro_batch_size=1, lora=LORA),
                           model_path=tiny_llama, master_port=port)
    ids, am, rm, advantages, _ = ws2_batch()
    for sign in (1.0, -0.5):
        single.update(PolicyBatch(ids, am, rm, None, sign * advantages))
    expected = single.adapter_state_dict()
    assert set(r0["adapters"]) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(r0["adapters"][name], value, atol=1e-6, rtol=0, msg=name)
    merged = single.full_state_dict()
    for name, value in merged.items():
        torch.testing.assert_close(r0["merged"][name], value, atol=1e-6, rtol=0, msg=name)
    saved = tmp_path / "run" / "step-2"
    assert json.loads((saved / ckpt.MANIFEST).read_text())["world_size"] == 2
    hf = load_file(saved / "hf" / "model.safetensors")
    assert all(torch.equal(hf[k], r0["merged"][k]) for k in hf)
    adapter = load_file(saved / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 8 and sum(t.numel() for t in adapter.values()) == ADAPTER_NUMEL


# ---------------------------------------------------------------------------- checkpoints
def lora_config(stage: int, lora: LearnerLoraConfig = LORA) -> LearnerConfig:
    return LearnerConfig(zero_stage=stage, lr=1e-2, weight_decay=0.1, micro_batch_size=2, scheduler="cosine",
                         warmup_steps=1, min_lr_ratio=0.1, lora=lora)


def train(learner, seeds):
    """RL-style steps: old log-probs from the current policy (shifted: the ratios are not 1), then an update."""
    out = []
    for seed in seeds:
        ids, am, rm, adv = batch_of(seed)
        lp, _ = learner.compute_log_probs(ids, am, rm, width=6)
        out.append(learner.update(PolicyBatch(ids, am, rm, lp - 0.1 * adv.sign(), adv)))
    return out


def optimizer_tensors(learner) -> list[torch.Tensor]:
    opt = learner._base_optimizer()
    return [t.detach().clone() for group in opt.param_groups for p in group["params"]
            for t in opt.state[p].values() if torch.is_tensor(t)]


@pytest.mark.parametrize("stage", [0, 2])
def test_checkpoint_resume_is_exact_and_holds_adapters_and_a_merged_model(tiny_llama, port, tmp_path, stage):
    from peft import PeftModel
    from safetensors.torch import load_file

    straight = PolicyLearner(lora_config(stage), model_path=tiny_llama, total_steps=3, master_port=port)
    straight_stats = train(straight, (1, 2, 3))

    first = PolicyLearner(lora_config(stage), model_path=tiny_llama, total_steps=3, master_port=port)
    train(first, (1, 2))
    saved_adapters, saved_opt, saved_merged = first.adapter_state_dict(), optimizer_tensors(first), first.full_state_dict()
    path = ckpt.save_checkpoint(first, tmp_path, step=2, extra={"step": 2})

    # the layout: adapters (peft's format), the merged HF model, DeepSpeed's state of the adapters only
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert {k: manifest["lora"][k] for k in ("rank", "alpha", "dropout", "target_modules", "adapted_layers",
                                             "trainable_params")} == {
        "rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "adapted_layers": 4,
        "trainable_params": ADAPTER_NUMEL}
    adapter_cfg = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"], sorted(adapter_cfg["target_modules"])) == (4, 8.0, ["q_proj", "v_proj"])
    assert len(load_file(path / "adapter" / "adapter_model.safetensors")) == 8
    states = sorted((path / "deepspeed" / "state").glob("*model_states.pt"))
    module = ckpt.safe_torch_load(states[0])["module"]
    assert sorted(module) == sorted(saved_adapters)   # no base weight, not even the tied lm_head
    hf = float32_model(path / "hf").state_dict()
    assert set(hf) == set(saved_merged)
    for name, value in saved_merged.items():
        assert torch.equal(hf[name], value), name
    peft_merged = PeftModel.from_pretrained(float32_model(tiny_llama), str(path / "adapter")).merge_and_unload().state_dict()
    for name, value in saved_merged.items():
        torch.testing.assert_close(peft_merged[name], value, atol=1e-6, rtol=0, msg=name)

    resumed = PolicyLearner(lora_config(stage), model_path=tiny_llama, total_steps=3, master_port=port)
    assert ckpt.load_checkpoint(resumed, path) == {"step": 2}
    got = resumed.adapter_state_dict()
    assert set(got) == set(saved_adapters) and all(torch.equal(got[k], saved_adapters[k]) for k in got)
    got_opt = optimizer_tensors(resumed)
    assert len(got_opt) == len(saved_opt) > 0
    assert all(torch.equal(a, b) for a, b in zip(got_opt, saved_opt))
    assert resumed.optimizer_state_numel() == 2 * ADAPTER_NUMEL
    merged = resumed.full_state_dict()
    assert all(torch.equal(merged[k], saved_merged[k]) for k in saved_merged)

    (resumed_stats,) = train(resumed, (3,))
    for key in ("actor/loss", "actor/grad_norm", "actor/lr"):
        assert resumed_stats[key] == straight_stats[2][key], key
    final, expected = resumed.adapter_state_dict(), straight.adapter_state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_a_lora_checkpoint_resumes_only_into_the_same_adapters_on_the_same_base(tiny_llama, port, tmp_path):
    learner = PolicyLearner(lora_config(0), model_path=tiny_llama, total_steps=3, master_port=port)
    train(learner, (1,))
    path = ckpt.save_checkpoint(learner, tmp_path / "run", step=1)

    other_rank = PolicyLearner(lora_config(0, LearnerLoraConfig(rank=8, alpha=8.0, target_modules=["q_proj", "v_proj"])),
                               model_path=tiny_llama, total_steps=3, master_port=port)
    with pytest.raises(ValueError, match=r"checkpoint.json: field 'lora.rank' is 4, this learner has learner.lora.rank=8"):
        ckpt.load_checkpoint(other_rank, path)
    full = PolicyLearner(lora_config(0, LearnerLoraConfig()), model_path=tiny_llama, total_steps=3, master_port=port)
    with pytest.raises(ValueError, match=r"holds LoRA adapters .*this learner uses full fine-tuning"):
        ckpt.load_checkpoint(full, path)
    other_base = build_tiny_llama(str(tmp_path / "other-base"), seed=1)
    moved = PolicyLearner(lora_config(0), model_path=other_base, total_steps=3, master_port=port)
    with pytest.raises(ValueError, match="base weights at .* are not those the adapters were trained on"):
        ckpt.load_checkpoint(moved, path)


# ---------------------------------------------------------------------------- hicra-sft
def test_sft_with_lora_writes_the_merged_model_and_the_adapters(tiny_llama, port, tmp_path, monkeypatch):
    """hicra-sft's learner config carries its ``lora`` group; a LoRA cold start writes the merged model (loads as
    a plain HF model) and the adapters."""
    from hicra_rl import sft

    cfg = sft.SFTConfig(lora=LearnerLoraConfig(rank=2, alpha=2.0, target_modules=["q_proj"]), zero_stage=0,
                        micro_batch_size=2)
    sft.validate_sft(cfg)
    lcfg = sft.learner_config(cfg)
    assert lcfg.lora.rank == 2 and lcfg.lora.target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match="config error at 'lora.alpha'"):
        sft.validate_sft(sft.SFTConfig(lora=LearnerLoraConfig(rank=2, alpha=-1.0)))

    learner = PolicyLearner(lcfg, model_path=tiny_llama, total_steps=cfg.max_steps, master_port=port)
    ids, am, rm, _ = batch_of(5)
    before = learner.full_state_dict()
    stats = sft.nll_step(learner, ids, am, rm)
    stats = sft.nll_step(learner, ids, am, rm)
    assert math.isfinite(stats["sft/nll"]) and stats["sft/tokens"] == 15
    out = tmp_path / "cold-start"
    ckpt.save_hf_model(learner, out)
    ckpt.save_adapter(learner, out / "adapter")
    merged = float32_model(out).state_dict()
    changed = {k for k in before if not torch.equal(merged[k], before[k])}
    assert changed == {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")


# ---------------------------------------------------------------------------- the command line
def test_cfg_job_shows_learner_lora_and_bad_values_are_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from omegaconf import OmegaConf

    bin_dir = Path(sys.executable).parent

    def run(*args):
        return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, check=False)

    out = run("hicra-train", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert OmegaConf.to_container(OmegaConf.create(out.stdout).learner.lora) == {
        "rank": 0, "alpha": 16.0, "dropout": 0.0, "target_modules": ["all-linear"]}
    out = run("hicra-train", "learner.lora.rank=8", "learner.lora.target_modules=[q_proj,v_proj]", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    lora = OmegaConf.create(out.stdout).learner.lora
    assert lora.rank == 8 and list(lora.target_modules) == ["q_proj", "v_proj"]
    out = run("hicra-train", "learner.lora.rank=8", "learner.lora.dropout=1.5", f"trainer.run_dir={tmp_path / 'run'}")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "hicra-train: config error at 'learner.lora.dropout': must be in [0, 1), got 1.5"]
    out = run("hicra-sft", "lora.rank=4", "lora.alpha=0", f"out_dir={tmp_path / 'sft'}")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "hicra-sft: config error at 'lora.alpha': must be > 0, got 0.0"]
