"""``hicra-report``: figures, a Markdown table and a JSON summary comparing training runs (HICRA vs GRPO vs
entropy regularisation ...), in the style of the paper's training-dynamics figures.

Runs are grouped by ``config.json``'s ``algorithm.name`` (split by ``algorithm.hicra_alpha`` and
``data.name`` when the runs have several); each figure line is the mean over a group's seeds with a
min–max band. The table gives final / best held-out Pass@1 per group and the paired (by seed) difference
of final Pass@1 against GRPO with a 95% confidence interval (a bootstrap over crossed seeds × problems).
Runs that log ``strategy/share=<name>`` also get ``strategy_share.png`` and ``strategy_slopes.md``: the
better strategy's log-odds slope per run and the HICRA / GRPO slope ratio against 1 + α(1 − 2p̄).
See docs/report.md.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hicra_rl.errors import BadInputError, InputNotFoundError, UserInputError, print_user_error
from hicra_rl.fmt import fmt_float
from hicra_rl.iofiles import write_text_atomic
from hicra_rl.law import hicra_over_grpo_push

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
    alpha: float | None = None  # algorithm.hicra_alpha
    data: str | None = None  # data.name
    arm: str = ""  # algorithm, with " α=<alpha>" when the algorithm's runs have several α (set by label_runs)
    group: str = ""  # the report's group: arm, prefixed "<data.name>: " when the runs have several data.name
    responses_per_step: int | None = None  # N of each step's shares (binomial log-odds slope)

    def __post_init__(self) -> None:
        self.arm = self.arm or self.algorithm
        self.group = self.group or self.arm

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
            raise BadInputError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not _finite_number(row.get("step")):
            raise BadInputError(f"{path}: line {i + 1} is not a JSON object with a numeric 'step'")
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
        raise BadInputError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
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


@dataclass(frozen=True)
class RunConfig:
    """What the report needs from a run's ``config.json``."""

    algorithm: str
    seed: int | None = None
    alpha: float | None = None
    data: str | None = None
    responses_per_step: int | None = None  # rollout.prompts_per_step x rollout.group_size


def read_config(run_dir: Path) -> RunConfig:
    """Algorithm name, ``trainer.seed``, ``algorithm.hicra_alpha`` and ``data.name`` from ``config.json``."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise InputNotFoundError(f"{run_dir}: no {CONFIG_FILE} (needed for the algorithm name)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        name = cfg["algorithm"]["name"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BadInputError(f"{path}: cannot read algorithm.name ({e})") from None
    seed = (cfg.get("trainer") or {}).get("seed")
    alpha = cfg["algorithm"].get("hicra_alpha")
    data = cfg["data"].get("name") if isinstance(cfg.get("data"), dict) else None
    rollout = cfg.get("rollout") if isinstance(cfg.get("rollout"), dict) else {}
    prompts, group = rollout.get("prompts_per_step"), rollout.get("group_size")
    n = int(prompts) * int(group) if _finite_number(prompts) and _finite_number(group) else None
    return RunConfig(str(name), int(seed) if _finite_number(seed) else None,
                     float(alpha) if _finite_number(alpha) else None, None if data is None else str(data), n)


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read one run directory (config.json, metrics.jsonl, eval-step*.json)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise InputNotFoundError(f"{run_dir}: not a run directory (no {METRICS_FILE})")
    cfg = read_config(run_dir)
    metrics = read_metrics(metrics_path)
    return Run(run_dir, cfg.algorithm, cfg.seed, metrics, read_evals(run_dir, metrics), cfg.alpha, cfg.data,
               responses_per_step=cfg.responses_per_step)


def find_run_dirs(args: list[str]) -> list[Path]:
    """Run directories named by ``args``: a run dir itself, a glob, or a parent searched for metrics.jsonl."""
    found: dict[Path, None] = {}
    for arg in args:
        paths = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        if not paths:
            raise InputNotFoundError(f"{arg}: matches nothing")
        for p in map(Path, paths):
            found.update(dict.fromkeys(_run_dirs_at(p)))
    return list(found)


def _run_dirs_at(path: Path) -> list[Path]:
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such directory")
    if not path.is_dir():
        raise BadInputError(f"{path}: not a directory")
    if (path / METRICS_FILE).is_file():
        return [path.resolve()]
    if (path / CONFIG_FILE).is_file():
        raise InputNotFoundError(f"{path}: has {CONFIG_FILE} but no {METRICS_FILE} (has the run logged a step yet?)")
    below = sorted(p.parent.resolve() for p in path.rglob(METRICS_FILE))
    if not below:
        raise InputNotFoundError(f"{path}: no run directories (with {METRICS_FILE}) in it or below it")
    return below


def algorithm_sort_key(name: str) -> tuple[int, str]:
    return (ALGORITHM_ORDER.index(name) if name in ALGORITHM_ORDER else len(ALGORITHM_ORDER), name)


def alpha_label(algorithm: str, alpha: float | None) -> str:
    """``hicra α=0.2``; the bare name when α is unknown."""
    return algorithm if alpha is None else f"{algorithm} α={alpha:g}"


def label_runs(runs: list[Run]) -> list[Run]:
    """Copies of ``runs`` with ``arm`` and ``group`` set. An algorithm whose runs all share one α keeps its
    bare name (``hicra``), else each run is ``hicra α=<alpha>`` so that two α values never merge; the group
    is prefixed with ``<data.name>: `` when the runs cover several data configs."""
    alphas: dict[str, set] = {}
    for r in runs:
        alphas.setdefault(r.algorithm, set()).add(r.alpha)
    several_data = len({r.data for r in runs}) > 1
    out = []
    for r in runs:
        arm = r.algorithm if len(alphas[r.algorithm]) == 1 else alpha_label(r.algorithm, r.alpha)
        out.append(replace(r, arm=arm, group=f"{r.data}: {arm}" if several_data else arm))
    return out


def group_sort_key(run: Run) -> tuple:
    return (run.data is None, run.data or "", algorithm_sort_key(run.algorithm), run.alpha is None, run.alpha or 0.0)


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Group (see ``label_runs``) -> its runs (sorted by seed); groups by data.name, then in the algorithm
    order hicra, grpo, entropy_reg, dr_grpo, hicra_adaptive, others, then by α."""
    groups: dict[str, list[Run]] = {}
    for r in label_runs(runs):
        groups.setdefault(r.group, []).append(r)
    order = sorted(groups, key=lambda g: group_sort_key(groups[g][0]))
    return {g: sorted(groups[g], key=lambda r: (r.seed is None, r.seed or 0, str(r.path))) for g in order}


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
    """95% percentile interval of the mean paired difference when seeds and problems are **crossed**
    (every seed pair scored on the same problems): ``pair_diffs[j][p]`` is the Pass@1 difference of seed
    pair j on problem p, problems in the same order in every pair. Deterministic for a given ``rng_seed``.

    One resample draws the S seed pairs with replacement and, once for that resample, the P problems with
    replacement, shared by every drawn pair (a two-way, "pigeonhole" bootstrap), and takes the mean of the
    S × P drawn cells. Why: with crossed random effects d_jp = μ + a_j + b_p + e_jp, the mean over S × P
    cells has Var ≈ σ²_seed/S + σ²_problem/P + σ²_inter/(SP). A problem that is hard for one seed pair's
    difference is hard for every pair, so b_p does not average out over seeds; drawing problems separately
    inside each pair would pretend it does and shrink the σ²_problem/P term to σ²_problem/(SP). The
    bootstrap variance of this scheme is exactly v_seed/S + v_problem/P + v_inter/(SP), the population
    variances of the table's row means, column means and residuals; its expectation counts the interaction
    about three times (Owen 2007, "The pigeonhole bootstrap"), so the interval errs on the wide side by
    O(σ²_inter/(SP)), small next to the other terms unless S·P is tiny.

    Vectorised: with seed weights w (draw counts / S) and problem weights v (draw counts / P), the
    resample mean is wᵀ D v. Problems are drawn first, so with identical pairs (seed resampling changes
    nothing) the interval equals the one-pair problem bootstrap of the same ``rng_seed``."""
    if n_boot < 1 or not pair_diffs or any(d.size == 0 for d in pair_diffs):
        raise ValueError("paired_bootstrap needs n_boot >= 1 and at least one problem in each of >= 1 pairs")
    if len({d.size for d in pair_diffs}) != 1:
        raise ValueError("paired_bootstrap needs the same problems (in the same order) in every seed pair; "
                         "use nested_bootstrap when problems are nested in seeds")
    lo, hi = np.percentile(crossed_bootstrap_means(np.stack(pair_diffs), n_boot, rng_seed), [2.5, 97.5])
    return float(lo), float(hi)


def crossed_bootstrap_means(table: np.ndarray, n_boot: int, rng_seed: int) -> np.ndarray:
    """The ``n_boot`` resample means of ``paired_bootstrap`` for a seed pairs × problems ``table``."""
    table = np.asarray(table, dtype=float)
    rng = np.random.default_rng(rng_seed)
    n_pairs = table.shape[0]
    pair_means = _problem_resampled_pair_means(table, n_boot, rng)  # (n_boot, S): each pair under one draw
    seed_w = rng.multinomial(n_pairs, np.full(n_pairs, 1 / n_pairs), size=n_boot) / n_pairs
    return (seed_w * pair_means).sum(axis=1)


def _problem_resampled_pair_means(table: np.ndarray, n_boot: int, rng: np.random.Generator,
                                  max_cells: int = 2_000_000) -> np.ndarray:
    """(n_boot, S): every row of ``table`` (S × P) averaged under the same problem resample per draw
    (problem weights = multinomial draw counts / P), drawn in chunks to bound memory."""
    n_problems = table.shape[1]
    chunk = max(1, max_cells // n_problems)
    probs = np.full(n_problems, 1 / n_problems)
    parts = [rng.multinomial(n_problems, probs, size=min(chunk, n_boot - i)) @ table.T / n_problems
             for i in range(0, n_boot, chunk)]
    return np.concatenate(parts)


def nested_bootstrap(pair_diffs: list[np.ndarray], n_boot: int = DEFAULT_BOOTSTRAP,
                     rng_seed: int = DEFAULT_RNG_SEED) -> tuple[float, float]:
    """95% percentile interval of the mean paired difference when problems are **nested** in seed pairs
    (each pair scored on its own problems): resample seed pairs with replacement and, within each drawn
    pair, its problems with replacement, independently per pair. Only right when the pairs' problems
    differ; on crossed data it shrinks the problem variance by about 1/S (see ``paired_bootstrap``).
    Deterministic for a given ``rng_seed``."""
    if n_boot < 1 or not pair_diffs or any(d.size == 0 for d in pair_diffs):
        raise ValueError("nested_bootstrap needs n_boot >= 1 and at least one problem in each of >= 1 pairs")
    lo, hi = np.percentile(nested_bootstrap_means(pair_diffs, n_boot, rng_seed), [2.5, 97.5])
    return float(lo), float(hi)


def nested_bootstrap_means(pair_diffs: list[np.ndarray], n_boot: int, rng_seed: int) -> np.ndarray:
    """The ``n_boot`` resample means of ``nested_bootstrap``."""
    rng = np.random.default_rng(rng_seed)
    n_pairs = len(pair_diffs)
    picks = rng.integers(0, n_pairs, size=(n_boot, n_pairs))
    totals = np.zeros(n_boot)
    for slot in range(n_pairs):
        for j, diffs in enumerate(pair_diffs):
            drawn = picks[:, slot] == j
            totals[drawn] += _resampled_means(np.asarray(diffs, dtype=float), int(drawn.sum()), rng)
    return totals / n_pairs


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
            notes.append(f"{runs[0].group}: seeds {repeated} appear more than once, not paired")
        if None in seeds:
            notes.append(f"{runs[0].group}: {seeds.count(None)} run(s) without trainer.seed, not paired")
        by_seed.append({r.seed: r for r in runs if r.seed is not None and r.seed not in repeated})
    seeds = sorted(set(by_seed[0]) & set(by_seed[1]))
    return [(by_seed[0][s], by_seed[1][s]) for s in seeds], notes


def problem_diffs(a: EvalResult, b: EvalResult) -> dict[str, float] | None:
    """Problem id -> Pass@1 difference a − b (None unless both have rows for the same problems)."""
    if not a.problems or not b.problems or set(a.problems) != set(b.problems):
        return None
    return {i: a.problems[i] - b.problems[i] for i in sorted(a.problems)}


def problem_table(per_pair: list[dict[str, float]]) -> np.ndarray | None:
    """Seed pairs × problems matrix of differences, problems aligned by id (sorted); None unless every
    pair has the same problem ids (then problems are not crossed with seeds)."""
    ids = sorted(per_pair[0])
    if any(sorted(d) != ids for d in per_pair[1:]):
        return None
    return np.array([[d[i] for i in ids] for d in per_pair], dtype=float)


def compare(a_runs: list[Run], b_runs: list[Run], n_boot: int = DEFAULT_BOOTSTRAP,
            rng_seed: int = DEFAULT_RNG_SEED) -> dict[str, Any]:
    """Paired (by seed) difference of final held-out Pass@1, algorithm a − algorithm b, with a 95% CI."""
    a_name, b_name = a_runs[0].group, b_runs[0].group
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
    """Bootstrap over problems and seeds when every pair has per-problem rows (crossed when every pair has
    the same problems, else nested, with a note), else a t-interval over the seed differences."""
    per_problem = [problem_diffs(a.evals[step], b.evals[step]) for a, b in pairs]
    if all(d is not None for d in per_problem):
        boot = f"B={n_boot}, rng seed {rng_seed}, percentile 2.5/97.5"
        table = problem_table(per_problem)
        if table is not None:
            ci = paired_bootstrap(list(table), n_boot, rng_seed)
            method = f"paired bootstrap over problems and seeds, crossed: one problem resample for all pairs ({boot})"
            return {"ci": list(ci), "ci_method": method, "n_problems": int(table.shape[1])}
        notes.append(f"seed pairs were evaluated on different problems at step {step}: problems nested in seeds")
        ci = nested_bootstrap([np.array(list(d.values())) for d in per_problem], n_boot, rng_seed)
        method = f"paired bootstrap over problems and seeds, nested: problems resampled within each pair ({boot})"
        sizes = sorted({len(d) for d in per_problem})
        return {"ci": list(ci), "ci_method": method, "n_problems": sizes[0] if len(sizes) == 1 else None}
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


def arm_colors(arms: list[list[Run]]) -> dict[str, str]:
    """GRPO blue, then one colour per other arm (HICRA α values from red on) in the arms' order."""
    spare = iter(["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 10)
    return {a[0].arm: "tab:blue" if a[0].algorithm == BASELINE else next(spare) for a in arms}


def draw_share_panel(ax, data: str | None, arms: list[list[Run]], strategy: str | None) -> None:
    """Share of the better strategy over steps: one line per arm (α), mean over seeds, min–max band."""
    ax.set_title(f"data {data}: share of {strategy!r}" if strategy else f"data {data}: no better strategy",
                 fontsize=10)
    colors, drawn = arm_colors(arms), False
    for runs in arms if strategy else []:
        band = aggregate([r.series(SHARE_PREFIX + strategy) for r in runs])
        if band is not None:
            draw_band(ax, band, len(runs), colors[runs[0].arm], "-", f"{runs[0].arm} ({n_label(band, len(runs))})",
                      None)
            drawn = True
    if not drawn:
        mark_no_data(ax)
        return
    ax.set_ylim(-0.02, 1.02)
    style_axes(ax, "share of responses")


def write_strategy_figure(groups: dict[str, list[Run]], strategy: dict[str, Any], out: Path) -> Path:
    """``strategy_share.png``: one panel per data config (``draw_share_panel``)."""
    fig, axes = new_figure(len(strategy["data"]), ncols=2)
    for ax, d in zip(axes, strategy["data"]):
        arms = [runs for runs in groups.values() if runs[0].data == d["data"]]
        draw_share_panel(ax, d["data"], arms, d["better_strategy"])
    fig.suptitle(f"Share of the better strategy — {BAND_NOTE}\n{PARTIAL_NOTE}", fontsize=8)
    return save_figure_atomic(fig, out / "strategy_share.png")


# ------------------------------------------------------------------------------------------- table
def fmt(v: float | None, signed: bool = False) -> str:
    return "–" if v is None else fmt_float(v, "+.4f" if signed else ".4f")


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


# -------------------------------------------------------------------------- strategy dose-response
SHARE_PREFIX = "strategy/share="
STRATEGY_ACC_PREFIX = "strategy/accuracy="
MIXED_ACC_KEY = "strategy/mixed_group_accuracy"
ACCURACY_KEY = "reward/accuracy"
SEMANTIC_ENTROPY_KEY = "strategic/semantic_entropy"
NO_STRATEGY = "none"
HICRA = "hicra"
LOGIT_CLIP = 0.01  # shares are clipped to [0.01, 0.99] before the logit (0.5/N for N = 50 responses a step)
UNDEFINED_RATIO = "GRPO slope not distinguishable from 0: ratio undefined"


def strategy_names(runs: list[Run]) -> list[str]:
    """Strategies with a ``strategy/share=<name>`` in any run (``none`` left out), sorted."""
    keys = {k for r in runs for row in r.metrics.values() for k in row if k.startswith(SHARE_PREFIX)}
    return sorted(n for n in (k[len(SHARE_PREFIX):] for k in keys) if n != NO_STRATEGY)


def strategy_accuracies(runs: list[Run]) -> dict[str, float]:
    """Strategy -> mean of ``strategy/accuracy=<name>`` over every (run, step) that logged it (NaN steps,
    where no response used the strategy, are not in the metrics)."""
    out = {}
    for name in strategy_names(runs):
        values = [v for r in runs for v in r.series(STRATEGY_ACC_PREFIX + name).values()]
        if values:
            out[name] = float(np.mean(values))
    return out


def better_strategy(accuracies: dict[str, float]) -> str | None:
    """The strategy with the highest mean accuracy (ties: the first name in sorted order)."""
    return min(accuracies, key=lambda n: (-accuracies[n], n), default=None)


def logit(p: np.ndarray, clip: float = LOGIT_CLIP) -> np.ndarray:
    """log(p / (1 − p)) of p clipped to [clip, 1 − clip] (a share of 0 or 1 has no finite log-odds)."""
    p = np.clip(np.asarray(p, dtype=float), clip, 1 - clip)
    return np.log(p / (1 - p))


def ls_slope(x: np.ndarray, y: np.ndarray) -> float | None:
    """Least-squares slope of y on x (None with fewer than two distinct x)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 2 or np.ptp(x) == 0:
        return None
    dx = x - x.mean()
    return float(dx @ (y - y.mean()) / (dx @ dx))


def logistic_slope(steps, shares, n: int, max_iter: int = 100) -> float | None:
    """Maximum-likelihood slope b of logit P(strategy) = a + b·step, from each step's share of ``n``
    responses (binomial counts round(share·n)): a logistic regression by Newton's method. Unlike a
    least-squares fit of clipped log-odds, steps where the share is 0 or 1 (a saturated choice) count with
    their binomial weight instead of a clip constant. None when the fit has no finite maximum (every step at
    0, or at n, or the steps separated into all-0 then all-n) or fewer than two distinct steps."""
    x = np.asarray(steps, dtype=float)
    k = np.rint(np.asarray(shares, dtype=float) * n)
    if x.size < 2 or np.ptp(x) == 0 or k.sum() in (0, n * x.size):
        return None
    xc = x - x.mean()
    design = np.stack([np.ones_like(xc), xc], axis=1)
    beta = np.zeros(2)
    for _ in range(max_iter):
        p = 1 / (1 + np.exp(-(design @ beta)))
        grad = design.T @ (k - n * p)
        hess = (design * (n * p * (1 - p))[:, None]).T @ design
        if np.linalg.cond(hess) > 1e12:
            return None
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            return float(beta[1]) if abs(beta[1]) < 50 else None
    return None


def share_slope(run: Run, strategy: str) -> float | None:
    """Slope over steps of the log-odds of choosing ``strategy`` in one run: the binomial maximum-likelihood
    slope when the run's responses per step are known (config.json), else least squares on clipped logits."""
    series = run.series(SHARE_PREFIX + strategy)
    if not series:
        return None
    steps, shares = np.array(list(series)), np.array(list(series.values()))
    if run.responses_per_step:
        return logistic_slope(steps, shares, run.responses_per_step)
    return ls_slope(steps, logit(shares))


def series_mean(series: dict[int, float]) -> float | None:
    return float(np.mean(list(series.values()))) if series else None


def mean_accuracy(run: Run) -> tuple[float | None, str | None]:
    """(p̄, its key): ``strategy/mixed_group_accuracy`` averaged over steps, else ``reward/accuracy``."""
    for key in (MIXED_ACC_KEY, ACCURACY_KEY):
        value = series_mean(run.series(key))
        if value is not None:
            return value, key
    return None, None


def strategy_run_row(run: Run, strategy: str) -> dict[str, Any]:
    """One run's slope, p̄ and mean semantic entropy."""
    pbar, source = mean_accuracy(run)
    return {"path": str(run.path), "data": run.data, "arm": run.arm, "algorithm": run.algorithm,
            "alpha": run.alpha, "seed": run.seed, "strategy": strategy, "slope": share_slope(run, strategy),
            "n_steps": len(run.series(SHARE_PREFIX + strategy)), "pbar": pbar, "pbar_source": source,
            "semantic_entropy": series_mean(run.series(SEMANTIC_ENTROPY_KEY))}


def mean_or_none(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def arm_summary(runs: list[Run], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: slope mean ± std over seeds, mean p̄, mean semantic entropy, final held-out Pass@1."""
    final = algorithm_summary(runs)["final_pass1"]
    return {"data": runs[0].data, "arm": runs[0].arm, "algorithm": runs[0].algorithm, "alpha": runs[0].alpha,
            "seeds": [r.seed for r in runs], "slope": mean_std([r["slope"] for r in rows if r["slope"] is not None]),
            "pbar": mean_or_none([r["pbar"] for r in rows]),
            "semantic_entropy": mean_or_none([r["semantic_entropy"] for r in rows]),
            "final_pass1": final["mean"]}


def common_seeds(a: list[Run], b: list[Run]) -> set[int] | None:
    """The seeds both arms ran, when each arm ran distinct seeds (each once); None otherwise (unknown or repeated
    seeds: no pairing)."""
    sa, sb = [r.seed for r in a], [r.seed for r in b]
    if None in sa or None in sb or len(set(sa)) != len(sa) or len(set(sb)) != len(sb):
        return None
    return set(sa) & set(sb)


def ratio_bootstrap(num: np.ndarray, den: np.ndarray, paired: bool, n_boot: int = DEFAULT_BOOTSTRAP,
                    rng_seed: int = DEFAULT_RNG_SEED) -> tuple[float, float] | None:
    """95% percentile interval of mean(num) / mean(den) over seeds: resample seeds with replacement, the
    same seeds for both arms when ``paired`` (num[i] and den[i] are the same seed), else each arm on its
    own. None when a resample's denominator is 0. Deterministic for a given ``rng_seed``."""
    rng = np.random.default_rng(rng_seed)
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    pick_num = rng.integers(0, num.size, size=(n_boot, num.size))
    pick_den = pick_num if paired else rng.integers(0, den.size, size=(n_boot, den.size))
    den_means = den[pick_den].mean(axis=1)
    if np.any(den_means == 0):
        return None
    lo, hi = np.percentile(num[pick_num].mean(axis=1) / den_means, [2.5, 97.5])
    return float(lo), float(hi)


def log_ratio_t_interval(num: np.ndarray, den: np.ndarray) -> tuple[float, float] | None:
    """95% interval of the ratio from the seeds' paired log ratios log(num[i] / den[i]): Student-t with n − 1
    degrees of freedom, mapped back with exp (an interval for the geometric mean of the per-seed ratios).
    With 2–3 seeds the percentile bootstrap of ``ratio_bootstrap`` can draw only a handful of distinct
    resamples and is far too narrow; this one carries the small-sample t quantile (12.7 at 2 seeds).
    None with fewer than two pairs or a slope <= 0 (no log)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if num.size < 2 or num.size != den.size or np.any(num <= 0) or np.any(den <= 0):
        return None
    lo, hi = t_interval(np.log(num / den).tolist())
    return math.exp(lo), math.exp(hi)


def slope_ratio(hicra: list[dict[str, Any]], grpo: list[dict[str, Any]], paired: bool, n_boot: int,
                rng_seed: int) -> dict[str, Any]:
    """Mean HICRA slope / mean GRPO slope with its bootstrap CI, the GRPO slope's t-interval, and the law's
    prediction 1 + α(1 − 2p̄) from the p̄ of these runs."""
    h = [r for r in hicra if r["slope"] is not None]
    g = [r for r in grpo if r["slope"] is not None]
    if paired:  # order both by seed so that index i is the same seed in both arms
        h, g = sorted(h, key=lambda r: r["seed"]), sorted(g, key=lambda r: r["seed"])
        paired = [r["seed"] for r in h] == [r["seed"] for r in g]
    alpha = hicra[0]["alpha"]
    pbar = mean_or_none([r["pbar"] for r in hicra + grpo])
    out: dict[str, Any] = {"data": hicra[0]["data"], "arm": hicra[0]["arm"], "alpha": alpha, "paired": paired,
                           "n_hicra": len(h), "n_grpo": len(g), "ratio": None, "ratio_ci": None, "ratio_t_ci": None,
                           "grpo_slope": None, "grpo_slope_ci": None, "pbar": pbar, "note": None,
                           "prediction": None if alpha is None or pbar is None else hicra_over_grpo_push(alpha, pbar)}
    if not h or not g:
        out["note"] = "no slope for one of the arms"
        return out
    hs, gs = np.array([r["slope"] for r in h]), np.array([r["slope"] for r in g])
    ci = t_interval(gs.tolist())
    out.update(grpo_slope=float(gs.mean()), grpo_slope_ci=list(ci) if ci else None)
    if ci is not None and ci[0] <= 0 <= ci[1] or gs.mean() == 0:
        out["note"] = UNDEFINED_RATIO
        return out
    out["ratio"] = float(hs.mean() / gs.mean())
    rci = ratio_bootstrap(hs, gs, paired, n_boot, rng_seed) if len(h) > 1 or len(g) > 1 else None
    out["ratio_ci"] = list(rci) if rci else None
    tci = log_ratio_t_interval(hs, gs) if paired else None
    out["ratio_t_ci"] = list(tci) if tci else None
    if ci is None:
        out["note"] = "one GRPO seed: the GRPO slope has no confidence interval"
    return out


def strategy_summary(groups: dict[str, list[Run]], better: str | None = None, n_boot: int = DEFAULT_BOOTSTRAP,
                     rng_seed: int = DEFAULT_RNG_SEED) -> dict[str, Any] | None:
    """Per data config: the better strategy, each run's slope, each arm's summary and, for every HICRA arm,
    the slope ratio against GRPO. None when no run logged ``strategy/share=<name>``."""
    all_runs = [r for runs in groups.values() for r in runs]
    if not strategy_names(all_runs):
        return None
    out: dict[str, Any] = {"clip": [LOGIT_CLIP, 1 - LOGIT_CLIP], "bootstrap": n_boot, "rng_seed": rng_seed,
                           "data": []}
    for data in sorted({r.data for r in all_runs}, key=lambda d: (d is None, d or "")):
        arms = [runs for runs in groups.values() if runs[0].data == data]
        out["data"].append(data_strategy_summary(data, arms, better, n_boot, rng_seed))
    return out


def data_strategy_summary(data: str | None, arms: list[list[Run]], better: str | None, n_boot: int,
                          rng_seed: int) -> dict[str, Any]:
    runs = [r for a in arms for r in a]
    accuracies = strategy_accuracies(runs)
    strategy = better or better_strategy(accuracies)
    entry: dict[str, Any] = {"data": data, "better_strategy": strategy, "chosen_by": "option" if better else
                             "accuracy", "strategy_accuracy": accuracies, "runs": [], "arms": [], "ratios": []}
    if strategy is None:
        entry["note"] = "no strategy/accuracy=<name> logged: no better strategy (use --better-strategy)"
        return entry
    rows = {a[0].arm: [strategy_run_row(r, strategy) for r in a] for a in arms}
    entry["runs"] = [row for a in arms for row in rows[a[0].arm]]
    entry["arms"] = [arm_summary(a, rows[a[0].arm]) for a in arms]
    grpo = next((a for a in arms if a[0].algorithm == BASELINE), None)
    for a in arms:
        if a[0].algorithm == HICRA and grpo is not None:
            # paired by seed (a seed fixes the prompt order) when both ran the same seeds, or on the seeds both
            # ran when one arm has extra seeds (at least 2 in common); else each arm resampled on its own
            common = common_seeds(a, grpo)
            paired = common is not None and (len(common) >= 2 or common == {r.seed for r in a} == {r.seed for r in grpo})
            hicra_rows, grpo_rows = rows[a[0].arm], rows[grpo[0].arm]
            if paired:
                hicra_rows = [r for r in hicra_rows if r["seed"] in common]
                grpo_rows = [r for r in grpo_rows if r["seed"] in common]
            entry["ratios"].append(slope_ratio(hicra_rows, grpo_rows, paired, n_boot, rng_seed))
    return entry


def fmt_num(v: float | None, digits: int = 4) -> str:
    return "–" if v is None else fmt_float(v, f".{digits}f")


def fmt_ci(ci: list[float] | None, digits: int = 4) -> str:
    return "–" if ci is None else f"[{fmt_float(ci[0], f'+.{digits}f')}, {fmt_float(ci[1], f'+.{digits}f')}]"


def slope_text(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "–"
    return fmt_float(stats["mean"], "+.4f") + (f" ± {stats['std']:.4f}" if stats["std"] is not None else " (1 seed)")


def ratio_row(q: dict[str, Any]) -> str:
    if q["note"] == UNDEFINED_RATIO:
        ratio, ci, tci = UNDEFINED_RATIO, "–", "–"
    else:
        ratio, ci = fmt_num(q["ratio"], 3), fmt_ci(q["ratio_ci"], 3)
        tci = fmt_ci(q.get("ratio_t_ci"), 3) if q.get("ratio_t_ci") else "–"
    pairing = "by seed" if q["paired"] else "independent"
    return (f"| {q['data']} | {fmt_num(q['alpha'], 2)} | {q['n_hicra']} vs {q['n_grpo']} ({pairing}) | "
            f"{fmt_num(q['grpo_slope'])} {fmt_ci(q['grpo_slope_ci'])} | {ratio} | {tci} | {ci} | {fmt_num(q['pbar'], 3)} | "
            f"{fmt_num(q['prediction'], 3)} |")


def render_strategy_table(strategy: dict[str, Any]) -> str:
    """``strategy_slopes.md``: per-arm slopes and the HICRA / GRPO slope ratio against the law's prediction."""
    lo, hi = strategy["clip"]
    lines = ["# Strategy dose-response", "",
             f"slope = maximum-likelihood slope b of logit P(better strategy) = a + b·step, a binomial logistic "
             f"regression on each step's share (`{SHARE_PREFIX}<name>`) of the run's responses per step "
             f"(prompts_per_step × group_size in config.json); runs without those counts: least squares on the "
             f"share's logit clipped to [{lo:g}, {hi:g}]. p̄ = `{MIXED_ACC_KEY}` averaged over "
             f"steps (`{ACCURACY_KEY}` where a run logged none). Semantic entropy = `{SEMANTIC_ENTROPY_KEY}` "
             "averaged over steps. Final Pass@1 = held-out Pass@1 at the arm's last common eval step.", ""]
    for d in strategy["data"]:
        acc = ", ".join(f"{n} {fmt_float(v)}" for n, v in sorted(d["strategy_accuracy"].items()))
        lines += [f"## data: {d['data']}", "", f"better strategy: **{d['better_strategy']}** "
                  f"({'set by --better-strategy' if d['chosen_by'] == 'option' else 'highest mean accuracy'}; "
                  f"mean `{STRATEGY_ACC_PREFIX}<name>` over runs and steps: {acc or 'none logged'})", ""]
        if d.get("note"):
            lines += [d["note"], ""]
            continue
        lines += ["| arm | α | seeds | slope (mean ± std over seeds) | p̄ | semantic entropy | final Pass@1 |",
                  "| --- | ---: | --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {a['arm']} | {fmt_num(a['alpha'], 2)} | {', '.join(map(str, a['seeds']))} | "
                  f"{slope_text(a['slope'])} | {fmt_num(a['pbar'], 3)} | {fmt_num(a['semantic_entropy'], 3)} | "
                  f"{fmt_num(a['final_pass1'])} |" for a in d["arms"]]
        lines += ["", "| data | α | HICRA vs GRPO seeds | GRPO slope, 95% t-CI | ratio HICRA / GRPO slope | "
                  "95% CI (paired t on per-seed log ratios) | 95% CI (bootstrap over seeds) | p̄ | "
                  "law: 1 + α(1 − 2p̄) |",
                  "| --- | ---: | --- | --- | --- | --- | --- | ---: | ---: |"]
        lines += [ratio_row(q) for q in d["ratios"]] or ["| – | – | no HICRA and GRPO arms | – | – | – | – | – | – |"]
        lines += [f"- α={fmt_num(q['alpha'], 2)}: {q['note']}" for q in d["ratios"]
                  if q["note"] and q["note"] != UNDEFINED_RATIO]
        lines += ["", "Per run:", "", "| arm | seed | steps | slope | p̄ (source) | semantic entropy |",
                  "| --- | ---: | ---: | ---: | --- | ---: |"]
        lines += [f"| {r['arm']} | {r['seed']} | {r['n_steps']} | {fmt_num(r['slope'])} | {fmt_num(r['pbar'], 3)} "
                  f"({r['pbar_source'] or '–'}) | {fmt_num(r['semantic_entropy'], 3)} |" for r in d["runs"]]
        lines.append("")
    lines += ["Paired t CI (the one to read with 2–5 seeds): exp of the Student-t interval (n − 1 df) of the mean "
              "per-seed log(HICRA slope / GRPO slope), i.e. for the geometric mean of the per-seed ratios; only when "
              "both arms ran the same seeds and every slope is > 0. The percentile bootstrap below can draw only a "
              "few distinct resamples of 2–3 seeds and is too narrow there.", ""]
    lines += [f"Bootstrap CI: {strategy['bootstrap']} bootstrap resamples of the seeds (rng seed {strategy['rng_seed']}, "
              "percentile 2.5/97.5), HICRA and GRPO runs of the same seed drawn together when both arms ran the "
              "same seeds (by seed), else each arm resampled on its own (independent). p̄ of the law = mean p̄ "
              "of the GRPO runs and the HICRA runs of that α.", "",
              "Caution: the law holds per prompt, with each prompt's own success rate; at a mean p̄ over prompts of "
              "different difficulty it can be far off (the prompts that carry the strategy gradient are those the "
              "strategies separate most). `benchmarks/law_on_model.py` measures the per-prompt law on the policy "
              "itself (docs/hicra_law.md)."]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ report
def default_out_dir(run_dirs: list[Path]) -> Path:
    """``<common parent of the run dirs>/report``."""
    return Path(os.path.commonpath([str(p.parent) for p in run_dirs])) / "report"


def baseline_group(groups: dict[str, list[Run]], data: str | None) -> list[Run] | None:
    """The GRPO group of a data config (None if there is none)."""
    return next((runs for runs in groups.values() if runs[0].algorithm == BASELINE and runs[0].data == data), None)


def comparison_pairs(groups: dict[str, list[Run]]) -> list[tuple[list[Run], list[Run]]]:
    """(group, GRPO group of the same data.name) for every non-GRPO group that has one."""
    pairs = []
    for runs in groups.values():
        base = baseline_group(groups, runs[0].data)
        if runs[0].algorithm != BASELINE and base is not None:
            pairs.append((runs, base))
    return pairs


def summarise(groups: dict[str, list[Run]], n_boot: int, rng_seed: int) -> dict[str, Any]:
    """The numbers of table.md (and summary.json)."""
    comparisons = [compare(runs, base, n_boot, rng_seed) for runs, base in comparison_pairs(groups)]
    return {
        "band": BAND_NOTE,
        "runs": [{"path": str(r.path), "algorithm": r.algorithm, "seed": r.seed, "last_step": r.last_step,
                  "eval_steps": sorted(s for s, e in r.evals.items() if e.pass1 is not None)}
                 for runs in groups.values() for r in runs],
        "algorithms": {a: algorithm_summary(runs) for a, runs in groups.items()},
        "comparisons": comparisons,
    }


def build_report(paths: list[str], out: str | os.PathLike | None = None, *, n_boot: int = DEFAULT_BOOTSTRAP,
                 rng_seed: int = DEFAULT_RNG_SEED, figures: bool = True,
                 better_strategy_name: str | None = None) -> dict[str, Any]:
    """Read the runs, write the figures, ``table.md`` and ``summary.json`` (and, when the runs log
    ``strategy/share=<name>``, ``strategy_share.png`` and ``strategy_slopes.md``) into ``out``; return the
    summary."""
    run_dirs = find_run_dirs(paths)
    groups = group_runs([load_run(d) for d in run_dirs])
    out = Path(out) if out is not None else default_out_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(groups, n_boot, rng_seed)
    strategy = strategy_summary(groups, better_strategy_name, n_boot, rng_seed)
    summary["out"] = str(out)
    summary["figures"] = [str(p) for p in write_figures(groups, out)] if figures else []
    if strategy is not None:
        summary["strategy"] = strategy
        if figures:
            summary["figures"].append(str(write_strategy_figure(groups, strategy, out)))
        write_text_atomic(out / "strategy_slopes.md", render_strategy_table(strategy))
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
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a bad-input error (default: one line naming the file and line)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNGs (write only the tables and summary.json)")
    p.add_argument("--better-strategy", default=None, metavar="NAME",
                   help="strategy whose share strategy_share.png and strategy_slopes.md follow (default: per "
                        "data config, the one with the highest mean strategy/accuracy=<name>)")
    args = p.parse_args(argv)
    if args.bootstrap < 1:
        p.error(f"--bootstrap must be >= 1, got {args.bootstrap}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = build_report(args.run_dirs, args.out, n_boot=args.bootstrap, rng_seed=args.rng_seed,
                               figures=not args.no_figures, better_strategy_name=args.better_strategy)
    except UserInputError as e:  # a bad run directory or file: one line (a bug keeps its traceback)
        if args.debug:
            raise
        return print_user_error("hicra-report: error", e)
    print(f"hicra-report: {len(summary['runs'])} runs, {len(summary['algorithms'])} algorithms -> {summary['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
