"""Where the learner's update time goes: one HICRA update of the default step's shape under torch.profiler.

    python benchmarks/profile_learner.py [--zero-stage 0] [--cold-start DIR]

The DeepSpeed learner alone (no Ray, no vLLM), world size 1, the CPU default's layout, on the first real
batch ``bench_learner`` uses (a default run's dumped step: 16 prompt groups of 4 responses, packed groups,
micro-batches of 16). After one warm-up update it profiles a second one and prints the top operators by self time, then the matrix
multiplies: their total FLOPs, seconds and GFLOP/s, and the same for each distinct shape. Compare the
matmul rate with the GEMM figure of ``benchmarks/bench_step.py`` (same machine): what is left of the
update time is attention, element-wise work, the log-softmax over the vocabulary and the optimizer.
"""
from __future__ import annotations

import argparse
import time

from bench_learner import DEFAULT_COLD_START, default_learner, dumped_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument("--cold-start", default=DEFAULT_COLD_START)
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    learner = default_learner(args.cold_start, args.port, args.zero_stage)
    batch = dumped_batches(args.cold_start)[0]
    learner.update(batch)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        t0 = time.perf_counter()
        learner.update(batch)
        print(f"update (profiled): {time.perf_counter() - t0:.1f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    flops = seconds = 0.0
    shapes = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::mm":
            shapes.append((e.self_cpu_time_total / 1e6, e.flops, e.count, str(e.input_shapes)[:80]))
            flops += e.flops
            seconds += e.self_cpu_time_total / 1e6
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    print(f"aten::mm: {flops / 1e9:.0f} GFLOP in {seconds:.1f} s = {flops / 1e9 / seconds:.0f} GFLOP/s; "
          f"{100 * seconds / total:.0f} % of the profiled update's self time ({total:.1f} s)")
    for s, f, n, shape in sorted(shapes, reverse=True)[:12]:
        print(f"  {s:6.2f} s {f / 1e9:7.1f} GFLOP {f / 1e9 / max(s, 1e-9):5.0f} GFLOP/s x{n} {shape}")


if __name__ == "__main__":
    main()
