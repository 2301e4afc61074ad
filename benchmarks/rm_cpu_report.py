"""The RL stage of the reward-model CPU example against the verifier-reward learning curve (issue 23;
docs/reward_models.md).

    python benchmarks/rm_cpu_report.py [--runs runs/rm_cpu] [--out benchmarks/results/rm_cpu]

``make rm-example`` trains the learning curve's recipe (conf/experiment/rm_cpu.yaml) on a learned reward
(``reward.source=model``: the reward model alone; ``gated``: the verifier plus the model's bonus on accepted answers).
This copies each finished run's config, metrics and evaluations to ``<out>/<source>-s<seed>/`` and writes
``<out>/rl.md``: held-out verifier Pass@1 by evaluation step, the gain over step 0 paired on problems, the same for
the verifier-reward runs of the learning curve (same seed, prompts, steps and problems), and the difference of the
gains against the verifier run of the same seed, paired on problems (95 % bootstrap intervals over problems; the
verifier's seed spread is shown beside). Then, per block of 10 training steps, what the policy was paid and did:
the verifier's accuracy on its own samples, the model's mean score, the model's agreement with the verifier and the
response length (a length that runs away under ``model`` would be reward hacking).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from learning_curve import crossed_interval, eval_tables  # noqa: E402

VERIFIER = HERE / "results" / "learning_curve"
KEPT = ("config.json", "metrics.jsonl")
TRAINING_KEYS = ("reward/accuracy", "reward/mean", "reward/model_mean", "reward/model_verifier_agreement",
                 "response/length_mean")


def gain_rows(tables: dict[int, np.ndarray]) -> list[dict]:
    """Per evaluation step of a [1 + V runs x problems] table set (row 0: the reward-model run, rows 1..V: the
    verifier runs, row 1 of the same seed): Pass@1, gains over the first step (paired on problems), and the
    difference of row 0's gain and row 1's, paired on problems."""
    steps = sorted(tables)
    first = steps[0]
    out = []
    for s in steps:
        gain = tables[s] - tables[first]
        out.append({"step": s, "pass1": float(tables[s][0].mean()),
                    "gain": crossed_interval(gain[:1]), "verifier_gain_same_seed": crossed_interval(gain[1:2]),
                    "verifier_gain_all_seeds": crossed_interval(gain[1:]),
                    "verifier_gains_per_seed": [float(g) for g in gain[1:].mean(axis=1)],
                    "difference": crossed_interval((gain[0] - gain[1])[None, :])})
    return out


def above_gold_share(eval_path: Path) -> float | None:
    """Share of the evaluation's numeric answers larger than the gold answer (what a reward model that pays for
    big numbers would push up; the cold start's share is the baseline)."""
    above = total = 0
    for row in json.loads(eval_path.read_text())["rows"]:
        try:
            gold = float(row["answer"])
        except (TypeError, ValueError):
            continue
        for extracted in row.get("extracted", []):
            try:
                value = float(extracted)
            except (TypeError, ValueError):
                continue
            total += 1
            above += value > gold
    return above / total if total else None


def training_blocks(metrics_path: Path, block: int = 10) -> list[dict]:
    """Means of TRAINING_KEYS over steps 1..block, block+1..2 block, ... (keys a run does not log: None)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r and "reward/mean" in r]
    out = []
    for start in range(1, max(r["step"] for r in rows) + 1, block):
        part = [r for r in rows if start <= r["step"] < start + block]
        entry = {"steps": f"{start}-{start + block - 1}"}
        for key in TRAINING_KEYS:
            vals = [r[key] for r in part if r.get(key) is not None]
            entry[key] = float(np.mean(vals)) if vals else None
        out.append(entry)
    return out


def _pts(ci) -> str:
    m, lo, hi = ci
    return f"{m * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]"


def _num(x, fmt=".3f") -> str:
    return "–" if x is None else format(x, fmt)


def report(run_dirs: list[Path], out: Path) -> str:
    verifier_dirs = sorted(VERIFIER.glob("hicra-s*"))
    lines = ["# RL on the learned reward model, against the verifier's reward", "",
             "`make rm-example`'s RL stage (`python benchmarks/rm_cpu_report.py`). Held-out verifier Pass@1 on the "
             "learning curve's 128 eval-role problems (k = 4, T = 0.6); gains over step 0 paired on problems; 95 % "
             "bootstrap intervals over problems (one seed per reward-model run). The difference is against the "
             f"verifier-reward run of the same seed, paired on problems; `verifier, {len(verifier_dirs)} seeds` "
             "gives the seed spread (crossed bootstrap).", ""]
    result = {}
    for run in run_dirs:
        config = json.loads((run / "config.json").read_text())
        seed, source = config["trainer"]["seed"], config["reward"]["source"]
        same_seed = VERIFIER / f"hicra-s{seed}"
        others = [d for d in verifier_dirs if d != same_seed]
        rows = gain_rows(eval_tables([run, same_seed, *others]))
        for r in rows:
            r["above_gold"] = above_gold_share(run / f"eval-step{r['step']}.json")
            r["verifier_above_gold"] = above_gold_share(same_seed / f"eval-step{r['step']}.json")
        blocks = training_blocks(run / "metrics.jsonl")
        verifier_blocks = training_blocks(same_seed / "metrics.jsonl")
        result[run.name] = {"source": source, "seed": seed, "reward_model": config["reward"]["model"],
                            "evaluation": rows, "training": blocks, "verifier_training": verifier_blocks}
        lines += [f"## `reward.source={source}`, seed {seed}", "",
                  "| step | Pass@1 | gain (points) | verifier, same seed | verifier, all seeds (per seed) | "
                  "difference vs same seed | answers above the gold (verifier run) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            per_seed = ", ".join(f"{g * 100:+.1f}" for g in r["verifier_gains_per_seed"])
            lines.append(f"| {r['step']} | {r['pass1']:.3f} | {_pts(r['gain'])} | {_pts(r['verifier_gain_same_seed'])}"
                         f" | {_pts(r['verifier_gain_all_seeds'])} ({per_seed}) | {_pts(r['difference'])} | "
                         f"{_num(r['above_gold'])} ({_num(r['verifier_above_gold'])}) |")
        lines += ["", "Training (means over blocks of steps; verifier-reward run of the same seed in brackets):", "",
                  "| steps | verifier accuracy of the samples | reward mean | model score mean | "
                  "model–verifier agreement | response length |", "| --- | --- | --- | --- | --- | --- |"]
        for b, v in zip(blocks, verifier_blocks):
            lines.append(f"| {b['steps']} | {_num(b['reward/accuracy'])} ({_num(v['reward/accuracy'])}) | "
                         f"{_num(b['reward/mean'])} | {_num(b['reward/model_mean'])} | "
                         f"{_num(b['reward/model_verifier_agreement'])} | {_num(b['response/length_mean'], '.1f')} "
                         f"({_num(v['response/length_mean'], '.1f')}) |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    from hicra_rl.iofiles import write_json_atomic, write_text_atomic

    write_text_atomic(out / "rl.md", text)
    write_json_atomic(out / "rl.json", result)
    return text


def publish(run: Path, out: Path) -> Path:
    dest = out / run.name
    dest.mkdir(parents=True, exist_ok=True)
    for p in [*(run / k for k in KEPT), *sorted(run.glob("eval-step*.json"))]:
        shutil.copy2(p, dest / p.name)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/rm_cpu")
    p.add_argument("--out", default=str(HERE / "results" / "rm_cpu"))
    args = p.parse_args(argv)
    runs = sorted(d for d in Path(args.runs).glob("*-s*") if (d / "config.json").is_file() and any(d.glob("eval-step*.json")))
    if not runs:
        sys.exit(f"rm_cpu_report: no finished run under {args.runs} (make rm-example writes them)")
    out = Path(args.out)
    published = [publish(r, out) for r in runs]
    print(report(published, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
