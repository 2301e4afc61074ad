"""``hicra-report``: figures, a Markdown table and a JSON summary comparing training runs (HICRA vs GRPO vs
entropy regularisation ...), in the style of the paper's training-dynamics figures.

Runs are grouped by ``config.json``'s ``algorithm.name``; each figure line is the mean over an algorithm's
seeds with a min–max band. The table gives final / best held-out Pass@1 per algorithm and the paired
(by seed) difference of final Pass@1 against GRPO with a 95% confidence interval. See docs/report.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hicra_rl.iofiles import write_text_atomic

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
EVAL_FILE_RE = re.compile(r"eval-step(\d+)\.json")
PASS1_KEY = "eval/pass@1"
CLUSTER_PREFIX = "strategy/cluster="
BASELINE = "grpo"
ALGORITHM_ORDER = ("hicra", "grpo", "entropy_reg", "dr_grpo", "hicra_adaptive")
BAND_NOTE = "line = mean over seeds, band = min–max over seeds"
PARTIAL_NOTE = "hollow circle = step logged by fewer seeds than the algorithm has (n in legend)"
DEFAULT_BOOTSTRAP = 4000
DEFAULT_RNG_SEED = 0
TOP_CLUSTERS = 8
# two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30 (used when scipy is not installed)
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z975 = 1.959964


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class EvalResult:
    """One held-out evaluation of a run: Pass@1 and, when the eval file has rows, per-problem Pass@1."""

    pass1: float | None = None
    problems: dict[str, float] | None = None


@dataclass
class Run:
    """One training run: where it is, what it ran, and what it logged."""

    path: Path
    algorithm: str
    seed: int | None
    metrics: dict[int, dict[str, float]]
    evals: dict[int, EvalResult] = field(default_factory=dict)

    @property
    def last_step(self) -> int | None:
        return max(self.metrics, default=None)

    def series(self, key: str) -> dict[int, float]:
        """Step -> value of one metric (held-out Pass@1 also from the eval files)."""
        if key == PASS1_KEY:
            return {s: e.pass1 for s, e in sorted(self.evals.items()) if e.pass1 is not None}
        return {s: row[key] for s, row in sorted(self.metrics.items()) if key in row}

    def cluster_keys(self) -> set[str]:
        return {k for row in self.metrics.values() for k in row if k.startswith(CLUSTER_PREFIX)}


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """``metrics.jsonl`` as step -> {key: finite value}. A torn last line (a run still writing) is
    skipped; any other undecodable line is a ValueError naming the file and line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out: dict[int, dict[str, float]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not _finite_number(row.get("step")):
            raise ValueError(f"{path}: line {i + 1} is not a JSON object with a numeric 'step'")
        out[int(row["step"])] = {k: float(v) for k, v in row.items() if k != "step" and _finite_number(v)}
    return out


def per_problem_pass1(rows: list[dict]) -> dict[str, float]:
    """Problem id -> mean of its ``correct`` list (Pass@1 averaged over the k samples)."""
    out = {}
    for r in rows:
        correct = r.get("correct") or []
        if correct:
            out[str(r.get("id"))] = float(np.mean([bool(c) for c in correct]))
    return out


def read_eval_file(path: Path) -> EvalResult:
    """One ``eval-step<N>.json``: its Pass@1 (from ``metrics``, else from the rows) and per-problem Pass@1."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    problems = per_problem_pass1(data.get("rows") or []) or None
    pass1 = (data.get("metrics") or {}).get(PASS1_KEY)
    if not _finite_number(pass1):
        pass1 = float(np.mean(list(problems.values()))) if problems else None
    return EvalResult(pass1=pass1, problems=problems)


def read_evals(run_dir: Path, metrics: dict[int, dict[str, float]]) -> dict[int, EvalResult]:
    """Held-out evaluations by step: the eval files, with ``eval/pass@1`` of metrics.jsonl preferred."""
    evals = {}
    for p in run_dir.iterdir():
        m = EVAL_FILE_RE.fullmatch(p.name)
        if m and p.is_file():
            evals[int(m.group(1))] = read_eval_file(p)
    for step, row in metrics.items():
        if PASS1_KEY in row:
            evals.setdefault(step, EvalResult()).pass1 = row[PASS1_KEY]
    return dict(sorted(evals.items()))


def read_config(run_dir: Path) -> tuple[str, int | None]:
    """(algorithm name, seed) from the run's ``config.json``."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE} (needed for the algorithm name)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        name = cfg["algorithm"]["name"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read algorithm.name ({e})") from None
    seed = (cfg.get("trainer") or {}).get("seed")
    return str(name), (int(seed) if _finite_number(seed) else None)


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read one run directory (config.json, metrics.jsonl, eval-step*.json)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no {METRICS_FILE})")
    algorithm, seed = read_config(run_dir)
    metrics = read_metrics(metrics_path)
    return Run(run_dir, algorithm, seed, metrics, read_evals(run_dir, metrics))


def find_run_dirs(args: list[str]) -> list[Path]:
    """Run directories named by ``args``: a run dir itself, a glob, or a parent searched for metrics.jsonl."""
    found: dict[Path, None] = {}
    for arg in args:
        paths = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        if not paths:
            raise FileNotFoundError(f"{arg}: matches nothing")
        for p in map(Path, paths):
            found.update(dict.fromkeys(_run_dirs_at(p)))
    return list(found)


def _run_dirs_at(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    if (path / METRICS_FILE).is_file():
        return [path.resolve()]
    if (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: has {CONFIG_FILE} but no {METRICS_FILE} (has the run logged a step yet?)")
    below = sorted(p.parent.resolve() for p in path.rglob(METRICS_FILE))
    if not below:
        raise FileNotFoundError(f"{path}: no run directories (with {METRICS_FILE}) in it or below it")
    return below


def algorithm_sort_key(name: str) -> tuple[int, str]:
    return (ALGORITHM_ORDER.index(name) if name in ALGORITHM_ORDER else len(ALGORITHM_ORDER), name)


def group_by_algorithm(runs: list[Run]) -> dict[str, list[Run]]:
    """Algorithm -> its runs (sorted by seed), algorithms in the order hicra, grpo, entropy_reg, dr_grpo, others."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.algorithm, []).append(r)
    return {a: sorted(groups[a], key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
            for a in sorted(groups, key=algorithm_sort_key)}


# ------------------------------------------------------------------------------------- aggregation
@dataclass
class Band:
    """A metric across seeds, step by step: mean, min, max and how many seeds logged the step."""

    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: np.ndarray


def aggregate(series: list[dict[int, float]]) -> Band | None:
    """Align per-seed series on steps; a step logged by only some seeds uses those seeds."""
    steps = sorted(set().union(*series)) if series else []
    if not steps:
        return None
    values = [[s[step] for s in series if step in s] for step in steps]
    return Band(np.array(steps), np.array([np.mean(v) for v in values]), np.array([min(v) for v in values]),
                np.array([max(v) for v in values]), np.array([len(v) for v in values]))


def mean_std(values: list[float]) -> dict[str, Any]:
    """n, mean and sample standard deviation (n − 1; None for one value) of ``values``."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "values": []}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"n": len(values), "mean": float(np.mean(values)), "std": std, "values": [float(v) for v in values]}


def last_common_eval_step(runs: list[Run]) -> int | None:
    """The last step at which every run of ``runs`` has a held-out Pass@1."""
    common = set.intersection(*({s for s, e in r.evals.items() if e.pass1 is not None} for r in runs))
    return max(common, default=None)


def algorithm_summary(runs: list[Run]) -> dict[str, Any]:
    """Seeds, final held-out Pass@1 (last eval step common to all runs) and best Pass@1 (max per run)."""
    with_eval = [r for r in runs if r.series(PASS1_KEY)]
    final_step = last_common_eval_step(runs)
    final = [r.evals[final_step].pass1 for r in runs] if final_step is not None else []
    note = None
    if not with_eval:
        note = "no eval data"
    elif final_step is None:
        note = f"no eval step common to all {len(runs)} runs"
    return {
        "n_seeds": len(runs), "seeds": [r.seed for r in runs], "runs": [str(r.path) for r in runs],
        "final_step": final_step, "final_pass1": mean_std(final),
        "best_pass1": mean_std([max(r.series(PASS1_KEY).values()) for r in with_eval]),
        "runs_with_eval": len(with_eval), "note": note,
    }


# ------------------------------------------------------------------------------------------ stats
def t_quantile_975(df: int) -> float:
    """t(0.975, df): scipy when installed, else the table (df ≤ 30) or a Cornish–Fisher expansion."""
    try:
        from scipy.stats import t
    except ImportError:
        return t_quantile_975_fallback(df)
    return float(t.ppf(0.975, df))


def t_quantile_975_fallback(df: int) -> float:
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(diffs: list[float]) -> tuple[float, float] | None:
    """95% Student-t interval of the mean of ``diffs`` (None with fewer than two)."""
    if len(diffs) < 2:
        return None
    m, se = float(np.mean(diffs)), float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
    half = t_quantile_975(len(diffs) - 1) * se
    return m - half, m + half


def paired_bootstrap(pair_diffs: list[np.ndarray], n_boot: int = DEFAULT_BOOTSTRAP,
                     rng_seed: int = DEFAULT_RNG_SEED) -> tuple[float, float]:
    """95% percentile interval of the mean paired difference, resampling seed pairs with replacement and,
    within each drawn pair, its problems with replacement. ``pair_diffs[j]``: per-problem Pass@1
    differences of seed pair j. Deterministic for a given ``rng_seed``."""
    if n_boot < 1 or not pair_diffs or any(d.size == 0 for d in pair_diffs):
        raise ValueError("paired_bootstrap needs n_boot >= 1 and at least one problem in each of >= 1 pairs")
    rng = np.random.default_rng(rng_seed)
    n_pairs = len(pair_diffs)
    picks = rng.integers(0, n_pairs, size=(n_boot, n_pairs))
    totals = np.zeros(n_boot)
    for slot in range(n_pairs):
        for j, diffs in enumerate(pair_diffs):
            drawn = picks[:, slot] == j
            totals[drawn] += _resampled_means(diffs, int(drawn.sum()), rng)
    lo, hi = np.percentile(totals / n_pairs, [2.5, 97.5])
    return float(lo), float(hi)


def _resampled_means(values: np.ndarray, n: int, rng: np.random.Generator, max_cells: int = 2_000_000) -> np.ndarray:
    """Means of ``n`` resamples (with replacement) of ``values``, drawn in chunks to bound memory."""
    chunk = max(1, max_cells // max(1, values.size))
    parts = [values[rng.integers(0, values.size, size=(min(chunk, n - i), values.size))].mean(axis=1)
             for i in range(0, n, chunk)]
    return np.concatenate(parts) if parts else np.zeros(0)


def pair_by_seed(a_runs: list[Run], b_runs: list[Run]) -> tuple[list[tuple[Run, Run]], list[str]]:
    """Runs of the two algorithms with the same seed; seeds missing or repeated are left out (noted)."""
    notes = []
    by_seed = []
    for runs in (a_runs, b_runs):
        seeds = [r.seed for r in runs]
        repeated = sorted({s for s in seeds if s is not None and seeds.count(s) > 1})
        if repeated:
            notes.append(f"{runs[0].algorithm}: seeds {repeated} appear more than once, not paired")
        if None in seeds:
            notes.append(f"{runs[0].algorithm}: {seeds.count(None)} run(s) without trainer.seed, not paired")
        by_seed.append({r.seed: r for r in runs if r.seed is not None and r.seed not in repeated})
    seeds = sorted(set(by_seed[0]) & set(by_seed[1]))
    return [(by_seed[0][s], by_seed[1][s]) for s in seeds], notes


def problem_diffs(a: EvalResult, b: EvalResult) -> np.ndarray | None:
    """Per-problem Pass@1 differences a − b (None unless both have rows for the same problems)."""
    if not a.problems or not b.problems or set(a.problems) != set(b.problems):
        return None
    ids = sorted(a.problems)
    return np.array([a.problems[i] - b.problems[i] for i in ids])


def compare(a_runs: list[Run], b_runs: list[Run], n_boot: int = DEFAULT_BOOTSTRAP,
            rng_seed: int = DEFAULT_RNG_SEED) -> dict[str, Any]:
    """Paired (by seed) difference of final held-out Pass@1, algorithm a − algorithm b, with a 95% CI."""
    a_name, b_name = a_runs[0].algorithm, b_runs[0].algorithm
    pairs, notes = pair_by_seed(a_runs, b_runs)
    out: dict[str, Any] = {"a": a_name, "b": b_name, "seeds": [a.seed for a, _ in pairs], "step": None,
                           "mean_diff": None, "diffs": [], "ci": None, "ci_method": None, "n_problems": None,
                           "notes": notes}
    if not pairs:
        notes.append(f"no seed run by both {a_name} and {b_name}")
        return out
    step = last_common_eval_step([r for pair in pairs for r in pair])
    if step is None:
        notes.append("no eval step common to all paired runs")
        return out
    diffs = [a.evals[step].pass1 - b.evals[step].pass1 for a, b in pairs]
    out.update(step=step, mean_diff=float(np.mean(diffs)), diffs=[float(d) for d in diffs])
    out.update(confidence_interval(pairs, step, diffs, n_boot, rng_seed, notes))
    return out


def confidence_interval(pairs: list[tuple[Run, Run]], step: int, diffs: list[float], n_boot: int,
                        rng_seed: int, notes: list[str]) -> dict[str, Any]:
    """Paired bootstrap over problems and seeds when every pair has per-problem rows, else a t-interval."""
    per_problem = [problem_diffs(a.evals[step], b.evals[step]) for a, b in pairs]
    if all(d is not None for d in per_problem):
        ci = paired_bootstrap(per_problem, n_boot, rng_seed)
        method = f"paired bootstrap over problems and seeds (B={n_boot}, rng seed {rng_seed}, percentile 2.5/97.5)"
        return {"ci": list(ci), "ci_method": method, "n_problems": int(per_problem[0].size)}
    notes.append(f"per-problem eval rows missing or not the same problems at step {step}: t-interval over seeds")
    ci = t_interval(diffs)
    if ci is None:
        notes.append("one seed pair: no confidence interval")
    return {"ci": list(ci) if ci else None, "ci_method": f"t-interval over seed differences (df={len(diffs) - 1})"}


# ---------------------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class Panel:
    """One metric panel: file stem, title and the (metric key, line style, label) drawn per algorithm."""

    name: str
    title: str
    lines: tuple[tuple[str, str, str], ...]


PANELS = (
    Panel("pass_at_1", "Held-out Pass@1", ((PASS1_KEY, "-", ""),)),
    Panel("semantic_entropy", "Semantic entropy (nats)", (("strategic/semantic_entropy", "-", ""),)),
    Panel("token_entropy", "Token entropy: planning (solid) vs execution (dashed)",
          (("token_entropy/planning", "-", "planning"), ("token_entropy/execution", "--", "execution"))),
    Panel("relative_perplexity", "Relative perplexity: planning (solid) vs execution (dashed)",
          (("relative_perplexity/planning", "-", "planning"), ("relative_perplexity/execution", "--", "execution"))),
    Panel("reward", "Reward (mean)", (("reward/mean", "-", ""),)),
    Panel("response_length", "Response length (tokens)", (("response/length_mean", "-", ""),)),
)


def algorithm_colors(algorithms: list[str]) -> dict[str, str]:
    fixed = {"hicra": "tab:red", "grpo": "tab:blue", "entropy_reg": "tab:green", "dr_grpo": "tab:orange",
             "hicra_adaptive": "tab:purple"}
    spare = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"] * 10)
    return {a: fixed.get(a) or next(spare) for a in algorithms}


def n_label(band: Band, n_runs: int) -> str:
    lo, hi = int(band.n.min()), int(band.n.max())
    return f"n={n_runs}" if lo == hi == n_runs else f"n={lo}–{hi} of {n_runs} seeds per step"


def draw_band(ax, band: Band, n_runs: int, color: str, style: str, label: str, marker: str | None) -> None:
    """Mean line, min–max band, and hollow circles where fewer than all seeds logged the step."""
    ax.fill_between(band.steps, band.lo, band.hi, color=color, alpha=0.18, linewidth=0)
    ax.plot(band.steps, band.mean, style, color=color, marker=marker, markersize=3, label=label)
    partial = band.n < n_runs
    if partial.any():
        ax.plot(band.steps[partial], band.mean[partial], linestyle="none", marker="o", markersize=6,
                markerfacecolor="none", color=color)


def style_axes(ax, ylabel: str | None = None) -> None:
    """Integer training-step ticks, a light grid and a small legend."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def mark_no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=12, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_metric_panel(ax, panel: Panel, groups: dict[str, list[Run]], colors: dict[str, str]) -> None:
    """One metric panel: a mean line with a min–max band per algorithm (and per line style)."""
    drawn = False
    for algo, runs in groups.items():
        for key, style, sub in panel.lines:
            band = aggregate([r.series(key) for r in runs])
            if band is None:
                continue
            label = f"{algo}{' ' + sub if sub else ''} ({n_label(band, len(runs))})"
            draw_band(ax, band, len(runs), colors[algo], style, label, "." if key == PASS1_KEY else None)
            drawn = True
    ax.set_title(panel.title, fontsize=10)
    if not drawn:
        mark_no_data(ax)
        return
    style_axes(ax)


def cluster_sort_key(key: str) -> tuple[int, Any]:
    cid = key[len(CLUSTER_PREFIX):]
    return (0, int(cid), "") if cid.lstrip("-").isdigit() else (1, 0, cid)


def cluster_bands(runs: list[Run]) -> dict[str, Band]:
    """Cluster key -> its usage across seeds, clusters in id order."""
    keys = sorted(set().union(*(r.cluster_keys() for r in runs)), key=cluster_sort_key)
    bands = {k: aggregate([r.series(k) for r in runs]) for k in keys}
    return {k: b for k, b in bands.items() if b is not None}


def draw_strategy_panel(ax, algo: str, runs: list[Run], top: int = TOP_CLUSTERS) -> None:
    """Strategy usage of one algorithm: a line per cluster (mean over seeds), the ``top`` most used."""
    bands = cluster_bands(runs)
    if not bands:
        ax.set_title(f"Strategy usage: {algo}", fontsize=10)
        mark_no_data(ax)
        return
    shown = sorted(bands, key=lambda k: -float(bands[k].mean.mean()))[:top]
    for i, key in enumerate(sorted(shown, key=cluster_sort_key)):
        draw_band(ax, bands[key], len(runs), f"C{i % 10}", "-", f"cluster {key[len(CLUSTER_PREFIX):]}", None)
    ax.set_title(f"Strategy usage: {algo} (top {len(shown)} of {len(bands)} clusters, n={len(runs)} seeds)",
                 fontsize=10)
    style_axes(ax, "share of responses")


def new_figure(n_panels: int, ncols: int = 3):
    """A Figure (no pyplot state, Agg canvas) and its flat list of axes; unused axes hidden."""
    from matplotlib.figure import Figure

    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def save_figure_atomic(fig, path: Path) -> Path:
    """Write a PNG to a temp file in the same folder, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def draw_all(axes: list, panels: tuple[Panel, ...], groups: dict[str, list[Run]], colors: dict[str, str]) -> None:
    """Metric panels first, then one strategy-usage panel per algorithm."""
    for ax, panel in zip(axes, panels):
        draw_metric_panel(ax, panel, groups, colors)
    for ax, (algo, runs) in zip(axes[len(panels):], groups.items()):
        draw_strategy_panel(ax, algo, runs)


def write_figures(groups: dict[str, list[Run]], out: Path) -> list[Path]:
    """``dynamics.png`` (every panel in a grid), one PNG per metric panel and ``strategy_usage.png``."""
    colors = algorithm_colors(list(groups))
    fig, axes = new_figure(len(PANELS) + len(groups))
    draw_all(axes, PANELS, groups, colors)
    fig.suptitle(f"Training dynamics by algorithm — {BAND_NOTE}; {PARTIAL_NOTE}", fontsize=11)
    written = [save_figure_atomic(fig, out / "dynamics.png")]
    for panel in PANELS:
        fig, axes = new_figure(1)
        draw_metric_panel(axes[0], panel, groups, colors)
        fig.suptitle(f"{BAND_NOTE}\n{PARTIAL_NOTE}", fontsize=8)
        written.append(save_figure_atomic(fig, out / f"{panel.name}.png"))
    fig, axes = new_figure(len(groups), ncols=2)
    draw_all(axes, (), groups, colors)
    fig.suptitle(f"{BAND_NOTE}\n{PARTIAL_NOTE}", fontsize=8)
    written.append(save_figure_atomic(fig, out / "strategy_usage.png"))
    return written


# ------------------------------------------------------------------------------------------- table
def fmt(v: float | None, signed: bool = False) -> str:
    return "–" if v is None else (f"{v:+.4f}" if signed else f"{v:.4f}")


def fmt_mean_std(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "–"
    return fmt(stats["mean"]) + (f" ± {fmt(stats['std'])}" if stats["std"] is not None else " (1 seed)")


def algorithm_row(algo: str, s: dict[str, Any]) -> str:
    final = "no eval data" if s["note"] == "no eval data" else fmt_mean_std(s["final_pass1"])
    best = "no eval data" if s["note"] == "no eval data" else fmt_mean_std(s["best_pass1"])
    step = "–" if s["final_step"] is None else str(s["final_step"])
    return f"| {algo} | {s['n_seeds']} | {step} | {final} | {best} |"


def comparison_row(c: dict[str, Any]) -> str:
    ci = "–" if c["ci"] is None else f"[{fmt(c['ci'][0], True)}, {fmt(c['ci'][1], True)}]"
    seeds = f"{len(c['seeds'])} ({', '.join(map(str, c['seeds']))})" if c["seeds"] else "0"
    step = "–" if c["step"] is None else str(c["step"])
    problems = "–" if c["n_problems"] is None else str(c["n_problems"])
    return (f"| {c['a']} − {c['b']} | {seeds} | {step} | {fmt(c['mean_diff'], True)} | {ci} | "
            f"{c['ci_method'] or '–'} | {problems} |")


def render_table(summary: dict[str, Any]) -> str:
    """``table.md``: per-algorithm held-out Pass@1 and paired differences against GRPO."""
    lines = ["# Run comparison", "", f"{len(summary['runs'])} runs. Held-out Pass@1 = `{PASS1_KEY}` "
             "(averaged over the k eval samples per problem).", "",
             "| algorithm | seeds | final step | final Pass@1 (mean ± std) | best Pass@1 (mean ± std) |",
             "| --- | ---: | ---: | --- | --- |"]
    lines += [algorithm_row(a, s) for a, s in summary["algorithms"].items()]
    lines += ["", "final = the last eval step common to all runs of the algorithm; best = max over a run's eval "
              "steps; ± = sample standard deviation over seeds (n − 1)."]
    lines += [f"- {a}: {s['note']}" for a, s in summary["algorithms"].items() if s["note"]]
    lines += ["", "## Paired differences of final Pass@1 (same seed)", ""]
    if not summary["comparisons"]:
        lines.append(f"No paired differences: no {BASELINE} runs, or no other algorithm.")
        return "\n".join(lines) + "\n"
    lines += ["| comparison | seed pairs | step | mean difference | 95% CI | CI method | problems |",
              "| --- | --- | ---: | ---: | --- | --- | ---: |"]
    lines += [comparison_row(c) for c in summary["comparisons"]]
    lines += [""] + [f"- {c['a']} − {c['b']}: {n}" for c in summary["comparisons"] for n in c["notes"]]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ report
def default_out_dir(run_dirs: list[Path]) -> Path:
    """``<common parent of the run dirs>/report``."""
    return Path(os.path.commonpath([str(p.parent) for p in run_dirs])) / "report"


def summarise(groups: dict[str, list[Run]], n_boot: int, rng_seed: int) -> dict[str, Any]:
    """The numbers of table.md (and summary.json)."""
    comparisons = []
    if BASELINE in groups:
        comparisons = [compare(runs, groups[BASELINE], n_boot, rng_seed) for a, runs in groups.items() if a != BASELINE]
    return {
        "band": BAND_NOTE,
        "runs": [{"path": str(r.path), "algorithm": r.algorithm, "seed": r.seed, "last_step": r.last_step,
                  "eval_steps": sorted(s for s, e in r.evals.items() if e.pass1 is not None)}
                 for runs in groups.values() for r in runs],
        "algorithms": {a: algorithm_summary(runs) for a, runs in groups.items()},
        "comparisons": comparisons,
    }


def build_report(paths: list[str], out: str | os.PathLike | None = None, *, n_boot: int = DEFAULT_BOOTSTRAP,
                 rng_seed: int = DEFAULT_RNG_SEED, figures: bool = True) -> dict[str, Any]:
    """Read the runs, write the figures, ``table.md`` and ``summary.json`` into ``out``; return the summary."""
    run_dirs = find_run_dirs(paths)
    groups = group_by_algorithm([load_run(d) for d in run_dirs])
    out = Path(out) if out is not None else default_out_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(groups, n_boot, rng_seed)
    summary["out"] = str(out)
    summary["figures"] = [str(p) for p in write_figures(groups, out)] if figures else []
    write_text_atomic(out / "table.md", render_table(summary))
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hicra-report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories (or globs, or parent folders searched for metrics.jsonl)")
    p.add_argument("--out", default=None, help="output folder (default: <common parent>/report)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap resamples (default %(default)s)")
    p.add_argument("--rng-seed", type=int, default=DEFAULT_RNG_SEED, help="bootstrap RNG seed (default %(default)s)")
    p.add_argument("--no-figures", action="store_true", help="write only table.md and summary.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = build_report(args.run_dirs, args.out, n_boot=args.bootstrap, rng_seed=args.rng_seed,
                               figures=not args.no_figures)
    except (FileNotFoundError, ValueError) as e:
        print(f"hicra-report: error: {e}", file=sys.stderr)
        return 2
    print(f"hicra-report: {len(summary['runs'])} runs, {len(summary['algorithms'])} algorithms -> {summary['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
