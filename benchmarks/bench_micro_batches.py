"""Padding of fixed-size micro-batches vs token-budget micro-batches (``learner.micro_batch_tokens``), side by side.

    python benchmarks/bench_micro_batches.py [--prompts 16] [--group-size 4] [--prompt-len 35]
        [--micro-batch-sizes 4 8 16] [--budgets 1024 2048 4096] [--seed 0] [--time] [--repeats 3]

Plans one rank's mini-batch the way the learner does (``hicra_rl.learner.micro_batches``, the planner
``PolicyLearner`` calls) and counts, per micro-batch, the positions its forward computes: rows x its
longest row (``shared_prefix=false``), or packed prompt groups x the longest packed group
(``shared_prefix=true``). Padding is deterministic, so the default run takes no time and needs no model.

Two length distributions, both seeded: ``spread``, --prompts prompts of --prompt-len +-20% tokens with
--group-size responses each of 20..200 tokens (uniform); ``long-tail``, the same prompts with 90% of the
responses from a log-normal (median 60, sigma 0.5, at least 20 tokens) and 10% of 512..1024 tokens (long
chains up to a 1024-token generation limit).

Columns: micro-batches, real tokens (the same for every plan of a layout), padded tokens (positions the
forwards compute), padding fraction (what ``perf/padding_frac`` reports), the largest micro-batch in
padded tokens (what bounds activation memory) and padded tokens relative to the first fixed-size plan
(``micro_batch_size=4``).

``--time`` also times one learner update step (``PolicyLearner.gradient_step``, token-mean NLL) of a tiny
random Llama for every plan, after one warm-up step, best of --repeats interleaved rounds (CPU: a minute
or more; on a machine shared with other jobs the times are noise, the padding figures are not).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import math
import random

from hicra_rl.learner.micro_batches import padded_tokens, plan_fixed_size, plan_token_budget


def make_lengths(case: str, prompts: int, group_size: int, prompt_len: int, seed: int):
    """(prompt length, response length, group id) per row, groups adjacent."""
    rng = random.Random(f"{case}-{seed}")
    p_lens, r_lens, groups = [], [], []
    for g in range(prompts):
        p = rng.randint(round(prompt_len * 0.8), round(prompt_len * 1.2))
        for _ in range(group_size):
            if case == "spread":
                r = rng.randint(20, 200)
            elif rng.random() < 0.1:  # a long reasoning chain, up to the generation limit
                r = rng.randint(512, 1024)
            else:
                r = min(1024, max(20, round(math.exp(rng.gauss(math.log(60), 0.5)))))
            p_lens.append(p)
            r_lens.append(r)
            groups.append(g)
    return p_lens, r_lens, groups


def plan_rows(kind: str, value: int, ends, p_lens, groups, shared: bool):
    kw = {"groups": groups, "prompt_lengths": p_lens} if shared else {}
    if kind == "fixed":
        return plan_fixed_size(ends, value, **kw)
    return plan_token_budget(ends, value, **kw)


def describe(plan, ends, p_lens, groups, shared: bool) -> dict:
    kw = {"groups": groups, "prompt_lengths": p_lens} if shared else {}
    if shared:  # the prompt once per packed group
        real = sum(p_lens[rows[0]] + sum(ends[r] - p_lens[r] for r in rows)
                   for rows in _groups_of(range(len(ends)), groups).values())
    else:
        real = sum(ends)
    padded = padded_tokens(plan, ends, **kw)
    return {"n": len(plan), "real": real, "padded": padded, "frac": 1 - real / padded,
            "largest": max(padded_tokens([mb], ends, **kw) for mb in plan)}


def _groups_of(rows, groups):
    out: dict[int, list[int]] = {}
    for r in rows:
        out.setdefault(groups[r], []).append(r)
    return out


def print_case(case: str, args) -> list[tuple]:
    p_lens, r_lens, groups = make_lengths(case, args.prompts, args.group_size, args.prompt_len, args.seed)
    ends = [p + r for p, r in zip(p_lens, r_lens)]
    srt = sorted(r_lens)
    print(f"\n== {case}: {args.prompts} prompts x {args.group_size} responses = {len(ends)} rows; prompts "
          f"{min(p_lens)}-{max(p_lens)} tokens; responses {srt[0]}-{srt[-1]} (median {srt[len(srt) // 2]}, "
          f"mean {sum(srt) / len(srt):.0f}) tokens")
    setups = []
    for shared in (False, True):
        rows = [("fixed", m) for m in args.micro_batch_sizes] + [("budget", b) for b in args.budgets]
        print(f"\n  shared_prefix={str(shared).lower():5s}  {'plan':>24s} {'micro-batches':>13s} {'real tok':>9s} "
              f"{'padded tok':>10s} {'padding':>8s} {'largest mb':>10s} {'padded / fixed':>14s}")
        base = None
        for kind, value in rows:
            plan = plan_rows(kind, value, ends, p_lens, groups, shared)
            d = describe(plan, ends, p_lens, groups, shared)
            base = base or d["padded"]
            label = f"micro_batch_size={value}" if kind == "fixed" else f"micro_batch_tokens={value}"
            print(f"  {'':19s}{label:>24s} {d['n']:13d} {d['real']:9d} {d['padded']:10d} {d['frac']:8.1%} "
                  f"{d['largest']:10d} {d['padded'] / base:14.3f}")
            setups.append((case, shared, kind, value, plan, p_lens, r_lens, groups))
    return setups


def time_updates(setups, repeats: int) -> None:
    """One ``gradient_step`` (token-mean NLL) of a tiny random Llama per plan, best of ``repeats``."""
    import socket
    import tempfile
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hicra_rl.config import LearnerConfig
    from hicra_rl.learner.engine import PolicyLearner
    from hicra_rl.learner.sequences import build_sequences
    from hicra_rl.sft import nll_loss

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tmp = tempfile.mkdtemp(prefix="bench-mb-")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"\n== --time: one gradient_step of a random Llama (hidden 128, 2 layers, vocab 8192), fp32, "
          f"{torch.get_num_threads()} threads, best of {repeats} interleaved rounds")
    by_case: dict[str, list] = {}
    for s in setups:
        by_case.setdefault(s[0], []).append(s)
    for case, items in by_case.items():
        _, _, _, _, _, p_lens, r_lens, groups = items[0]
        g = torch.Generator().manual_seed(0)
        prompt_of = {gr: torch.randint(1, 8192, (p,), generator=g).tolist() for p, gr in zip(p_lens, groups)}
        prompts = [prompt_of[gr] for gr in groups]
        responses = [torch.randint(1, 8192, (r,), generator=g).tolist() for r in r_lens]
        ids, am, rm = build_sequences(prompts, responses, pad_id=0)
        learners = {}
        for _, shared, kind, value, *_ in items:
            lc = LearnerConfig(zero_stage=0, lr=1e-6, shared_prefix=shared,
                               micro_batch_size=value if kind == "fixed" else 4,
                               micro_batch_tokens=value if kind == "budget" else 0)
            learners[(shared, kind, value)] = PolicyLearner(lc, model_path=tmp, master_port=port)
        for learner in learners.values():  # warm-up (first-call allocations, DeepSpeed's lazy set-up)
            learner.gradient_step(ids, am, rm, nll_loss)
        times = {k: [] for k in learners}
        for _ in range(repeats):
            for k, learner in learners.items():
                t0 = time.perf_counter()
                learner.gradient_step(ids, am, rm, nll_loss)
                times[k].append(time.perf_counter() - t0)
        for shared in (False, True):
            keys = [k for k in learners if k[0] == shared]
            base = min(times[keys[0]])
            for k in keys:
                label = f"micro_batch_size={k[2]}" if k[1] == "fixed" else f"micro_batch_tokens={k[2]}"
                print(f"  {case:9s} shared_prefix={str(shared).lower():5s} {label:>24s} {min(times[k]):7.3f} s  "
                      f"/ fixed {min(times[k]) / base:.3f}")
        for learner in learners.values():
            learner.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=35)
    ap.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[4, 8, 16],
                    help="fixed sizes (16 = 4 groups of 4: the CPU default with shared_prefix)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time", action="store_true", help="also time one tiny-model update per plan")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    setups = []
    for case in ("spread", "long-tail"):
        setups += print_case(case, args)
    if args.time:
        time_updates(setups, args.repeats)


if __name__ == "__main__":
    main()
