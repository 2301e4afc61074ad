"""One-step off-policy rollout vs the synchronous loop, side by side in one run, with the ratio.

    python benchmarks/bench_off_policy.py [--steps 4] [--cold-start DIR] [--out runs/bench_off_policy]

Runs ``hicra-train`` twice from the same cold start on the CPU default (16 prompts x 4, HICRA):
``rollout.staleness=0`` (generate, score, update, sync in turn) and ``rollout.staleness=1
algorithm.rollout_correction=token_tis`` (step t+1's generation and scoring run while step t updates).
It prints the median step time of steps 2..N of each, the ratio, the stage times, and what the overlap
would give where the two stages do not share cores (a GPU node: vLLM and the learner on their own devices):
synchronous = generate + reward + update + sync, overlapped = max(generate + reward, update) + sync,
both from the synchronous run's own stage times.

On a 2-core machine both stages want both cores, so the overlap cannot make a step faster: the figure says
how much it costs here.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import add_training_args, median_after_warmup, run_train  # noqa: E402

STAGES = ("generate", "reward", "update", "wait_rollout", "sync", "step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, steps=4, out="runs/bench_off_policy")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rows = {"sync": run_train("staleness0", ["rollout.staleness=0"], args),
            "overlap": run_train("staleness1", ["rollout.staleness=1", "algorithm.rollout_correction=token_tis"],
                                 args)}
    print(f"\nmedian seconds (steps 2..{args.steps}; 16 prompts x 4, HICRA, from the cold start)")
    print(f"  {'stage':<14}{'staleness 0':>13}{'staleness 1':>13}")
    med = {k: {s: median_after_warmup(rows[k], f"timing/{s}_s") for s in STAGES} for k in rows}
    for s in STAGES:
        print(f"  {s:<14}{med['sync'][s]:13.1f}{med['overlap'][s]:13.1f}")
    print(f"  step time staleness 1 / staleness 0 = {med['overlap']['step'] / med['sync']['step']:.2f} (2 CPU cores, "
          "both stages on the same cores)")
    m = med["sync"]
    produce = m["generate"] + m["reward"]
    serial = produce + m["update"] + m["sync"]
    overlapped = max(produce, m["update"]) + m["sync"]
    print(f"  stages on separate devices (from the synchronous run's stage times): {serial:.1f} s -> "
          f"{overlapped:.1f} s a step ({overlapped / serial:.2f}x)")
    lag = [r.get("rollout/policy_lag") for r in rows["overlap"]]
    corr = [round(r.get("rollout_corr/ratio_mean", float("nan")), 4) for r in rows["overlap"]]
    print(f"  staleness 1: policy lag per step {lag}; token_tis mean ratio per step {corr}")


if __name__ == "__main__":
    main()
