"""Token-budget micro-batches (``learner.micro_batch_tokens``): the planner by hand (rows and packed prompt
groups, the split to a common count across ranks), the config check, and on the tiny Llama the same loss
stats, log-probs and gradients as fixed-size micro-batches, with and without shared prefixes, on one rank
and (slow) on two ranks whose local plans have different micro-batch counts."""
from __future__ import annotations

import os
import random

import pytest
import torch
from learner_fixtures import free_port, random_rows, remove_shm_buffers

from hicra_rl.config import ConfigError, LearnerConfig, check_learner_config
from hicra_rl.learner.micro_batches import padded_tokens, plan_fixed_size, plan_token_budget
from hicra_rl.learner.sequences import build_sequences, response_spans

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# rows: real tokens 5, 12, 3, 7, 20, 4 -> sorted by length: rows 2 (3), 5 (4), 0 (5), 3 (7), 1 (12), 4 (20)
ROWS = [5, 12, 3, 7, 20, 4]
# prompt groups (the layout of test_learner's shared-prefix test): A = rows 0, 1 (prompt 4, responses 5, 3:
# packed 12), B = rows 2, 3, 4 (prompt 2, responses 7, 2, 4: packed 15), C = row 5 (prompt 6 + 6: packed 12)
GROUP_ENDS = [9, 7, 9, 4, 6, 12]
GROUPS = dict(groups=[0, 0, 1, 1, 1, 2], prompt_lengths=[4, 4, 2, 2, 2, 6])


# ---------------------------------------------------------------------------- the planner, by hand
def test_rows_fill_greedily_under_the_budget():
    # budget 16: 3 | 2x4=8 | 3x5=15 | 4x7=28 > 16: cut | 7 | 2x12 > 16: cut | 12 | 2x20 > 16: cut | 20 alone
    assert plan_token_budget(ROWS, 16) == [[2, 5, 0], [3], [1], [4]]
    # budget 30: ... 4x7=28 | 5x12=60 > 30: cut | 12 | 2x20 > 30: cut | 20
    assert plan_token_budget(ROWS, 30) == [[2, 5, 0, 3], [1], [4]]
    assert plan_token_budget(ROWS, 1000) == [[2, 5, 0, 3, 1, 4]]
    assert plan_token_budget([4, 4, 4], 8) == [[0, 1], [2]]  # ties keep the rows' order


def test_a_row_longer_than_the_budget_runs_alone():
    assert plan_token_budget(ROWS, 2) == [[2], [5], [0], [3], [1], [4]]
    assert plan_token_budget([50, 3, 3], 10) == [[1, 2], [0]]


def test_split_to_the_target_count_halves_the_largest_micro_batch():
    # budget 30: padded 28, 12, 20; target 4 splits [2, 5, 0, 3] (28) into its shorter and longer half
    assert plan_token_budget(ROWS, 30, 4) == [[2, 5], [0, 3], [1], [4]]
    # then padded 8, 14, 12, 20 ([1] and [4] are single rows): [0, 3] (2x7 = 14) is split
    assert plan_token_budget(ROWS, 30, 5) == [[2, 5], [0], [3], [1], [4]]
    # budget 16: only [2, 5, 0] can be split
    assert plan_token_budget(ROWS, 16, 5) == [[2], [5, 0], [3], [1], [4]]
    assert plan_token_budget(ROWS, 16, 6) == [[2], [5], [0], [3], [1], [4]]
    assert plan_token_budget(ROWS, 16, 3) == plan_token_budget(ROWS, 16)  # already >= target: unchanged
    with pytest.raises(ValueError, match="cannot make 7 micro-batches out of 6 rows"):
        plan_token_budget(ROWS, 16, 7)
    with pytest.raises(ValueError, match="token budget must be >= 1"):
        plan_token_budget(ROWS, 0)


def test_packed_groups_are_the_unit_under_a_budget():
    # units sorted by packed length: A (12), C (12, stable after A), B (15); budget 24: A + C = 2x12 | 2x15 > 24
    assert plan_token_budget(GROUP_ENDS, 24, **GROUPS) == [[0, 1, 5], [2, 3, 4]]
    assert plan_token_budget(GROUP_ENDS, 12, **GROUPS) == [[0, 1], [5], [2, 3, 4]]  # B (15 > 12) alone
    # target 4 from budget 24: [A, C] (24) -> [A], [C]; then the largest is [B] (15), one group: split into
    # sub-groups of its responses [2] (2 + 7 = 9) and [3, 4] (2 + 2 + 4 = 8)
    assert plan_token_budget(GROUP_ENDS, 24, 4, **GROUPS) == [[0, 1], [5], [2], [3, 4]]
    assert plan_token_budget(GROUP_ENDS, 24, 6, **GROUPS) == [[0], [1], [5], [2], [3], [4]]
    assert padded_tokens([[0, 1, 5], [2, 3, 4]], GROUP_ENDS, **GROUPS) == 2 * 12 + 15
    assert padded_tokens([[0, 1], [5], [2], [3, 4]], GROUP_ENDS, **GROUPS) == 12 + 12 + 9 + 8


def test_fixed_size_plans_are_todays_plans():
    ends = torch.tensor(ROWS)
    order = torch.argsort(ends, stable=True)
    assert plan_fixed_size(ROWS, 4) == [order[s:s + 4].tolist() for s in range(0, 6, 4)] == [[2, 5, 0, 3], [1, 4]]
    assert padded_tokens([[2, 5, 0, 3], [1, 4]], ROWS) == 4 * 7 + 2 * 20
    assert plan_fixed_size(GROUP_ENDS, 3, **GROUPS) == [[0, 1, 5], [2, 3, 4]]  # whole groups, <= 3 responses


@pytest.mark.parametrize("seed", range(5))
def test_random_plans_cover_every_row_once_and_keep_the_budget(seed):
    rng = random.Random(seed)
    n_groups = rng.randint(1, 8)
    groups, prompts, ends = [], [], []
    for g in range(n_groups):
        p = rng.randint(1, 40)
        for _ in range(rng.randint(1, 5)):
            groups.append(g)
            prompts.append(p)
            ends.append(p + rng.randint(1, 200))
    order = list(range(len(groups)))
    rng.shuffle(order)  # groups not adjacent
    groups, prompts, ends = [groups[i] for i in order], [prompts[i] for i in order], [ends[i] for i in order]
    budget = rng.randint(50, 1500)
    for kw in ({}, {"groups": groups, "prompt_lengths": prompts}):
        base = plan_token_budget(ends, budget, **kw)
        for target in (0, len(base) + 1, len(ends)):
            if target > len(ends):
                continue
            plan = plan_token_budget(ends, budget, target, **kw)
            assert sorted(r for mb in plan for r in mb) == list(range(len(ends)))
            assert all(plan) and len(plan) >= target
            for mb in plan:
                units = len(set(kw["groups"][r] for r in mb)) if kw else len(mb)
                assert units == 1 or padded_tokens([mb], ends, **kw) <= budget
            if not kw:  # splitting rows never adds padding (splitting a group repeats its prompt)
                assert padded_tokens(plan, ends) <= padded_tokens(base, ends)


def test_config_checks_the_budget():
    from hydra import compose, initialize_config_dir

    from hicra_rl.config import CONF_DIR, register_configs, to_schema

    check_learner_config(LearnerConfig(micro_batch_tokens=0))
    check_learner_config(LearnerConfig(micro_batch_tokens=4096))
    with pytest.raises(ConfigError, match=r"learner.micro_batch_tokens.*must be >= 0.*got -1"):
        check_learner_config(LearnerConfig(micro_batch_tokens=-1))
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        def load(*overrides):
            return to_schema(compose(config_name="config", overrides=list(overrides)))

        with pytest.raises(ConfigError, match="learner.micro_batch_tokens"):
            load("learner.micro_batch_tokens=-5")
        # 2 prompts x 3 responses: 6 rows per rank do not divide into micro-batches of 4, but under a token
        # budget micro_batch_size is not used
        uneven = ("rollout.prompts_per_step=2", "rollout.group_size=3", "learner.micro_batch_size=4")
        with pytest.raises(ConfigError, match="learner.micro_batch_size"):
            load(*uneven)
        assert load(*uneven, "learner.micro_batch_tokens=2048").learner.micro_batch_tokens == 2048


# ---------------------------------------------------------------------------- the learner, one rank
def grouped_batch(seed: int = 31):
    """4 prompts x 3 responses of 1..14 tokens (prompts 2..7 tokens): old log-probs shifted off the
    policy (both clips fire) and random advantages."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [int(x) for x in torch.randint(2, 8, (4,), generator=g)]
    response_lens = [int(x) for x in torch.randint(1, 15, (12,), generator=g)]
    prompts, responses = random_rows(seed, prompt_lens, response_lens)
    ids, am, rm = build_sequences([prompts[i // 3] for i in range(12)], responses, pad_id=0)
    width = max(response_lens)
    shift = 0.3 * torch.randn(12, width, generator=g)
    adv = torch.randn(12, width, generator=g)
    return ids, am, rm, shift, adv


@pytest.mark.parametrize("shared", [False, True])
def test_token_budget_gives_the_same_update_as_fixed_micro_batches(tiny_llama, shared):
    """micro_batch_size 2 vs a 64-token budget (different micro-batch counts): the same log-probs from
    compute_log_probs, the same loss stats and the same weights after one AdamW step (eps = 1: the update
    ~ lr x gradient, so the weights compare the gradients), in fp32."""
    from hicra_rl.learner.engine import PolicyBatch, PolicyLearner

    ids, am, rm, shift, adv = grouped_batch()
    starts, lengths = response_spans(rm, am)
    results, counts, padding = {}, {}, {}
    for budget in (0, 64):
        cfg = LearnerConfig(zero_stage=2, lr=0.1, eps=1.0, max_grad_norm=1.0, micro_batch_size=2,
                            micro_batch_tokens=budget, shared_prefix=shared)
        learner = PolicyLearner(cfg, model_path=tiny_llama, master_port=free_port(), logits_temperature=0.8)
        counts[budget] = len(learner._plan_micro_batches(ids, starts, lengths))
        lp, ent = learner.compute_log_probs(ids, am, rm, width=adv.shape[1])
        stats = learner.update(PolicyBatch(ids, am, rm, lp + shift, adv))
        padding[budget] = stats["perf/padding_frac"]
        assert stats["perf/micro_batches"] == counts[budget]
        results[budget] = (lp, ent, stats, learner.full_state_dict())
        learner.close()
    assert counts[0] != counts[64], counts  # the two runs really accumulate over different micro-batches
    (lp0, ent0, s0, w0), (lp1, ent1, s1, w1) = results[0], results[64]
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent1, ent0, atol=1e-5, rtol=1e-6)
    assert s0["actor/clipfrac"] > 0
    for key in ("actor/loss", "actor/pg_loss", "actor/clipfrac", "actor/approx_kl", "actor/entropy",
                "actor/n_tokens", "actor/grad_norm"):
        assert s1[key] == pytest.approx(s0[key], rel=1e-6, abs=1e-7), key
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], atol=1e-7, rtol=1e-6, msg=name)


def test_token_budget_plans_in_the_learner(tiny_llama):
    """The learner's plan under a budget: rows (shared_prefix off) and packed groups (on) as the pure
    planner says, each packed micro-batch within the budget."""
    from hicra_rl.learner.engine import PolicyLearner

    ids, am, rm, _, _ = grouped_batch()
    starts, lengths = response_spans(rm, am)
    ends = (starts + lengths).tolist()
    group_of = [i // 3 for i in range(12)]
    for shared, attention in ((False, "grouped"), (True, "masked"), (True, "grouped")):
        learner = PolicyLearner(LearnerConfig(zero_stage=0, micro_batch_tokens=64, shared_prefix=shared,
                                              shared_prefix_attention=attention),
                                model_path=tiny_llama, master_port=free_port())
        plan = learner._plan_micro_batches(ids, starts, lengths)
        kw = {"groups": group_of, "prompt_lengths": starts.tolist()} if shared else {}
        assert [rows.tolist() for rows, _ in plan] == plan_token_budget(ends, 64, **kw)
        if shared:
            for rows, packed in plan:
                planned = padded_tokens([rows.tolist()], ends, **kw)   # a row per group, to the longest
                if attention == "masked":
                    assert packed.n_rows == packed.n_groups and packed.padded_tokens == planned
                else:   # the grouped attention's one unpadded row: no more than planned
                    assert packed.n_rows == 1 and packed.padded_tokens == packed.n_tokens <= planned
                assert packed.n_groups == 1 or packed.padded_tokens <= 64
        learner.close()


# ---------------------------------------------------------------------------- two ranks
def ws2_budget_batch():
    """Rank 0: 4 short rows (2 prompts x 2), rank 1: 4 long rows: under a 30-token budget rank 0 needs one
    micro-batch (packed: two), rank 1 several, so the counts must be agreed on."""
    prompts, responses = random_rows(41, [3, 2, 4, 5], [1, 2, 1, 2, 9, 12, 10, 14])
    rows_prompts = [prompts[i // 2] for i in range(8)]
    ids, am, rm = build_sequences(rows_prompts, responses, pad_id=0)
    g = torch.Generator().manual_seed(42)
    return ids, am, rm, 0.3 * torch.randn(8, 14, generator=g), torch.randn(8, 14, generator=g)


def ws2_budget_config(shared: bool, budget: int) -> LearnerConfig:
    return LearnerConfig(zero_stage=3, lr=0.1, eps=1.0, max_grad_norm=1.0, micro_batch_size=1,
                         micro_batch_tokens=budget, shared_prefix=shared)


def ws2_budget_rank_main(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    from hicra_rl.learner.engine import PolicyBatch, PolicyLearner

    ids, am, rm, shift, adv = ws2_budget_batch()
    rows = slice(4 * rank, 4 * rank + 4)
    out = {}
    for shared in (False, True):
        learner = PolicyLearner(ws2_budget_config(shared, 30), model_path=model_dir, rank=rank,
                                world_size=world_size, master_port=port, timeout_s=120)
        starts, lengths = response_spans(rm[rows], am[rows])
        local = plan_token_budget((starts + lengths).tolist(), 30,
                                  **({"groups": [0, 0, 1, 1], "prompt_lengths": starts.tolist()} if shared else {}))
        lp, _ = learner.compute_log_probs(ids[rows], am[rows], rm[rows], width=14)  # ZeRO-3: collective forwards
        stats = learner.update(PolicyBatch(ids[rows], am[rows], rm[rows], lp + shift[rows], adv[rows]))
        out[shared] = {"local_count": len(local), "stats": stats, "lp": lp, "weights": learner.full_state_dict()}
        learner.close()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_agree_on_the_micro_batch_count(tiny_llama, tmp_path):
    """ZeRO-3 over two gloo ranks whose local token-budget plans have different micro-batch counts (rows
    and packed groups): no collective mismatch, and the same stats and weights as one rank with fixed
    micro-batches on the global batch."""
    import torch.multiprocessing as mp

    from hicra_rl.learner.engine import PolicyBatch, PolicyLearner

    try:
        mp.spawn(ws2_budget_rank_main, args=(2, free_port(), tiny_llama, str(tmp_path)), nprocs=2, join=True)
    finally:
        remove_shm_buffers()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    ids, am, rm, shift, adv = ws2_budget_batch()
    for shared in (False, True):
        assert r0[shared]["local_count"] < r1[shared]["local_count"], shared  # the split was needed
        assert r0[shared]["stats"]["perf/micro_batches"] == r1[shared]["stats"]["perf/micro_batches"]
        learner = PolicyLearner(ws2_budget_config(shared, 0), model_path=tiny_llama, master_port=free_port())
        lp, _ = learner.compute_log_probs(ids, am, rm, width=14)
        torch.testing.assert_close(torch.cat([r0[shared]["lp"], r1[shared]["lp"]]), lp, atol=1e-6, rtol=0)
        single = learner.update(PolicyBatch(ids, am, rm, lp + shift, adv))
        for key in ("actor/pg_loss", "actor/loss", "actor/clipfrac", "actor/entropy", "actor/n_tokens"):
            assert r0[shared]["stats"][key] == pytest.approx(single[key], rel=1e-6, abs=1e-7), (shared, key)
        assert r0[shared]["stats"]["actor/grad_norm"] == pytest.approx(single["actor/grad_norm"], rel=1e-5)
        weights = learner.full_state_dict()
        for name, value in weights.items():
            torch.testing.assert_close(r0[shared]["weights"][name], value, atol=1e-6, rtol=1e-6, msg=(shared, name))
        learner.close()
