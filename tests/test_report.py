"""hicra-report on tiny fake runs (2 algorithms x 2 seeds, 3 eval problems x k=2) with hand-computed numbers."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from hicra_rl import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T, F = True, False
# per-run eval results: step -> per-problem correct lists (3 problems, k = 2)
EVALS = {
    ("hicra", 1): {2: [[T, F], [F, F], [F, F]],       # 1/6
                   4: [[T, T], [T, F], [F, F]],       # 3/6
                   6: [[T, T], [T, T], [T, T]]},      # 1 (only this run got to step 6)
    ("hicra", 2): {2: [[T, T], [F, F], [F, F]],       # 2/6
                   4: [[T, T], [T, T], [T, F]]},      # 5/6
    ("grpo", 1): {2: [[F, F], [F, F], [F, F]],        # 0
                  4: [[T, F], [F, F], [F, F]]},       # 1/6
    ("grpo", 2): {2: [[T, T], [T, T], [F, F]],        # 4/6
                  4: [[T, T], [F, F], [T, F]]},       # 3/6
}
# by hand: final step 4 for both algorithms (step 6 is not common to all hicra runs)
HICRA_FINAL = (3 / 6, 5 / 6)
GRPO_FINAL = (1 / 6, 3 / 6)
HICRA_BEST = (1.0, 5 / 6)
GRPO_BEST = (1 / 6, 4 / 6)
PAIRED_DIFF = ((3 / 6 - 1 / 6) + (5 / 6 - 3 / 6)) / 2  # = 1/3


def sample_std(a, b):
    """Sample std (n - 1) of two numbers: |a - b| / sqrt(2)."""
    return abs(a - b) / math.sqrt(2)


def pass1(correct):
    return float(np.mean([np.mean(c) for c in correct]))


def reward_at(algo, seed, step):
    return 0.1 * step + (0.2 if algo == "hicra" else 0.0) + 0.01 * seed


def metric_row(algo, seed, step):
    row = {"step": step, "reward/mean": reward_at(algo, seed, step), "response/length_mean": 100.0 + step,
           "strategic/semantic_entropy": 1.0 + 0.1 * step, "token_entropy/planning": 0.9,
           "token_entropy/execution": 0.4, "relative_perplexity/planning": None}
    if algo == "hicra":
        row.update({"strategy/cluster=0": 0.5, "strategy/cluster=1": 0.2 + 0.01 * step})
    if step in EVALS[(algo, seed)]:
        row[report.PASS1_KEY] = pass1(EVALS[(algo, seed)][step])
    return row


def make_run(root: Path, algo: str, seed: int, last_step: int, *, torn_tail: bool = False,
             eval_files: bool = True) -> Path:
    run = root / f"{algo}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algorithm": {"name": algo}, "trainer": {"seed": seed}}))
    lines = [json.dumps(metric_row(algo, seed, s)) for s in range(1, last_step + 1)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + ('{"step": 7, "reward/me' if torn_tail else ""))
    for step, correct in EVALS[(algo, seed)].items():
        if eval_files and step <= last_step:
            rows = [{"id": f"p{i}", "correct": c} for i, c in enumerate(correct)]
            body = {"metrics": {report.PASS1_KEY: pass1(correct), "eval/pass@2": 0.0}, "rows": rows}
            (run / f"eval-step{step}.json").write_text(json.dumps(body))
    return run


def make_runs(root: Path, **kw) -> Path:
    make_run(root, "hicra", 1, 6, torn_tail=True, **kw)  # still running: a torn last line
    make_run(root, "hicra", 2, 4, **kw)
    make_run(root, "grpo", 1, 4, **kw)
    make_run(root, "grpo", 2, 5, **kw)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = make_runs(tmp_path_factory.mktemp("runs"))
    summary = report.build_report([str(root)], n_boot=500)
    return root, summary


def test_png_figures_are_valid(built):
    import matplotlib.image

    root, summary = built
    out = root / "report"
    assert Path(summary["out"]) == out
    names = {Path(p).name for p in summary["figures"]}
    assert {"dynamics.png", "pass_at_1.png", "token_entropy.png", "relative_perplexity.png",
            "strategy_usage.png"} <= names
    for p in summary["figures"]:
        assert Path(p).read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(p).ndim == 3
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_table_numbers_match_hand_computation(built):
    root, summary = built
    h, g = summary["algorithms"]["hicra"], summary["algorithms"]["grpo"]
    assert list(summary["algorithms"]) == ["hicra", "grpo"]
    assert h["n_seeds"] == g["n_seeds"] == 2 and h["final_step"] == g["final_step"] == 4
    assert h["final_pass1"]["mean"] == pytest.approx(np.mean(HICRA_FINAL))
    assert h["final_pass1"]["std"] == pytest.approx(sample_std(*HICRA_FINAL))
    assert h["best_pass1"]["mean"] == pytest.approx(np.mean(HICRA_BEST))
    assert h["best_pass1"]["std"] == pytest.approx(sample_std(*HICRA_BEST))
    assert g["final_pass1"]["mean"] == pytest.approx(np.mean(GRPO_FINAL))
    assert g["best_pass1"]["mean"] == pytest.approx(np.mean(GRPO_BEST))
    table = (root / "report" / "table.md").read_text()
    assert (f"| hicra | 2 | 4 | {np.mean(HICRA_FINAL):.4f} ± {sample_std(*HICRA_FINAL):.4f} | "
            f"{np.mean(HICRA_BEST):.4f} ± {sample_std(*HICRA_BEST):.4f} |") in table
    assert (f"| grpo | 2 | 4 | {np.mean(GRPO_FINAL):.4f} ± {sample_std(*GRPO_FINAL):.4f} | "
            f"{np.mean(GRPO_BEST):.4f} ± {sample_std(*GRPO_BEST):.4f} |") in table
    assert json.loads((root / "report" / "summary.json").read_text())["algorithms"] == summary["algorithms"]


def test_paired_difference_and_bootstrap_ci(built):
    root, summary = built
    (c,) = summary["comparisons"]
    assert (c["a"], c["b"], c["seeds"], c["step"], c["n_problems"]) == ("hicra", "grpo", [1, 2], 4, 3)
    assert c["mean_diff"] == pytest.approx(PAIRED_DIFF)
    assert c["ci_method"].startswith("paired bootstrap over problems and seeds")
    lo, hi = c["ci"]
    assert -1 <= lo < PAIRED_DIFF < hi <= 1
    table = (root / "report" / "table.md").read_text()
    assert f"| hicra − grpo | 2 (1, 2) | 4 | {PAIRED_DIFF:+.4f} | [{lo:+.4f}, {hi:+.4f}] | paired bootstrap" in table


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    diffs = [np.array([0.0, 0.5, 0.0]), np.array([0.0, 1.0, 0.0, 0.5])]
    first = report.paired_bootstrap(diffs, n_boot=300, rng_seed=7)
    assert first == report.paired_bootstrap(diffs, n_boot=300, rng_seed=7)
    mean = np.mean([d.mean() for d in diffs])
    assert first[0] < mean < first[1]
    same = [np.array([0.25, 0.25])] * 2  # no spread anywhere: a zero-width interval at the mean
    assert report.paired_bootstrap(same, n_boot=50) == pytest.approx((0.25, 0.25))


def test_report_is_deterministic(built, tmp_path):
    root, summary = built
    again = report.build_report([str(root / "hicra-s1"), str(root / "hicra-s2"), str(root / "grpo-s*")],
                                tmp_path / "again", n_boot=500, figures=False)
    assert again["comparisons"] == summary["comparisons"]


def test_t_interval_when_eval_rows_are_missing(tmp_path):
    make_runs(tmp_path / "runs", eval_files=False)  # Pass@1 only in metrics.jsonl
    summary = report.build_report([str(tmp_path / "runs")], tmp_path / "out", figures=False)
    (c,) = summary["comparisons"]
    assert c["mean_diff"] == pytest.approx(PAIRED_DIFF)
    assert c["ci_method"].startswith("t-interval")
    # both seed differences are 1/3: zero spread, so the interval is the point
    assert c["ci"] == pytest.approx([PAIRED_DIFF, PAIRED_DIFF])


def test_t_interval_by_hand():
    lo, hi = report.t_interval([0.2, 0.4])  # mean 0.3, se = 0.1414 / sqrt(2) = 0.1, t(0.975, 1) = 12.706
    assert (lo, hi) == pytest.approx((0.3 - 1.27062, 0.3 + 1.27062), abs=1e-4)
    assert report.t_interval([0.5]) is None


def test_t_quantile_fallback_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 61):
        assert report.t_quantile_975_fallback(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-3)


def test_torn_last_line_is_skipped(tmp_path):
    run = make_run(tmp_path, "hicra", 1, 6, torn_tail=True)
    metrics = report.read_metrics(run / "metrics.jsonl")
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    assert "relative_perplexity/planning" not in metrics[1]  # null is a missing value


def test_torn_middle_line_names_file_and_line(tmp_path):
    run = make_run(tmp_path, "grpo", 1, 4)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:15]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not valid JSON") as e:
        report.load_run(run)
    assert str(run / "metrics.jsonl") in str(e.value)


def test_run_dir_without_metrics_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "hicra-s1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"algorithm": {"name": "hicra"}, "trainer": {"seed": 1}}))
    with pytest.raises(FileNotFoundError, match="has config.json but no metrics.jsonl"):
        report.find_run_dirs([str(run)])
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        report.load_run(run)
    with pytest.raises(FileNotFoundError, match="no run directories"):
        report.find_run_dirs([str(tmp_path)])
    assert report.main([str(run), "--no-figures"]) == 2
    assert "hicra-report: error:" in capsys.readouterr().err


def test_steps_seen_by_some_seeds_use_those_seeds():
    band = report.aggregate([{1: 1.0, 2: 3.0}, {1: 2.0}])
    assert band.steps.tolist() == [1, 2] and band.n.tolist() == [2, 1]
    assert band.mean.tolist() == [1.5, 3.0] and band.lo.tolist() == [1.0, 3.0] and band.hi.tolist() == [2.0, 3.0]
    assert report.aggregate([{}, {}]) is None


def test_no_eval_data_and_no_baseline(tmp_path):
    run = tmp_path / "runs" / "entropy_reg-s3"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algorithm": {"name": "entropy_reg"}, "trainer": {"seed": 3}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    assert report.main([str(run), "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| entropy_reg | 1 | – | no eval data | no eval data |" in table
    assert "No paired differences" in table
    assert (tmp_path / "out" / "dynamics.png").read_bytes()[:8] == PNG_SIGNATURE
