"""HICRA's dose-response grid on the strategy-choice testbed (issue 21; docs/hicra_law.md): resumable.

    python benchmarks/strategy_choice.py [--seeds 3] [--extra-seeds 2] [--commit] [--dry-run] [-- OVERRIDES]

Runs ``hicra-train +experiment=strategy_choice`` for alpha in {0 (grpo), 0.2, 1.0} x {strat_hard, strat_easy}
x seeds, in an order where every prefix of the grid is a balanced comparison: seed by seed, the alpha = 0 and
alpha = 1.0 arms of hard, then of easy (the law's largest predicted effect: 1 +- 0.6 at p̄ 0.2 / 0.8),
then alpha = 0.2, then ``--extra-seeds`` more seeds of alpha 0 and 1.0 on hard.  A run whose final
evaluation exists is skipped; an interrupted one resumes from its checkpoint (trainer.resume=auto).  Each
finished run's config.json, metrics.jsonl and eval-step*.json are copied to
``benchmarks/results/strategy_choice/<data>/<run>/`` and, with ``--commit``, committed on their own.
Then: ``hicra-report benchmarks/results/strategy_choice/strat_hard benchmarks/results/strategy_choice/strat_easy``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNS = Path("runs/strategy_choice")
RESULTS = Path("benchmarks/results/strategy_choice")
DIFFICULTIES = ("strat_hard", "strat_easy")
KEPT = ("config.json", "metrics.jsonl")


def arm(alpha: float) -> tuple[str, list[str]]:
    """(run-name stem, hicra-train overrides) of one alpha."""
    if alpha == 0.0:
        return "grpo-a0.0", ["algorithm=grpo"]
    return f"hicra-a{alpha}", ["algorithm=hicra", f"algorithm.hicra_alpha={alpha}"]


def grid(seeds: int, extra_seeds: int) -> list[tuple[str, float, int]]:
    """(data, alpha, seed) in priority order (every prefix balanced)."""
    out = [(d, a, s) for s in range(seeds) for d in DIFFICULTIES for a in (0.0, 1.0)]
    out += [(d, 0.2, s) for s in range(seeds) for d in DIFFICULTIES]
    out += [("strat_hard", a, s) for s in range(seeds, seeds + extra_seeds) for a in (0.0, 1.0)]
    return out


def total_steps(overrides: list[str]) -> int:
    """trainer.total_steps the runs use (the experiment's, unless overridden)."""
    for o in overrides:
        if o.startswith("trainer.total_steps="):
            return int(o.split("=", 1)[1])
    import yaml

    return int(yaml.safe_load(Path("conf/experiment/strategy_choice.yaml").read_text())["trainer"]["total_steps"])


def finished(run_dir: Path, steps: int) -> bool:
    return (run_dir / f"eval-step{steps}.json").is_file()


def published(data: str, name: str, steps: int) -> bool:
    """Already in the committed results (a fresh clone has no runs/ but these): not re-run."""
    return finished(RESULTS / data / name, steps)


def cold_start_fingerprint(run_dir: Path) -> dict:
    """sha256 of the cold start's weights the run started from (its config's trainer.init_checkpoint): every
    run of one comparison must share it (a re-made cold start is not bitwise the same one)."""
    import hashlib

    init = json.loads((run_dir / "config.json").read_text())["trainer"]["init_checkpoint"]
    digest = hashlib.sha256()
    with open(Path(init) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"init_checkpoint": init, "model_safetensors_sha256": digest.hexdigest()}


def publish(run_dir: Path, dest: Path) -> list[Path]:
    """Copy what the report reads (config, metrics, evaluations) to the committed results, with the cold
    start's fingerprint (cold_start.json)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [run_dir / n for n in KEPT] + sorted(run_dir.glob("eval-step*.json"))
    for f in files:
        shutil.copy2(f, dest / f.name)
    (dest / "cold_start.json").write_text(json.dumps(cold_start_fingerprint(run_dir), indent=2) + "\n")
    return [dest / f.name for f in files] + [dest / "cold_start.json"]


def commit(paths: list[Path], message: str) -> None:
    for attempt in range(5):  # another commit may hold the index for a moment
        add = subprocess.run(["git", "add", "--", *map(str, paths)], capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", *map(str, paths)], capture_output=True, text=True).returncode == 0
        if done:
            return
        time.sleep(5 * (attempt + 1))
    print(f"strategy_choice: could not commit {paths[0].parent} (commit it by hand)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--extra-seeds", type=int, default=2)
    p.add_argument("--commit", action="store_true", help="git commit each finished run's results")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--data", action="append", choices=DIFFICULTIES,
                   help="only these difficulties (repeatable; default both), e.g. to finish hard's seeds first")
    p.add_argument("overrides", nargs="*", help="more hicra-train overrides (after --)")
    args = p.parse_args(argv)
    steps = total_steps(args.overrides)
    train = str(Path(sys.executable).parent / "hicra-train")
    for data, alpha, seed in grid(args.seeds, args.extra_seeds):
        if args.data and data not in args.data:
            continue
        stem, algo = arm(alpha)
        name = f"{stem}-s{seed}"
        run_dir = RUNS / data / name
        if published(data, name, steps) and not finished(run_dir, steps):
            print(f"strategy_choice: {data}/{name} published in {RESULTS / data / name}")
            continue
        if finished(run_dir, steps):
            print(f"strategy_choice: {data}/{name} done")
        else:
            cmd = [train, "+experiment=strategy_choice", f"data={data}", *algo, f"trainer.seed={seed}",
                   *args.overrides]
            print("strategy_choice:", " ".join(cmd), flush=True)
            if args.dry_run:
                continue
            t0 = time.perf_counter()
            rc = subprocess.run(cmd).returncode
            if rc != 0 or not finished(run_dir, steps):
                print(f"strategy_choice: {data}/{name} failed (exit {rc}); re-run this script to resume it",
                      file=sys.stderr)
                return rc or 1
            print(f"strategy_choice: {data}/{name} finished in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        if args.dry_run:
            continue
        dest = RESULTS / data / name
        if not (dest / f"eval-step{steps}.json").is_file():
            paths = publish(run_dir, dest)
            if args.commit:
                evals = json.loads((run_dir / f"eval-step{steps}.json").read_text())["metrics"]
                commit(paths, f"strategy_choice: {data}/{name} (held-out Pass@1 {evals['eval/pass@1']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
