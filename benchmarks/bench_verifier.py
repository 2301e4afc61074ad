"""Verifier accuracy and throughput on MATH-500's gold answers, through the time-bounded pool.

    python benchmarks/bench_verifier.py [--workers 1] [--time-limit 5] [--repeat 1]

- accept: every gold answer wrapped as ``... so the answer is \\boxed{<gold>}`` must verify against itself;
- reject: the same response checked against the gold of the next problem whose answer differs
  (whitespace-insensitive) must fail;
- items/s for both passes through ``TimeBoundedVerifier`` (worker processes, per-item limit), and the
  same work in-process with no time bound, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hicra_rl.rewards.pool import TimeBoundedVerifier, score_item

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "math500" / "test.jsonl"


def math500_answers(path: Path = DATA) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["answer"] for line in f if line.strip()]


def swapped(answers: list[str]) -> list[int]:
    """For each problem, the index of the next problem whose answer text differs."""
    norm = ["".join(a.split()) for a in answers]
    out = []
    for i in range(len(answers)):
        j = (i + 1) % len(answers)
        while norm[j] == norm[i]:
            j = (j + 1) % len(answers)
        out.append(j)
    return out


def build_items(answers: list[str]) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    responses = [f"Putting it together, so the answer is \\boxed{{{a}}}." for a in answers]
    same = [(r, a, "math") for r, a in zip(responses, answers)]
    other = [(responses[i], answers[j], "math") for i, j in enumerate(swapped(answers))]
    return same, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1, help="score the item lists this many times")
    args = parser.parse_args()

    answers = math500_answers()
    same, other = build_items(answers)
    same, other = same * args.repeat, other * args.repeat

    with TimeBoundedVerifier(time_limit_s=args.time_limit, num_workers=args.workers) as verifier:
        start = time.perf_counter()
        accepted = verifier.score_batch(same)
        t_accept = time.perf_counter() - start
        start = time.perf_counter()
        rejected = verifier.score_batch(other)
        t_reject = time.perf_counter() - start
        timeouts = verifier.timeouts

    start = time.perf_counter()
    for item in same + other:
        score_item(*item)
    t_inproc = time.perf_counter() - start

    accept_rate = sum(r.correct for r in accepted) / len(accepted)
    reject_rate = sum(not r.correct for r in rejected) / len(rejected)
    print(f"MATH-500 gold answers: {len(answers)} (x{args.repeat}), workers={args.workers}, "
          f"time limit {args.time_limit} s")
    print(f"accept rate (gold vs itself):        {accept_rate:.4f}  ({len(same) / t_accept:.0f} items/s)")
    print(f"reject rate (gold vs another's gold): {reject_rate:.4f}  ({len(other) / t_reject:.0f} items/s)")
    print(f"pool: {len(same + other) / (t_accept + t_reject):.0f} items/s, timeouts {timeouts}; "
          f"in-process without time bound: {len(same + other) / t_inproc:.0f} items/s "
          f"(pool/in-process throughput ratio {t_inproc / (t_accept + t_reject):.2f})")
    for (_response, gold, _), r in zip(same, accepted):
        if not r.correct:
            print(f"  not accepted: {gold!r} (timed out: {r.timed_out}, error: {r.error})")
    for (_response, gold, _), r in zip(other, rejected):
        if r.correct:
            print(f"  not rejected: answer {r.extracted!r} vs gold {gold!r}")


if __name__ == "__main__":
    main()
