"""benchmarks/learning_curve.py's report on hand-made evaluation files, against values computed by hand."""
import json

import numpy as np
import pytest

from tests.benchmark_scripts import load_benchmark

lc = load_benchmark("learning_curve.py", benchmarks_on_path=True)


def write_eval(folder, step, correct_by_problem):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": pid, "correct": c} for pid, c in correct_by_problem.items()]
    (folder / f"eval-step{step}.json").write_text(json.dumps({"metrics": {}, "rows": rows}))


def test_tables_align_problems_and_keep_only_steps_every_run_has(tmp_path):
    a, b = tmp_path / "hicra-s0", tmp_path / "hicra-s1"
    write_eval(a, 0, {"p2": [True, False], "p1": [False, False]})
    write_eval(a, 10, {"p1": [True, True], "p2": [True, False]})
    write_eval(b, 0, {"p1": [True, False], "p2": [True, True]})
    write_eval(b, 10, {"p2": [False, False], "p1": [True, False]})
    write_eval(b, 20, {"p1": [True, True], "p2": [True, True]})   # only run b: left out
    tables = lc.eval_tables([a, b])
    assert sorted(tables) == [0, 10]
    # columns in problem-id order p1, p2; per-problem Pass@1 = mean of the k flags
    assert tables[0].tolist() == [[0.0, 0.5], [0.5, 1.0]]
    assert tables[10].tolist() == [[1.0, 0.5], [0.5, 0.0]]


def test_tables_refuse_runs_scored_on_other_problems(tmp_path):
    a, b = tmp_path / "hicra-s0", tmp_path / "hicra-s1"
    write_eval(a, 0, {"p1": [True]})
    write_eval(b, 0, {"p9": [True]})
    with pytest.raises(SystemExit, match="scores other problems"):
        lc.eval_tables([a, b])


def test_crossed_interval_is_degenerate_for_a_constant_table_and_brackets_the_mean():
    assert lc.crossed_interval(np.full((3, 5), 0.25)) == pytest.approx((0.25, 0.25, 0.25))
    table = np.array([[0.0, 1.0, 0.5, 0.5], [1.0, 0.0, 0.5, 1.0]])
    m, lo, hi = lc.crossed_interval(table)
    assert m == pytest.approx(4.5 / 8)
    assert 0.0 <= lo < m < hi <= 1.0


def test_report_gain_is_last_minus_first_paired_on_problems(tmp_path):
    a, b = tmp_path / "hicra-s0", tmp_path / "hicra-s1"
    write_eval(a, 0, {"p1": [False, False], "p2": [True, False]})
    write_eval(a, 40, {"p1": [True, False], "p2": [True, True]})
    write_eval(b, 0, {"p1": [False, True], "p2": [False, False]})
    write_eval(b, 40, {"p1": [True, True], "p2": [True, False]})
    text = lc.report([a, b], tmp_path / "out")
    # step 0: (0 + 0.5 + 0.5 + 0) / 4 = 0.25; step 40: (0.5 + 1 + 1 + 0.5) / 4 = 0.75; gain +50 points
    assert "| 0 | 0.250 |" in text and "| 40 | 0.750 |" in text
    assert "| +0.0 points [+0.0, +0.0] |" in text and "| +50.0 points [" in text
    assert "Gain step 0 → 40: +50.0 points" in text
    assert "hicra-s0 0.250 → 0.750, hicra-s1 0.250 → 0.750" in text
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["gain"][0] == pytest.approx(0.5)
    assert (tmp_path / "out" / "learning_curve.png").stat().st_size > 0
