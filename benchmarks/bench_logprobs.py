"""Log-prob + entropy over the vocabulary: chunk sizes side by side, forward + backward, in one run.

    python benchmarks/bench_logprobs.py [--tokens 600] [--vocab 49152] [--repeats 5]

The learner's per-token log pi and entropy (``hicra_rl.algo.logprobs``) run chunk by chunk over the
[tokens x vocab] logits. Each chunk goes through ~8 element-wise passes; on a CPU a chunk that fits a
core's L2 cache runs them from cache. Prints the median seconds of forward + backward (log-prob loss,
as in the policy update) per chunk size and the ratio of ``auto`` (``auto_chunk_rows``) to 1024 rows, the
fixed default before. 600 tokens is one micro-batch of the CPU default (16 responses of ~37 tokens).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hicra_rl.algo.logprobs import auto_chunk_rows, logprobs_and_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(args.tokens, args.vocab) * 3
    labels = torch.randint(0, args.vocab, (args.tokens,))
    weights = torch.randn(args.tokens)
    auto = auto_chunk_rows(args.vocab, "cpu")
    sizes = sorted({1024, 256, 64, 32, auto, 4}, reverse=True)
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(args.repeats):          # interleaved, so drift hits every size alike
        for s in sizes:
            x = logits.clone().requires_grad_()
            t0 = time.perf_counter()
            lp, _ = logprobs_and_entropy(x, labels, s)
            (lp * weights).sum().backward()
            times[s].append(time.perf_counter() - t0)
    print(f"{args.tokens} tokens x {args.vocab} vocabulary, forward + backward, median of {args.repeats} "
          f"({torch.get_num_threads()} threads)")
    for s in sizes:
        mib = s * args.vocab * 4 / 2**20
        print(f"  {s:5d} rows/chunk ({mib:7.1f} MiB){' auto' if s == auto else '     '}: "
              f"{statistics.median(times[s]) * 1e3:7.1f} ms")
    print(f"auto ({auto} rows) / 1024 rows = {statistics.median(times[auto]) / statistics.median(times[1024]):.2f}")


if __name__ == "__main__":
    main()
