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


@pytest.mark.parametrize("bootstrap", [report.paired_bootstrap, report.nested_bootstrap])
def test_bootstrap_is_deterministic_and_brackets_the_mean(bootstrap):
    diffs = [np.array([0.0, 0.5, 0.0, 0.25]), np.array([0.0, 1.0, 0.0, 0.5])]
    first = bootstrap(diffs, n_boot=300, rng_seed=7)
    assert first == bootstrap(diffs, n_boot=300, rng_seed=7)
    mean = np.mean([d.mean() for d in diffs])
    assert first[0] < mean < first[1]
    same = [np.array([0.25, 0.25])] * 2  # no spread anywhere: a zero-width interval at the mean
    assert bootstrap(same, n_boot=50) == pytest.approx((0.25, 0.25))


def test_crossed_bootstrap_needs_the_same_problems_in_every_pair():
    uneven = [np.array([0.0, 0.5, 0.0]), np.array([0.0, 1.0, 0.0, 0.5])]
    with pytest.raises(ValueError, match="same problems"):
        report.paired_bootstrap(uneven)
    lo, hi = report.nested_bootstrap(uneven, n_boot=300)  # problems nested in seeds: fine
    assert lo < np.mean([d.mean() for d in uneven]) < hi


def test_identical_pairs_crossed_ci_is_the_one_pair_problem_bootstrap():
    # 3 seed pairs with the same per-problem differences (0, 1): resampling seeds changes nothing, so the
    # crossed interval is the one-pair problem bootstrap. Its resample mean is 0, 1/2, 1 with probability
    # 1/4, 1/2, 1/4: the 2.5 / 97.5 percentiles are 0 and 1 (a quarter of the draws at each end).
    # The nested scheme averages 3 independent problem draws per resample: mean = k/6, k ~ Binomial(6, 1/2),
    # P(k = 0) = 1/64 < 2.5 % < P(k <= 1) = 7/64, so its percentiles are 1/6 and 5/6 (too narrow).
    diffs = [np.array([0.0, 1.0])] * 3
    crossed = report.paired_bootstrap(diffs, n_boot=4000, rng_seed=3)
    assert crossed == pytest.approx(report.paired_bootstrap(diffs[:1], n_boot=4000, rng_seed=3))
    assert crossed == pytest.approx((0.0, 1.0))
    assert report.nested_bootstrap(diffs, n_boot=4000, rng_seed=3) == pytest.approx((1 / 6, 5 / 6))


def test_pair_constant_diffs_ci_comes_from_the_seeds_only():
    # every problem of pair j has the difference c_j = 0, 0, 1: resampling problems changes nothing and
    # the resample mean is k/3, k ~ Binomial(3, 1/3): P(k = 0) = 8/27, P(k = 3) = 1/27 = 3.7 % > 2.5 %,
    # so the interval is [0, 1] for both schemes.
    diffs = [np.full(6, c) for c in (0.0, 0.0, 1.0)]
    assert report.paired_bootstrap(diffs, n_boot=4000, rng_seed=5) == pytest.approx((0.0, 1.0))
    assert report.nested_bootstrap(diffs, n_boot=4000, rng_seed=5) == pytest.approx((0.0, 1.0))


def popvar(x):
    return float(np.mean((np.asarray(x) - np.mean(x)) ** 2))


def test_crossed_bootstrap_variance_keeps_the_problem_term():
    # 3 seed pairs x 6 problems: d = a_seed + b_problem + e (e: an interaction with zero row and column
    # sums). Given the table, the crossed bootstrap variance is exactly
    #   popvar(row means)/S + popvar(column means)/P + popvar(residuals)/(S P)
    # and the nested one popvar(row means)/S + mean within-row popvar/(S P): the problem term
    # popvar(b)/P shrinks to popvar(b)/(S P).
    a = np.array([-0.1, 0.0, 0.1])
    b = np.array([0.0, 0.0, 0.0, 0.5, 0.5, 1.0])
    e = 0.05 * np.array([[1, -1, 0, 0, 1, -1], [-1, 1, 0, 0, -1, 1], [0, 0, 0, 0, 0, 0]], dtype=float)
    table = a[:, None] + b[None, :] + e
    S, P = table.shape
    crossed_var = popvar(a) / S + popvar(b) / P + popvar(e) / (S * P)
    nested_var = popvar(a) / S + np.mean([popvar(row) for row in table]) / (S * P)
    # by hand: popvar(a)/3 = (0.02/3)/3 = 0.002222, popvar(b)/6 = (0.25 - 1/9)/6 = 0.023148,
    # popvar(e)/18 = (0.0025 * 8/18)/18 = 0.000062; within-row popvars 0.132222, 0.148889, 0.138889 (mean 0.14)
    assert crossed_var == pytest.approx(0.025432, abs=1e-6) and nested_var == pytest.approx(0.01)  # ratio 2.54
    draws = report.crossed_bootstrap_means(table, 40000, 11)
    assert draws.mean() == pytest.approx(table.mean(), abs=0.003)
    assert draws.var() == pytest.approx(crossed_var, rel=0.03)
    nested = report.nested_bootstrap_means(list(table), 40000, 11)
    assert nested.var() == pytest.approx(nested_var, rel=0.03)
    lo, hi = report.paired_bootstrap(list(table), n_boot=4000)
    nlo, nhi = report.nested_bootstrap(list(table), n_boot=4000)
    assert lo < nlo and hi > nhi and (hi - lo) > 1.4 * (nhi - nlo)


def test_problems_are_aligned_by_id_and_mismatched_ids_fall_back_to_nested():
    first = {"p1": 0.5, "p0": 0.0, "p2": 1.0}
    table = report.problem_table([first, {"p0": 0.25, "p2": 0.0, "p1": 1.0}])
    assert table.tolist() == [[0.0, 0.5, 1.0], [0.25, 1.0, 0.0]]  # columns p0, p1, p2 in both rows
    assert report.problem_table([first, {"p0": 0.0, "p1": 0.5, "p9": 1.0}]) is None

    def run(algo, seed, problems):
        ev = report.EvalResult(pass1=float(np.mean(list(problems.values()))), problems=problems)
        return report.Run(Path(f"/{algo}-{seed}"), algo, seed, {4: {}}, {4: ev})

    zeros = {"p0": 0.0, "p1": 0.0}
    other = {"p2": 0.0, "p3": 0.0}
    c = report.compare([run("hicra", 1, {"p0": 1.0, "p1": 0.0}), run("hicra", 2, {"p2": 0.5, "p3": 0.5})],
                       [run("grpo", 1, zeros), run("grpo", 2, other)], n_boot=200)
    assert c["mean_diff"] == pytest.approx(0.5)
    assert "nested" in c["ci_method"] and any("different problems" in n for n in c["notes"])


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


# ------------------------------------------------------------------- strategy dose-response (α x difficulty)
STEPS = range(1, 11)
GRPO_SLOPES = {0: 0.09, 1: 0.10, 2: 0.11}  # logit(share of "stepwise") = slope * (step - 5) on strat_hard
HARD_RATIO = {0.2: 1.6, 1.0: 0.5}  # HICRA slope = ratio * GRPO slope of the same seed
EASY_GRPO_SLOPES = {0: -0.05, 1: 0.0, 2: 0.05}  # mean 0: ratio undefined on strat_easy
MIXED_ACC = {"strat_hard": 0.3, "strat_easy": 0.8}
SEM_ENT = {"grpo": 0.5, "hicra": 0.7}


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def strategy_metrics(step, slope, data, algo, mixed=True):
    share = sigmoid(slope * (step - 5))
    row = {"step": step, "strategy/share=stepwise": share, "strategy/share=direct": 1 - share,
           "strategy/share=none": 0.0, "strategy/accuracy=stepwise": 0.7, "strategy/accuracy=direct": 0.4,
           "strategy/mixed_group_accuracy": MIXED_ACC[data] if mixed else float("nan"), "reward/accuracy": 0.55,
           "strategic/semantic_entropy": SEM_ENT[algo]}
    if step == STEPS[-1]:
        row[report.PASS1_KEY] = 0.4 if algo == "grpo" else 0.45
    return row


def make_strategy_run(root, data, algo, alpha, seed, slope, mixed=True):
    run = root / data / f"{algo}-a{alpha}-s{seed}"
    run.mkdir(parents=True)
    cfg = {"algorithm": {"name": algo, "hicra_alpha": alpha}, "data": {"name": data}, "trainer": {"seed": seed}}
    (run / "config.json").write_text(json.dumps(cfg))
    lines = [json.dumps(strategy_metrics(s, slope, data, algo, mixed)) for s in STEPS]  # NaN as the trainer writes it
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture(scope="module")
def strategy_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("alpha_x_difficulty")
    for seed, g in GRPO_SLOPES.items():
        make_strategy_run(root, "strat_hard", "grpo", 0.0, seed, g)
        for alpha, ratio in HARD_RATIO.items():
            make_strategy_run(root, "strat_hard", "hicra", alpha, seed, ratio * g)
    for seed, g in EASY_GRPO_SLOPES.items():
        make_strategy_run(root, "strat_easy", "grpo", 0.0, seed, g, mixed=False)
        for alpha in HARD_RATIO:
            make_strategy_run(root, "strat_easy", "hicra", alpha, seed + 3, 0.1, mixed=False)  # seeds 3-5
    summary = report.build_report([str(root)], root / "report", n_boot=1000)
    return root, summary


def by_data(summary, data):
    return next(d for d in summary["strategy"]["data"] if d["data"] == data)


def test_labels_split_alpha_and_data_only_when_needed():
    def run(algo, alpha, data):
        return report.Run(Path(f"/{algo}{alpha}{data}"), algo, 0, {}, alpha=alpha, data=data)

    one = report.label_runs([run("hicra", 0.2, "arith"), run("grpo", 0.0, "arith"), run("hicra", 0.2, "arith")])
    assert [r.group for r in one] == ["hicra", "grpo", "hicra"]
    two = report.label_runs([run("hicra", 0.2, "a"), run("hicra", 1.0, "a"), run("grpo", 0.0, "b")])
    assert [r.arm for r in two] == ["hicra α=0.2", "hicra α=1", "grpo"]
    assert [r.group for r in two] == ["a: hicra α=0.2", "a: hicra α=1", "b: grpo"]


def test_strategy_groups_and_comparisons_stay_within_a_data_config(strategy_built):
    root, summary = strategy_built
    assert list(summary["algorithms"]) == [
        "strat_easy: hicra α=0.2", "strat_easy: hicra α=1", "strat_easy: grpo",
        "strat_hard: hicra α=0.2", "strat_hard: hicra α=1", "strat_hard: grpo"]
    assert [(c["a"], c["b"]) for c in summary["comparisons"]] == [
        ("strat_easy: hicra α=0.2", "strat_easy: grpo"), ("strat_easy: hicra α=1", "strat_easy: grpo"),
        ("strat_hard: hicra α=0.2", "strat_hard: grpo"), ("strat_hard: hicra α=1", "strat_hard: grpo")]


def test_logit_clip_and_least_squares_slope():
    assert report.logit(np.array([0.0, 0.5, 1.0])) == pytest.approx([math.log(0.01 / 0.99), 0.0, math.log(99)])
    assert report.ls_slope(np.array([1, 2, 3]), np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert report.ls_slope(np.array([4]), np.array([1.0])) is None
    assert report.better_strategy({"direct": 0.4, "stepwise": 0.7}) == "stepwise"
    assert report.better_strategy({"b": 0.5, "a": 0.5}) == "a" and report.better_strategy({}) is None


def test_binomial_logistic_slope_by_hand():
    # two steps: the MLE of a two-parameter model fits both proportions exactly, b = logit(3/4) - logit(1/4)
    assert report.logistic_slope([0, 1], [0.25, 0.75], 4) == pytest.approx(2 * math.log(3))
    # exact logistic shares with a huge N: the slope is recovered
    steps = np.arange(1, 17)
    shares = 1 / (1 + np.exp(-0.3 * (steps - 5)))
    assert report.logistic_slope(steps, shares, 10**7) == pytest.approx(0.3, abs=1e-4)
    # saturated steps (share 1.0) still count: finite and positive while some step is mixed below them
    assert 0 < report.logistic_slope([0, 1, 2, 3], [0.25, 0.5, 1.0, 1.0], 4) < 50
    # no finite maximum: every step at 1, or separated (all 0 then all N), or one step
    assert report.logistic_slope([0, 1, 2], [1.0, 1.0, 1.0], 4) is None
    assert report.logistic_slope([0, 1, 2], [0.0, 1.0, 1.0], 4) is None
    assert report.logistic_slope([3], [0.5], 4) is None


def test_share_slope_uses_the_binomial_fit_when_the_run_knows_its_counts(tmp_path):
    shares = {1: 0.0, 2: 0.5, 3: 0.75}
    run = report.Run(tmp_path, "grpo", 0, {t: {"strategy/share=s": v} for t, v in shares.items()})
    # without counts: least squares on clipped logits (-4.595, 0, 1.0986): slope (4.595 + 1.0986) / 2
    assert report.share_slope(run, "s") == pytest.approx((math.log(99) + math.log(3)) / 2)
    run.responses_per_step = 4
    b = report.share_slope(run, "s")
    # the binomial MLE solves the score equations sum(k - n p) = 0 and sum(x (k - n p)) = 0
    x, k = np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 3.0])
    a = math.log(k.sum() / (4 * np.exp(b * x)).sum() * 1.0)  # first guess, then solve sum(k - n p) = 0 for a
    for _ in range(100):
        p = 1 / (1 + np.exp(-(a + b * x)))
        a += (k - 4 * p).sum() / (4 * p * (1 - p)).sum()
    p = 1 / (1 + np.exp(-(a + b * x)))
    assert abs((x * (k - 4 * p)).sum()) < 1e-8 and b != pytest.approx((math.log(99) + math.log(3)) / 2, rel=0.05)
    (tmp_path / "config.json").write_text(json.dumps({"algorithm": {"name": "grpo"}, "data": {"name": "d"},
                                                      "rollout": {"prompts_per_step": 16, "group_size": 4}}))
    assert report.read_config(tmp_path).responses_per_step == 64


def test_slopes_ratio_and_law_prediction(strategy_built):
    root, summary = strategy_built
    hard = by_data(summary, "strat_hard")
    assert hard["better_strategy"] == "stepwise"  # accuracy 0.7 vs 0.4
    assert hard["strategy_accuracy"] == pytest.approx({"direct": 0.4, "stepwise": 0.7})
    slopes = {(r["arm"], r["seed"]): r["slope"] for r in hard["runs"]}
    for seed, g in GRPO_SLOPES.items():  # exact logistic curves: the log-odds slope is the slope
        assert slopes[("grpo", seed)] == pytest.approx(g)
        assert slopes[("hicra α=0.2", seed)] == pytest.approx(1.6 * g)
    assert [r["pbar"] for r in hard["runs"]] == pytest.approx([0.3] * 9)
    assert {r["pbar_source"] for r in hard["runs"]} == {"strategy/mixed_group_accuracy"}
    arms = {a["arm"]: a for a in hard["arms"]}
    assert arms["grpo"]["slope"]["mean"] == pytest.approx(0.1) and arms["grpo"]["semantic_entropy"] == 0.5
    assert (arms["hicra α=0.2"]["final_pass1"], arms["grpo"]["final_pass1"]) == pytest.approx((0.45, 0.4))
    q = {r["alpha"]: r for r in hard["ratios"]}
    for alpha, ratio in HARD_RATIO.items():
        assert q[alpha]["paired"] and q[alpha]["ratio"] == pytest.approx(ratio)
        # paired by seed and HICRA slope = ratio x GRPO slope in every seed: every resample gives the ratio
        assert q[alpha]["ratio_ci"] == pytest.approx([ratio, ratio])
        assert q[alpha]["pbar"] == pytest.approx(0.3)
        assert q[alpha]["prediction"] == pytest.approx(1 + alpha * (1 - 2 * 0.3))  # 1.08 and 1.4
    # GRPO slopes 0.09, 0.10, 0.11: mean 0.1, sd 0.01, t(0.975, 2) = 4.3027 -> 0.1 ± 0.02484
    assert q[0.2]["grpo_slope_ci"] == pytest.approx([0.1 - 4.3027 * 0.01 / math.sqrt(3),
                                                     0.1 + 4.3027 * 0.01 / math.sqrt(3)], abs=1e-4)
    table = (root / "report" / "strategy_slopes.md").read_text()
    assert "| strat_hard | 0.20 | 3 vs 3 (by seed) |" in table and "| 1.600 | [+1.600, +1.600] | [+1.600, +1.600] | 0.300 | 1.080 |" in table


def test_an_arm_with_extra_seeds_is_compared_on_the_common_seeds_paired(tmp_path):
    """GRPO ran seeds 0-3, HICRA seeds 0-2: the ratio uses seeds 0-2 of both, paired by seed (GRPO seed 3,
    slope 0.5, would move an unpaired mean ratio from 1.6 to 1.6 x 0.1 / 0.2 = 0.8)."""
    slopes = {**GRPO_SLOPES, 3: 0.5}
    for seed, g in slopes.items():
        make_strategy_run(tmp_path, "strat_hard", "grpo", 0.0, seed, g)
        if seed in GRPO_SLOPES:
            make_strategy_run(tmp_path, "strat_hard", "hicra", 0.2, seed, 1.6 * g)
    summary = report.build_report([str(tmp_path)], tmp_path / "report", n_boot=200)
    (q,) = by_data(summary, "strat_hard")["ratios"]
    assert q["paired"] and (q["n_hicra"], q["n_grpo"]) == (3, 3)
    assert q["ratio"] == pytest.approx(1.6) and q["ratio_ci"] == pytest.approx([1.6, 1.6])
    assert q["ratio_t_ci"] == pytest.approx([1.6, 1.6])


def test_undistinguishable_grpo_slope_gives_no_ratio(strategy_built):
    root, summary = strategy_built
    easy = by_data(summary, "strat_easy")
    for q in easy["ratios"]:
        assert not q["paired"]  # HICRA seeds 3-5, GRPO seeds 0-2: resampled independently
        assert q["grpo_slope"] == pytest.approx(0.0, abs=1e-12) and q["ratio"] is None
        assert q["note"] == report.UNDEFINED_RATIO
        assert q["pbar"] == pytest.approx(0.55)  # no mixed-group accuracy logged: reward/accuracy
    table = (root / "report" / "strategy_slopes.md").read_text()
    assert table.count(report.UNDEFINED_RATIO) == 2


def test_log_ratio_t_interval_by_hand():
    # per-seed ratios 1 and 4: log ratios 0 and ln 4 = 1.3863; mean 0.6931, sd 0.9803, se 0.6931; t(0.975, 1)
    # = 12.706: exp(0.6931 -+ 8.8069) = [0.000299, 13365]
    lo, hi = report.log_ratio_t_interval(np.array([1.0, 4.0]), np.array([1.0, 1.0]))
    assert lo == pytest.approx(math.exp(0.693147 - 12.7062 * 0.693147), rel=1e-3)
    assert hi == pytest.approx(math.exp(0.693147 + 12.7062 * 0.693147), rel=1e-3)
    assert (lo, hi) == pytest.approx((2.993e-4, 1.3365e4), rel=2e-3)
    # the same ratio on every seed: a point; a slope <= 0 or one seed: no interval
    assert report.log_ratio_t_interval(np.array([0.2, 0.4, 0.3]), np.array([0.1, 0.2, 0.15])) == pytest.approx((2.0, 2.0))
    assert report.log_ratio_t_interval(np.array([0.2, -0.1]), np.array([0.1, 0.2])) is None
    assert report.log_ratio_t_interval(np.array([0.2]), np.array([0.1])) is None


def test_independent_ratio_ci_is_wider_than_paired():
    g = np.array([0.09, 0.10, 0.11])
    assert report.ratio_bootstrap(1.6 * g, g, paired=True, n_boot=2000) == pytest.approx((1.6, 1.6))
    lo, hi = report.ratio_bootstrap(1.6 * g, g, paired=False, n_boot=2000)
    # independent resamples: the ratio ranges over 1.6 * [0.09, 0.11] / [0.11, 0.09] = [1.309, 1.956]
    assert 1.6 * 0.09 / 0.11 <= lo < 1.6 < hi <= 1.6 * 0.11 / 0.09
    assert report.ratio_bootstrap(g, np.array([0.0, 0.0]), paired=False, n_boot=50) is None


def test_strategy_share_figure_and_summary(strategy_built):
    root, summary = strategy_built
    out = root / "report"
    fig = out / "strategy_share.png"
    assert str(fig) in summary["figures"] and fig.read_bytes()[:8] == PNG_SIGNATURE
    saved = json.loads((out / "summary.json").read_text())
    assert saved["strategy"]["clip"] == [0.01, 0.99]
    assert by_data(saved, "strat_hard")["ratios"][0]["ratio"] == pytest.approx(1.6)


def test_better_strategy_option_and_no_strategy_metrics(strategy_built, tmp_path):
    root, _ = strategy_built
    forced = report.build_report([str(root / "strat_hard")], tmp_path / "forced", n_boot=200, figures=False,
                                 better_strategy_name="direct")
    hard = by_data(forced, "strat_hard")
    assert hard["better_strategy"] == "direct" and hard["chosen_by"] == "option"
    assert {r["arm"]: r["slope"] for r in hard["runs"] if r["seed"] == 1}["grpo"] == pytest.approx(-0.1)
    plain = make_runs(tmp_path / "plain")
    summary = report.build_report([str(plain)], tmp_path / "plain-out", n_boot=100, figures=False)
    assert "strategy" not in summary and not (tmp_path / "plain-out" / "strategy_slopes.md").exists()
