"""benchmarks/bench_step.py takes the in-run GEMM reference's seconds out of the new path's step timings."""
from __future__ import annotations

from benchmark_scripts import load_benchmark


def _bench_step():
    return load_benchmark("bench_step.py", benchmarks_on_path=True)


def test_gemm_reference_seconds_leave_the_update_and_the_step():
    bench = _bench_step()
    rows = [{"timing/update_s": 30.0, "timing/step_s": 45.0, "timing/generate_s": 11.0, "perf/gemm_reference_s": 12.5},
            {"timing/update_s": 20.0, "timing/step_s": 33.0, "timing/generate_s": 10.0}]   # a step without it
    assert bench.without_gemm_reference(rows) == [
        {"timing/update_s": 17.5, "timing/step_s": 32.5, "timing/generate_s": 11.0, "perf/gemm_reference_s": 12.5},
        {"timing/update_s": 20.0, "timing/step_s": 33.0, "timing/generate_s": 10.0}]
    assert rows[0]["timing/step_s"] == 45.0   # the input rows are left as they were
    # the median of steps 2..N (step 1 warms up)
    assert bench.median_after_warmup([{"x": 100.0}, {"x": 3.0}, {"x": 1.0}, {"x": 2.0}], "x") == 2.0
