"""Who uses the CPU while the learner updates: per-process CPU during a default training run.

    python benchmarks/fleet_cpu.py [--steps 4] [--cold-start DIR] [--out runs/fleet_cpu]

Runs ``hicra-train`` on the CPU default for ``--steps`` steps and samples every process's CPU time once a
second (psutil). The seconds in which the learner actor's update was running (its process title
``ray::LearnerWorker.update`` and over half a core busy) are the update windows; it prints how many cores the
learner used in them, how many everything else used, the largest other users, and the run's
``perf/update_cpu_util`` per step. On 2 cores the learner's two threads compete with vLLM's engine, Ray's
own processes and the other actors for whatever those take.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import time
from pathlib import Path

LEARNER_UPDATE = "ray::LearnerWorker.update"


def label(proc) -> str:
    """A process's name for the table: Ray and vLLM set their titles (ray::RolloutWorker, VLLM::Worker)."""
    words = proc.info["cmdline"] or [proc.info["name"] or "?"]
    if words[0].startswith(("ray::", "VLLM::")):
        return words[0].split(".")[0]            # ray::RolloutWorker.generate -> ray::RolloutWorker
    scripts = [os.path.basename(w) for w in words[1:] if w.endswith(".py") or w.endswith("hicra-train")]
    return os.path.basename(words[0]) + (f" {scripts[0]}" if scripts else "")


def sample(own_pid: int, stop: subprocess.Popen) -> list[dict]:
    """One record a second until ``stop`` exits: CPU seconds each process used in that second."""
    import psutil

    previous: dict[int, float] = {}
    records = []
    while stop.poll() is None:
        t0 = time.time()
        used, update_running = collections.Counter(), False
        for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
            if proc.info["pid"] == own_pid or proc.info["cpu_times"] is None:
                continue
            total = proc.info["cpu_times"].user + proc.info["cpu_times"].system
            delta = total - previous.get(proc.info["pid"], total)
            previous[proc.info["pid"]] = total
            cmd = " ".join(proc.info["cmdline"] or [])
            name = "learner" if cmd.startswith("ray::LearnerWorker") else label(proc)
            if cmd.startswith(LEARNER_UPDATE) and delta > 0.5:
                update_running = True
            if delta > 0:
                used[name] += delta
        records.append({"update": update_running, "used": dict(used)})
        time.sleep(max(0.0, 1.0 - (time.time() - t0)))
    return records


def main() -> None:
    from bench_step import add_training_args, train_command

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, steps=4, out="runs/fleet_cpu")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    run_dir = Path(args.out)
    cmd = train_command(run_dir, args, [])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as log:   # the run's own output, out of the way of the table
        train = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        records = sample(os.getpid(), train)
    if train.returncode != 0:
        raise SystemExit(f"hicra-train failed (exit {train.returncode}), see {run_dir / 'train.log'}: {' '.join(cmd)}")
    windows = [r for r in records if r["update"]]
    if not windows:
        raise SystemExit("no update window was sampled (the updates were shorter than the 1 s sampling?)")
    seconds = len(windows)
    others = collections.Counter()
    learner = 0.0
    for r in windows:
        for name, cpu in r["used"].items():
            if name == "learner":
                learner += cpu
            else:
                others[name] += cpu
    print(f"{seconds} s of learner updates over {args.steps} steps on {os.cpu_count()} cores: the learner used "
          f"{learner / seconds:.2f} cores, everything else {sum(others.values()) / seconds:.3f}")
    for name, cpu in others.most_common(12):
        print(f"  {cpu / seconds:6.3f} cores  {name}")
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print("perf/update_cpu_util per step: " + ", ".join(f"{r['perf/update_cpu_util']:.3f}" for r in rows))


if __name__ == "__main__":
    main()
