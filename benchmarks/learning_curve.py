"""Does the default recipe learn?  Held-out Pass@1 over 40 steps of `make run`'s recipe, seeds, CIs (resumable).

    python benchmarks/learning_curve.py [--seeds 3] [--commit]     # run what is missing, then report
    python benchmarks/learning_curve.py --report                   # report the committed runs only

Runs ``hicra-train +experiment=learning_curve trainer.seed=S`` (HICRA on the CPU default from the arith cold
start; held-out Pass@1 on 128 eval-role problems, k = 4, T = 0.6, before training and every 10 steps) for each
seed whose last evaluation is missing; an interrupted run resumes.  Each finished run's config, metrics and
evaluations go to ``benchmarks/results/learning_curve/<run>/`` (committed on their own with ``--commit``).

The report (``result.md``, ``learning_curve.png``): per evaluation step, Pass@1 averaged over seeds with a 95 %
interval from the crossed bootstrap (seeds and problems resampled together: every seed is scored on the same
problems; ``hicra_rl.report.crossed_bootstrap_means``), and the gain last step − step 0, per seed and over seeds,
paired on problems.  Step 0 is the cold start itself, evaluated once per seed (its spread is sampling noise).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from strategy_choice import commit, publish  # sibling script: benchmarks/ is sys.path[0]

RUNS = Path("runs/learning_curve")
RESULTS = Path("benchmarks/results/learning_curve")
N_BOOT = 4000


def run_name(seed: int) -> str:
    return f"hicra-s{seed}"


def last_step() -> int:
    import yaml

    return int(yaml.safe_load(Path("conf/experiment/learning_curve.yaml").read_text())["trainer"]["total_steps"])


def run_seed(seed: int, steps: int, do_commit: bool) -> None:
    name = run_name(seed)
    if (RESULTS / name / f"eval-step{steps}.json").is_file():
        return
    run_dir = RUNS / name
    if not (run_dir / f"eval-step{steps}.json").is_file():
        cmd = [str(Path(sys.executable).parent / "hicra-train"), "+experiment=learning_curve", f"trainer.seed={seed}"]
        print(" ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"learning_curve: seed {seed} failed; run again to resume it")
    paths = publish(run_dir, RESULTS / name)
    if do_commit:
        pass1 = json.loads((run_dir / f"eval-step{steps}.json").read_text())["metrics"]["eval/pass@1"]
        commit(paths, f"learning_curve: {name} (held-out Pass@1 after {steps} steps {pass1:.3f})")


def per_problem(path: Path) -> dict[str, float]:
    rows = json.loads(path.read_text())["rows"]
    return {str(r["id"]): float(np.mean(r["correct"])) for r in rows}


def eval_tables(result_dirs: list[Path]) -> dict[int, np.ndarray]:
    """Evaluation step -> [seeds x problems] per-problem Pass@1, for the steps every run evaluated, problems in
    one order (an evaluation whose problems differ from the others' is an error: the design is crossed)."""
    per_run = []
    for d in result_dirs:
        per_run.append({int(p.stem.removeprefix("eval-step")): per_problem(p) for p in d.glob("eval-step*.json")})
    steps = sorted(set.intersection(*(set(r) for r in per_run)))
    tables = {}
    for s in steps:
        ids = sorted(per_run[0][s])
        for d, r in zip(result_dirs, per_run):
            if sorted(r[s]) != ids:
                raise SystemExit(f"learning_curve: {d}/eval-step{s}.json scores other problems than "
                                 f"{result_dirs[0]}/eval-step{s}.json")
        tables[s] = np.array([[r[s][i] for i in ids] for r in per_run])
    return tables


def crossed_interval(table: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a [seeds x problems] table and its 95 % crossed-bootstrap interval."""
    from hicra_rl.report import crossed_bootstrap_means

    lo, hi = np.percentile(crossed_bootstrap_means(table, N_BOOT, seed), [2.5, 97.5])
    return float(table.mean()), float(lo), float(hi)


def report(result_dirs: list[Path], out: Path) -> str:
    tables = eval_tables(result_dirs)
    steps = sorted(tables)
    first, last = steps[0], steps[-1]
    curve = {s: crossed_interval(tables[s]) for s in steps}
    gains = {s: crossed_interval(tables[s] - tables[first]) for s in steps}   # paired on problems
    gain = gains[last]
    per_seed = {d.name: (float(tables[first][i].mean()), float(tables[last][i].mean()))
                for i, d in enumerate(result_dirs)}
    n_problems = tables[first].shape[1]
    lines = [
        "# Held-out learning curve of the default recipe",
        "",
        f"`python benchmarks/learning_curve.py` ({len(result_dirs)} seeds; HICRA α = 0.2 on the CPU default, "
        f"16 prompts x 4 a step, lr 3e-6, from the arith cold start); held-out Pass@1 on {n_problems} eval-role "
        "problems (none is a training or cold-start problem), k = 4, T = 0.6. 95 % intervals: crossed "
        "bootstrap over seeds and problems.",
        "",
        "| step | Pass@1 (mean over seeds) | 95 % CI | gain over step 0, paired on problems (95 % CI) | per seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in steps:
        m, lo, hi = curve[s]
        g, glo, ghi = gains[s]
        seeds = ", ".join(f"{v:.3f}" for v in tables[s].mean(axis=1))
        lines.append(f"| {s} | {m:.3f} | [{lo:.3f}, {hi:.3f}] | {g * 100:+.1f} points [{glo * 100:+.1f}, {ghi * 100:+.1f}] "
                     f"| {seeds} |")
    m, lo, hi = gain
    lines += ["", f"**Gain step {first} → {last}: {m * 100:+.1f} points, 95 % CI [{lo * 100:+.1f}, {hi * 100:+.1f}]** "
              "(paired on problems, seeds and problems resampled together). Per seed: "
              + ", ".join(f"{k} {a:.3f} → {b:.3f}" for k, (a, b) in per_seed.items()) + "."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    from hicra_rl.iofiles import write_text_atomic

    write_text_atomic(out / "result.md", text)
    write_json = {"steps": steps, "curve": {str(s): curve[s] for s in steps}, "gain": gain,
                  "gains": {str(s): gains[s] for s in steps}, "per_seed": per_seed,
                  "n_problems": n_problems, "runs": [d.name for d in result_dirs]}
    (out / "result.json").write_text(json.dumps(write_json, indent=2) + "\n")
    figure(tables, curve, gains, out / "learning_curve.png")
    return text


def figure(tables: dict[int, np.ndarray], curve: dict, gains: dict, path: Path) -> None:
    """Left: Pass@1 by step (its CI mostly reflects which problems were drawn); right: the gain over step 0,
    paired on problems (the CI of what training changed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hicra_rl.report import save_figure_atomic

    steps = sorted(tables)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4))
    for i in range(tables[steps[0]].shape[0]):
        ax.plot(steps, [tables[s][i].mean() for s in steps], color="tab:blue", alpha=0.3, lw=1)
        bx.plot(steps, [(tables[s][i] - tables[steps[0]][i]).mean() * 100 for s in steps], color="tab:green",
                alpha=0.3, lw=1)
    ax.plot(steps, [curve[s][0] for s in steps], color="tab:blue", marker="o", label="mean over seeds")
    ax.fill_between(steps, [curve[s][1] for s in steps], [curve[s][2] for s in steps], color="tab:blue", alpha=0.15,
                    label="95 % CI (seeds x problems)")
    bx.plot(steps, [gains[s][0] * 100 for s in steps], color="tab:green", marker="o", label="mean over seeds")
    bx.fill_between(steps, [gains[s][1] * 100 for s in steps], [gains[s][2] * 100 for s in steps], color="tab:green",
                    alpha=0.15, label="95 % CI (paired on problems)")
    bx.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("held-out Pass@1")
    bx.set_ylabel("gain over step 0 (points)")
    for a in (ax, bx):
        a.set_xlabel("training step")
        a.grid(alpha=0.3)
        a.legend(loc="lower right" if a is ax else "upper left", fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--commit", action="store_true", help="git commit each finished run's results")
    p.add_argument("--report", action="store_true", help="only report the committed runs")
    args = p.parse_args(argv)
    steps = last_step()
    if not args.report:
        for seed in range(args.seeds):
            run_seed(seed, steps, args.commit)
    dirs = sorted(d for d in RESULTS.glob("hicra-s*") if (d / f"eval-step{steps}.json").is_file())
    if not dirs:
        raise SystemExit(f"learning_curve: no finished run in {RESULTS}")
    print(report(dirs, RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
