"""The DeepSpeed policy learner on CPU (gloo): log-probs, the accumulated loss and gradient against a
direct full-batch computation, ZeRO 0/2/3, the reference model, weight export, and two ranks."""
from __future__ import annotations

import math

import pytest
import torch
from learner_fixtures import (
    direct_log_probs,
    float32_model,
    free_port,
    random_rows,
    remove_shm_buffers,
    to_layout,
    ws2_batch,
    ws2_learner_config,
    ws2_rank_main,
)

from hicra_rl.algo.losses import PolicyLossConfig, ppo_clip_loss
from hicra_rl.batch import response_layout_mask
from hicra_rl.config import LearnerConfig
from hicra_rl.learner.engine import PolicyBatch, PolicyLearner, _lr_lambda
from hicra_rl.learner.sequences import build_sequences, gather_response, response_spans

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def port():
    return free_port()


# ---------------------------------------------------------------------------- pure layout / config
def test_build_sequences_and_response_layout():
    ids, am, rm = build_sequences([[5, 6], [7]], [[8, 9, 10], [11, 12]], pad_id=0)
    assert ids.tolist() == [[5, 6, 8, 9, 10], [7, 11, 12, 0, 0]]
    assert am.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert rm.tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    starts, lengths = response_spans(rm, am)
    assert starts.tolist() == [2, 1] and lengths.tolist() == [3, 2]
    # values per position (here: the position itself) -> column j holds position start + j
    per_position = torch.arange(5.0).expand(2, 5)
    assert gather_response(per_position, starts, lengths, width=4).tolist() == [[2, 3, 4, 0], [1, 2, 0, 0]]
    shifted = torch.tensor([[1.0, 2, 3, 4], [1, 2, 3, 4]])  # with offset=1: values[:, c] is position c + 1
    assert gather_response(shifted, starts, lengths, width=3, offset=1).tolist() == [[2, 3, 4], [1, 2, 0]]
    assert response_layout_mask(lengths, 4).tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize("bad_row, why", [
    ([0, 1, 0, 1, 0], "two spans"),
    ([1, 1, 0, 0, 0], "no prompt token"),
    ([0, 0, 0, 0, 0], "empty"),
])
def test_response_spans_rejects_bad_masks(bad_row, why):
    rm = torch.tensor([[0, 0, 1, 1, 0], bad_row])
    with pytest.raises(ValueError, match="response_mask row 1"):
        response_spans(rm)


def test_response_outside_attention_mask_is_rejected():
    with pytest.raises(ValueError, match="row 0"):
        response_spans(torch.tensor([[0, 1, 1]]), torch.tensor([[1, 1, 0]]))


def test_lr_schedule_warmup_then_constant_or_cosine():
    const = _lr_lambda("constant", warmup=3, total=None, min_ratio=0.0)
    assert [const(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = _lr_lambda("cosine", warmup=2, total=6, min_ratio=0.1)
    # after warmup: progress (s - 2) / 4; factor 0.1 + 0.9 * (1 + cos(pi p)) / 2
    assert cos(0) == pytest.approx(1 / 3) and cos(1) == pytest.approx(2 / 3)
    assert cos(2) == pytest.approx(1.0)
    assert cos(4) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos(6) == pytest.approx(0.1) and cos(9) == pytest.approx(0.1)


def test_config_rejects_bad_settings():
    """The learner checks a config built in code before it loads anything (the same checks as the schema)."""
    with pytest.raises(ValueError, match="learner.zero_stage"):
        PolicyLearner(LearnerConfig(zero_stage=4), model_path="x")
    with pytest.raises(ValueError, match="learner.betas"):
        PolicyLearner(LearnerConfig(betas=[0.9, 1.5]), model_path="x")
    with pytest.raises(ValueError, match="cosine' needs total_steps"):
        PolicyLearner(LearnerConfig(scheduler="cosine"), model_path="x")
    with pytest.raises(ValueError, match="learner dtype"):
        PolicyLearner(LearnerConfig(), model_path="x", dtype="float16")


# ---------------------------------------------------------------------------- DeepSpeed, world size 1
def test_log_probs_and_entropy_match_plain_hf(tiny_llama, port):
    learner = PolicyLearner(LearnerConfig(zero_stage=2, micro_batch_size=3, logprob_chunk_size=5),
                            model_path=tiny_llama, logits_temperature=0.7, master_port=port)
    prompts, responses = random_rows(0, [4, 1, 6, 3, 2], [3, 5, 1, 4, 2])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    lp, ent = learner.compute_log_probs(ids, am, rm, width=6)
    assert lp.shape == ent.shape == (5, 6)
    with torch.no_grad():
        ref_lp, ref_ent = direct_log_probs(float32_model(tiny_llama), prompts, responses, temperature=0.7)
    torch.testing.assert_close(lp, to_layout(ref_lp, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, to_layout(ref_ent, 6), atol=1e-4, rtol=0)
    # sanity of the reference itself: a near-uniform tiny model over 49152 tokens
    assert abs(float(ref_ent[0][0]) - math.log(49152)) < 0.5


@pytest.mark.parametrize("stage, agg_mode, entropy_coef, checkpointing", [
    (0, "token-mean", 0.0, False),
    (2, "seq-mean-token-mean", 0.01, False),
    (3, "token-mean", 0.0, True),
])
def test_update_equals_full_batch_reference(tiny_llama, port, stage, agg_mode, entropy_coef, checkpointing):
    """4 sequences, 2 mini-batches (= 2 optimizer steps) of 2 micro-batches each: the learner's
    accumulated loss, gradient norm and AdamW update equal a direct full-mini-batch computation.

    Adam's eps = 1 makes its update ~ lr * gradient (not ~ lr * sign(gradient)), so the weights check
    the gradient itself, and fp32 summation-order noise in near-zero gradients stays below 1e-6."""
    loss_cfg = PolicyLossConfig(agg_mode=agg_mode, entropy_coef=entropy_coef)
    lr, eps, wd, clip = 0.1, 1.0, 0.1, 1.0
    learner = PolicyLearner(LearnerConfig(zero_stage=stage, lr=lr, eps=eps, weight_decay=wd, max_grad_norm=clip,
                                          micro_batch_size=1, mini_batches_per_step=2),
                            model_path=tiny_llama, gradient_checkpointing=checkpointing, loss=loss_cfg,
                            master_port=port)
    prompts, responses = random_rows(1, [3, 7, 2, 5], [6, 2, 9, 4])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    width = 9
    mask = response_layout_mask(torch.tensor([len(r) for r in responses]), width)
    lp, _ = learner.compute_log_probs(ids, am, rm, width=width)
    g = torch.Generator().manual_seed(2)
    old = (lp + 0.3 * torch.randn(4, width, generator=g)) * mask  # ratios far from 1: both clips fire
    adv = torch.randn(4, width, generator=g) * mask
    initial = learner.full_state_dict()

    stats = learner.update(PolicyBatch(ids, am, rm, old, adv))

    model = float32_model(tiny_llama)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr, eps=eps)
    ref_steps = []
    for rows in (slice(0, 2), slice(2, 4)):
        lps, ents = direct_log_probs(model, prompts[rows], responses[rows])
        loss, st = ppo_clip_loss(to_layout(lps, width), old[rows], adv[rows], mask[rows], loss_cfg,
                                 entropy=to_layout(ents, width))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad()
        ref_steps.append((float(loss), st["actor/pg_loss"], float(norm), st["actor/clipfrac"]))

    assert len(learner.step_stats) == 2
    for got, (loss, pg, norm, clipfrac) in zip(learner.step_stats, ref_steps):
        assert got["actor/loss"] == pytest.approx(loss, abs=1e-6)
        assert got["actor/pg_loss"] == pytest.approx(pg, abs=1e-6)
        assert got["actor/grad_norm"] == pytest.approx(norm, rel=1e-4)
        assert got["actor/clipfrac"] == pytest.approx(clipfrac, abs=1e-6)
    assert ref_steps[0][3] > 0 and ref_steps[0][2] > clip  # the clipping paths were exercised
    assert math.isfinite(stats["actor/loss"]) and stats["actor/num_steps"] == 2
    assert stats["actor/pg_loss"] == pytest.approx((ref_steps[0][1] + ref_steps[1][1]) / 2, abs=1e-6)

    trained = learner.full_state_dict()
    expected = model.state_dict()
    assert set(trained) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, atol=1e-6, rtol=0, msg=name)
    name = "model.layers.0.mlp.up_proj.weight"
    assert (trained[name] - initial[name]).abs().max() > 1e-4


def test_zero_advantages_give_zero_loss_and_no_update(tiny_llama, port):
    learner = PolicyLearner(LearnerConfig(zero_stage=2, lr=1e-2, micro_batch_size=2), model_path=tiny_llama,
                            master_port=port)
    prompts, responses = random_rows(3, [2, 4, 3], [5, 3, 4])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    lp, _ = learner.compute_log_probs(ids, am, rm)
    before = learner.full_state_dict()
    stats = learner.update({"input_ids": ids, "attention_mask": am, "response_mask": rm,
                            "old_log_probs": lp, "advantages": torch.zeros_like(lp)})
    assert stats["actor/pg_loss"] == 0.0 and stats["actor/grad_norm"] == 0.0
    assert stats["actor/n_tokens"] == 12
    after = learner.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("stage, expected_all_reduces", [(0, 0), (1, 2)])
def test_one_rank_without_zero_skips_the_identity_all_reduce(tiny_llama, port, stage, expected_all_reduces):
    """One rank at ZeRO-0: DeepSpeed's gradient all-reduce (a flatten, a no-op reduce and a copy back) is
    skipped, and the optimizer still steps; ZeRO-1 needs its reduce to fill its partitions and keeps it (one
    call per micro-batch's backward: 2 here);
    ``test_update_equals_full_batch_reference`` checks the stage-0 update's values."""
    learner = PolicyLearner(LearnerConfig(zero_stage=stage, lr=1e-2, micro_batch_size=2), model_path=tiny_llama,
                            master_port=port)
    calls = []
    reduce = learner.engine.allreduce_gradients
    learner.engine.allreduce_gradients = lambda *a, **k: (calls.append(1), reduce(*a, **k))[1]
    prompts, responses = random_rows(4, [2, 4, 3, 5], [5, 3, 4, 2])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    lp, _ = learner.compute_log_probs(ids, am, rm)
    before = learner.full_state_dict()["model.layers.0.mlp.up_proj.weight"]
    learner.update({"input_ids": ids, "attention_mask": am, "response_mask": rm, "old_log_probs": lp,
                    "advantages": torch.randn(lp.shape, generator=torch.Generator().manual_seed(0))})
    assert len(calls) == expected_all_reduces
    assert not torch.equal(learner.full_state_dict()["model.layers.0.mlp.up_proj.weight"], before)


def test_update_reports_its_share_of_the_cores(tiny_llama, port, monkeypatch):
    """perf/update_cpu_util = the process's CPU seconds / (wall seconds x torch threads): with clocks that
    advance 4 s of wall time and 6 s of CPU time on 2 threads it is 6 / (4 x 2) = 0.75; on real clocks,
    one thread, it lies in (0, 1] plus what the process's other threads take."""
    import types

    from hicra_rl.learner import engine

    learner = PolicyLearner(LearnerConfig(zero_stage=0, lr=1e-2, micro_batch_size=2), model_path=tiny_llama,
                            master_port=port)
    prompts, responses = random_rows(2, [2, 4], [5, 3])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    batch = {"input_ids": ids, "attention_mask": am, "response_mask": rm, "old_log_probs": None,
             "advantages": torch.ones(2, 5)}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        real = learner.update(batch)
        torch.set_num_threads(2)
        clocks = types.SimpleNamespace(perf_counter=iter([10.0, 14.0]).__next__,
                                       process_time=iter([1.0, 7.0]).__next__)
        monkeypatch.setattr(engine, "time", clocks)
        fake = learner.update(batch)
    finally:
        torch.set_num_threads(threads)
    assert fake["perf/update_s"] == 4.0 and fake["perf/update_cpu_util"] == 0.75
    assert 0.0 < real["perf/update_cpu_util"] <= 1.5   # other threads of the process (gloo) may add a little


def test_reference_model_stays_frozen_and_kl_grows(tiny_llama, port):
    learner = PolicyLearner(LearnerConfig(zero_stage=3, lr=1e-2, micro_batch_size=2, mini_batches_per_step=2),
                            model_path=tiny_llama, loss=PolicyLossConfig(kl_coef=0.5), master_port=port)
    prompts, responses = random_rows(4, [2, 4, 3, 2], [5, 3, 4, 2])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    lp0, _ = learner.compute_log_probs(ids, am, rm)
    assert torch.equal(learner.compute_ref_log_probs(ids, am, rm), lp0)
    adv = torch.randn(lp0.shape, generator=torch.Generator().manual_seed(5))
    learner.update(PolicyBatch(ids, am, rm, lp0, adv))  # ref log-probs computed inside
    first, second = learner.step_stats
    assert first["actor/kl_ref"] == 0.0  # step 1 runs on the initial policy
    assert second["actor/kl_ref"] > 0.0
    assert torch.equal(learner.compute_ref_log_probs(ids, am, rm), lp0)
    assert (learner.compute_log_probs(ids, am, rm)[0] - lp0).abs().max() > 1e-3


def test_full_state_dict_zero3_has_hf_names_and_tied_head(tiny_llama, port):
    learner = PolicyLearner(LearnerConfig(zero_stage=3), model_path=tiny_llama, master_port=port)
    sd = learner.full_state_dict()
    expected = float32_model(tiny_llama).state_dict()
    assert set(sd) == set(expected) and "lm_head.weight" in sd
    for name, value in expected.items():
        assert torch.equal(sd[name], value), name
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert sd["lm_head.weight"].data_ptr() != sd["model.embed_tokens.weight"].data_ptr()


def test_update_rejects_mismatched_batch(tiny_llama, port):
    learner = PolicyLearner(LearnerConfig(zero_stage=0, mini_batches_per_step=2), model_path=tiny_llama,
                            master_port=port)
    prompts, responses = random_rows(6, [2, 3, 2], [3, 2, 4])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    z = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="do not split into 2 mini-batches"):
        learner.update(PolicyBatch(ids, am, rm, z, z))
    rows = [0, 2]  # responses of 3 and 4 tokens
    with pytest.raises(ValueError, match="advantages have 3 columns, the longest response has 4"):
        learner.update(PolicyBatch(ids[rows], am[rows], rm[rows], z[:2, :3], z[:2, :3]))
    with pytest.raises(ValueError, match="unknown fields"):
        learner.update({"input_ids": ids, "rewards": z})


# ---------------------------------------------------------------------------- two ranks
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_match_one_rank_on_the_global_batch(tiny_llama, port, tmp_path):
    """ZeRO-2 over two gloo ranks (each with half the batch, very different token counts) gives both
    ranks the same weights, and the same loss, gradient norm and weights as one rank on the whole batch."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(ws2_rank_main, args=(2, free_port(), tiny_llama, str(tmp_path)), nprocs=2, join=True)
    finally:
        remove_shm_buffers()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    assert r0["stats"]["actor/pg_loss"] == r1["stats"]["actor/pg_loss"]

    learner = PolicyLearner(ws2_learner_config(), model_path=tiny_llama, master_port=port)
    ids, am, rm, advantages, old_shift = ws2_batch()
    lp, _ = learner.compute_log_probs(ids, am, rm, width=advantages.shape[1])
    single = learner.update(PolicyBatch(ids, am, rm, lp + old_shift, advantages))
    for key in ("actor/pg_loss", "actor/loss", "actor/clipfrac", "actor/entropy", "actor/n_tokens"):
        assert r0["stats"][key] == pytest.approx(single[key], abs=1e-6), key
    assert r0["stats"]["actor/grad_norm"] == pytest.approx(single["actor/grad_norm"], rel=1e-5)
    for name, value in learner.engine.module.state_dict().items():
        torch.testing.assert_close(r0["weights"][name], value, atol=1e-6, rtol=0, msg=name)
    initial = float32_model(tiny_llama).state_dict()
    assert not torch.equal(r0["weights"]["model.norm.weight"], initial["model.norm.weight"])


def test_update_moves_log_probs_in_the_direction_of_the_hicra_advantages(tiny_llama, port):
    """One PPO step on GRPO advantages shaped by HICRA: responses with A > 0 become more likely, those
    with A < 0 less likely (the sign of learning, end to end through DeepSpeed)."""
    from hicra_rl.algo import compute_advantages, hicra_advantages

    learner = PolicyLearner(LearnerConfig(zero_stage=2, lr=1e-3, micro_batch_size=2), model_path=tiny_llama,
                            master_port=port)
    prompts, responses = random_rows(11, [3, 3, 4, 2], [6, 5, 6, 4])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    lp, _ = learner.compute_log_probs(ids, am, rm)
    seq_adv = compute_advantages("grpo_mean", torch.tensor([1.0, 1.0, 0.0, 0.0]), [0, 0, 0, 0])
    assert seq_adv.tolist() == [0.5, 0.5, -0.5, -0.5]
    planning = torch.zeros_like(lp, dtype=torch.bool)
    planning[:, :2] = True
    mask = response_layout_mask(torch.tensor([len(r) for r in responses]), lp.shape[1])
    adv = hicra_advantages(seq_adv, planning, 0.2) * mask
    learner.update({"input_ids": ids, "attention_mask": am, "response_mask": rm, "old_log_probs": lp,
                    "advantages": adv})
    after, _ = learner.compute_log_probs(ids, am, rm)
    change = ((after - lp) * mask).sum(-1) / mask.sum(-1)
    assert change[0] > 0 and change[1] > 0, change
    assert change[2] < 0 and change[3] < 0, change


def test_on_policy_update_equals_recomputed_old_log_probs(tiny_llama, port):
    """One epoch, one mini-batch: using the update's own forward, detached, as pi_old gives the same loss,
    gradient (weights after AdamW with eps = 1) and stats as a separate old-log-prob forward."""
    cfg = LearnerConfig(zero_stage=0, lr=0.1, eps=1.0, micro_batch_size=2)
    prompts, responses = random_rows(12, [3, 5, 2, 4], [6, 3, 5, 4])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    adv = torch.randn(4, 6, generator=torch.Generator().manual_seed(13))

    recompute = PolicyLearner(cfg, model_path=tiny_llama, master_port=port)
    lp, ent = recompute.compute_log_probs(ids, am, rm, width=6)
    stats_r = recompute.update(PolicyBatch(ids, am, rm, lp, adv))
    weights_r = recompute.full_state_dict()
    assert recompute.forward_log_probs is None

    shortcut = PolicyLearner(cfg, model_path=tiny_llama, master_port=port)
    stats_s = shortcut.update(PolicyBatch(ids, am, rm, None, adv))
    torch.testing.assert_close(shortcut.forward_log_probs, lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(shortcut.forward_entropy, ent, atol=1e-5, rtol=0)
    for key in ("actor/pg_loss", "actor/loss", "actor/grad_norm", "actor/entropy", "actor/n_tokens"):
        assert stats_s[key] == pytest.approx(stats_r[key], abs=1e-6), key
    assert stats_s["actor/clipfrac"] == 0.0 and stats_s["actor/approx_kl"] == pytest.approx(0.0, abs=1e-9)
    weights_s = shortcut.full_state_dict()
    for name in weights_r:
        torch.testing.assert_close(weights_s[name], weights_r[name], atol=1e-6, rtol=0)

    two_minis = PolicyLearner(LearnerConfig(zero_stage=0, mini_batches_per_step=2), model_path=tiny_llama,
                              master_port=port)
    with pytest.raises(ValueError, match="not on-policy after the first optimizer step"):
        two_minis.update(PolicyBatch(ids, am, rm, None, adv))


def test_gradient_step_groups_micro_batches_by_length(tiny_llama, port):
    """Rows of 3, 11, 3, 11 tokens in micro-batches of 2: grouped by length they need 2x3 + 2x11 = 28
    positions for 28 real tokens (no padding; in the given order it would be 44), and the NLL loss equals
    the token mean over all response tokens computed directly."""
    from hicra_rl.sft import nll_loss

    learner = PolicyLearner(LearnerConfig(zero_stage=0, lr=1e-3, micro_batch_size=2), model_path=tiny_llama,
                            master_port=port)
    prompts, responses = random_rows(14, [2, 2, 2, 2], [1, 9, 1, 9])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    with torch.no_grad():
        lps, _ = direct_log_probs(float32_model(tiny_llama), prompts, responses)
    expected_nll = -float(torch.cat(lps).sum()) / 20
    out = learner.gradient_step(ids, am, rm, nll_loss)
    assert out["padding_frac"] == 0.0 and out["n_tokens"] == 20
    assert out["sft/nll"] == pytest.approx(expected_nll, abs=1e-5)


def test_shared_prefix_update_equals_separate_rows(tiny_llama, port):
    """learner.shared_prefix packs each prompt group into one row (the prompt computed once): the update's
    loss, gradient (weights after AdamW with eps = 1) and pre-update log-probs equal the separate-row path."""
    prompts, responses = random_rows(21, [4, 2, 6], [5, 3, 7, 2, 4, 6])  # 6 responses, 3 groups below
    group_prompts = [prompts[0], prompts[0], prompts[1], prompts[1], prompts[1], prompts[2]]
    ids, am, rm = build_sequences(group_prompts, responses, pad_id=0)
    adv = torch.randn(6, 7, generator=torch.Generator().manual_seed(22))
    results = {}
    for shared in (False, True):
        learner = PolicyLearner(LearnerConfig(zero_stage=2, lr=0.1, eps=1.0, micro_batch_size=3, shared_prefix=shared),
                                model_path=tiny_llama, master_port=port, logits_temperature=0.8)
        stats = learner.update(PolicyBatch(ids, am, rm, None, adv))
        results[shared] = (stats, learner.forward_log_probs, learner.forward_entropy, learner.full_state_dict())
        if shared:  # packed lengths 4+5+3 = 12, 2+7+2+4 = 15, 6+6 = 12: groups {0, 2} then {1} (<= 3 responses)
            starts, lengths = response_spans(rm, am)
            plan = learner._plan_micro_batches(ids, starts, lengths)
            assert [rows.tolist() for rows, _ in plan] == [[0, 1, 5], [2, 3, 4]]
            assert [p.n_tokens for _, p in plan] == [24, 15]  # 39 tokens instead of 47 in separate rows
    (s0, lp0, ent0, w0), (s1, lp1, ent1, w1) = results[False], results[True]
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent1, ent0, atol=1e-4, rtol=0)
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/n_tokens"):
        assert s1[key] == pytest.approx(s0[key], abs=1e-5), key
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("stage", [0, 2])
def test_a_nonfinite_update_is_skipped_and_the_next_one_applies(tiny_llama, port, stage):
    """A NaN advantage makes the loss and every gradient NaN: the optimizer step is skipped (ZeRO-2:
    DeepSpeed's own overflow check; plain fp32 data parallel: ours), the weights stay as they were, the
    stats say so, and the next finite update moves the weights again."""
    learner = PolicyLearner(LearnerConfig(zero_stage=stage, lr=1e-2, micro_batch_size=2), model_path=tiny_llama,
                            master_port=port)
    prompts, responses = random_rows(5, [2, 4, 3], [5, 3, 4])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    lp, _ = learner.compute_log_probs(ids, am, rm)
    batch = {"input_ids": ids, "attention_mask": am, "response_mask": rm, "old_log_probs": lp}
    before = learner.full_state_dict()
    bad = torch.ones_like(lp)
    bad[1, 0] = float("nan")
    stats = learner.update({**batch, "advantages": bad})
    assert stats["actor/nonfinite_skipped"] == 1.0 and not math.isfinite(stats["actor/grad_norm"])
    after = learner.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    stats = learner.update({**batch, "advantages": torch.ones_like(lp)})
    assert stats["actor/nonfinite_skipped"] == 0.0 and math.isfinite(stats["actor/grad_norm"])
    moved = learner.full_state_dict()
    assert all(torch.isfinite(v).all() for v in moved.values())
    assert any(not torch.equal(before[k], moved[k]) for k in before)


# ---------------------------------------------------------------------------- masked rows, sequence statistics

@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_masked_rows_give_the_gradient_of_the_kept_rows_alone(tiny_llama, port, agg_mode):
    """Dynamic sampling's fill-up groups (advantage 0) come with a loss mask of 0: the update's loss,
    entropy term, gradient (weights after AdamW with eps = 1) and token / sequence counts are those of
    the kept rows alone, so the fill-up does not shrink the step's policy gradient."""
    loss_cfg = PolicyLossConfig(agg_mode=agg_mode, entropy_coef=0.01)
    cfg = LearnerConfig(zero_stage=0, lr=0.1, eps=1.0, micro_batch_size=2)
    prompts, responses = random_rows(31, [3, 3, 5, 5, 2, 2], [6, 2, 4, 7, 5, 3])  # rows 4, 5: the fill-up
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    width = 7
    adv = torch.randn(6, width, generator=torch.Generator().manual_seed(32))
    adv[4:] = 0.0
    keep = torch.ones(6, width)
    keep[4:] = 0.0

    masked = PolicyLearner(cfg, model_path=tiny_llama, master_port=port, loss=loss_cfg)
    stats_m = masked.update(PolicyBatch(ids, am, rm, None, adv, loss_mask=keep))
    kept = PolicyLearner(cfg, model_path=tiny_llama, master_port=port, loss=loss_cfg)
    stats_k = kept.update(PolicyBatch(ids[:4], am[:4], rm[:4], None, adv[:4]))
    for key in ("actor/pg_loss", "actor/loss", "actor/grad_norm", "actor/entropy", "actor/n_tokens"):
        assert stats_m[key] == pytest.approx(stats_k[key], rel=1e-5, abs=1e-7), key
    assert stats_m["actor/n_tokens"] == 6 + 2 + 4 + 7
    weights_m, weights_k = masked.full_state_dict(), kept.full_state_dict()
    for name in weights_k:
        torch.testing.assert_close(weights_m[name], weights_k[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_an_all_masked_batch_is_a_zero_loss_not_a_nonfinite_one(tiny_llama, port, agg_mode):
    """Every group a fill-up (no informative group in any round): nothing counts, the loss is 0 and finite
    (not 0 / 0), the update is not reported as non-finite."""
    learner = PolicyLearner(LearnerConfig(zero_stage=0, lr=1e-2, micro_batch_size=2), model_path=tiny_llama,
                            master_port=port, loss=PolicyLossConfig(agg_mode=agg_mode))
    prompts, responses = random_rows(33, [2, 4], [3, 5])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    stats = learner.update(PolicyBatch(ids, am, rm, None, torch.zeros(2, 5), loss_mask=torch.zeros(2, 5)))
    assert stats["actor/nonfinite_skipped"] == 0.0 and stats["actor/loss"] == 0.0
    assert stats["actor/grad_norm"] == 0.0 and stats["actor/n_tokens"] == 0.0


@pytest.mark.parametrize("mode, share_key, shift", [
    ("seq_mask", "rollout_corr/masked_frac", 1.0),   # row 0: geometric-mean ratio e^-1, outside [1/2, 2]
    ("seq_tis", "rollout_corr/capped_frac", -1.0),   # row 0: sequence ratio e^9 > 2: truncated
])
def test_sequence_level_rollout_corr_stats_are_shares_of_sequences(tiny_llama, port, mode, share_key, shift):
    """rollout_corr/masked_frac, log_ppl_diff and (seq_tis) capped_frac are over sequences
    (docs/metrics.md): across micro-batches of very different token counts they equal the whole batch's
    share / mean of sequences, not a token-weighted mean of the micro-batches' values (9 / 16 here)."""
    from hicra_rl.algo.losses import rollout_correction

    loss_cfg = PolicyLossConfig(rollout_correction=mode, rollout_correction_cap=2.0)
    learner = PolicyLearner(LearnerConfig(zero_stage=0, lr=1e-3, micro_batch_size=1), model_path=tiny_llama,
                            master_port=port, loss=loss_cfg)
    prompts, responses = random_rows(34, [2, 3, 2, 4], [9, 2, 3, 2])  # row 0 holds 9 of the 16 tokens
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    width = 9
    mask = response_layout_mask(torch.tensor([len(r) for r in responses]), width)
    lp, _ = learner.compute_log_probs(ids, am, rm, width=width)
    behaviour = lp.clone()
    behaviour[0] += shift * mask[0]
    stats = learner.update(PolicyBatch(ids, am, rm, lp, torch.zeros(4, width), behaviour_log_probs=behaviour))
    _, _, whole = rollout_correction(lp, behaviour, mask, mode, 2.0)
    assert whole[share_key] == pytest.approx(0.25)  # 1 of 4 sequences
    assert whole["rollout_corr/log_ppl_diff"] == pytest.approx(shift / 4, abs=1e-6)  # (shift + 0 + 0 + 0) / 4
    for key in (share_key, "rollout_corr/log_ppl_diff"):
        assert stats[key] == pytest.approx(whole[key], abs=1e-6), key
    for key in ("rollout_corr/ratio_mean", "rollout_corr/kl", "rollout_corr/k3_kl"):  # per-token stats
        assert stats[key] == pytest.approx(whole[key], abs=1e-5), key
