"""benchmarks/rm_cpu_report.py's pure parts against values computed by hand."""
import json

import numpy as np
import pytest

from tests.benchmark_scripts import load_benchmark

rm_report = load_benchmark("rm_cpu_report.py")


def test_gains_are_paired_on_problems_and_the_difference_is_against_the_same_seed():
    # rows: the reward-model run, the verifier run of the same seed, another verifier seed; 4 problems
    tables = {0: np.array([[0, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=float),
              10: np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]], dtype=float)}
    first, last = rm_report.gain_rows(tables)
    assert first["gain"] == (0.0, 0.0, 0.0) and first["difference"] == (0.0, 0.0, 0.0)
    assert last["step"] == 10 and last["pass1"] == 1.0
    assert last["gain"][0] == pytest.approx(0.5)                       # per problem 1, 1, 0, 0
    assert last["verifier_gain_same_seed"][0] == pytest.approx(0.25)   # 0, 0, 0, 1
    assert last["verifier_gains_per_seed"] == pytest.approx([0.25, 0.25])
    assert last["difference"][0] == pytest.approx(0.25)                # 1, 1, 0, -1
    lo, hi = last["difference"][1:]
    assert -1.0 <= lo < 0.25 < hi <= 1.0


def test_training_blocks_average_blocks_of_steps_and_leave_missing_keys_empty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward/mean": 0.5, "reward/accuracy": s / 100, "response/length_mean": 40.0 + s}
            for s in range(1, 13)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"step": 12, "eval/pass@1": 0.4}) + "\n")
    first, second = rm_report.training_blocks(path)
    assert first["steps"] == "1-10" and first["reward/accuracy"] == pytest.approx(0.055)
    assert second["steps"] == "11-20" and second["reward/accuracy"] == pytest.approx(0.115)
    assert second["response/length_mean"] == pytest.approx(51.5)
    assert first["reward/model_mean"] is None


def test_above_gold_share_counts_numeric_answers_over_the_gold(tmp_path):
    path = tmp_path / "eval-step10.json"
    rows = [{"answer": "12", "extracted": ["13", "12", "-40"]},       # 1 of 3 above
            {"answer": "-5", "extracted": ["0", None, "abc"]},        # 1 of 1 numeric above
            {"answer": "n/a", "extracted": ["7"]}]                    # gold not a number: left out
    path.write_text(json.dumps({"metrics": {}, "rows": rows}))
    assert rm_report.above_gold_share(path) == pytest.approx(2 / 4)
