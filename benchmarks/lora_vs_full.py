"""LoRA (``learner.lora``) against full fine-tuning on the CPU default, side by side in one run.

    python benchmarks/lora_vs_full.py [--rounds 3] [--rank 16] [--alpha 32] [--targets all-linear] [--model DIR]

The CPU default's learner (SmolLM2-135M: the cold start when it exists, else the model itself; ``learner`` as
conf/config.yaml sets it: ZeRO-0, packed prompt groups, micro-batches of 16 responses, torch AdamW), world size 1,
every core (``OMP_NUM_THREADS`` when set), on a synthetic batch of the CPU default's layout (``bench_learner.default_batch``: 16 prompts x 4
responses of 30-45 tokens, on-policy, random advantages). Two phases, both modes in each:

1. memory: each mode alone in a fresh process, one after the other (load, two updates, exit): the process's peak
   resident memory (RSS, ``getrusage``: weights, gradients, optimizer state, activations and the allocator's
   leftovers), its RSS after loading the model, and the optimizer state's bytes (the tensors of torch AdamW's
   state: its two moments);
2. time: one process holding both learners, updates alternated (full, LoRA, then LoRA, full, ...) after one
   warm-up each, so both see the same minutes of this VM's drifting speed: the update's wall time; per round the
   ratio of the two back-to-back updates, and its median over the rounds (robust to a round slowed by other work).

Then LoRA / full ratios.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))            # bench_learner
sys.path.insert(0, str(HERE.parent))     # hicra_rl from a checkout

DEFAULT_COLD_START = os.path.expanduser("~/.cache/hicra-rl/cold_start/smollm2_135m-arith-v2")
MODES = ("full", "lora")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model() -> str:
    if os.path.isdir(DEFAULT_COLD_START):
        return DEFAULT_COLD_START
    from hicra_rl.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def threads() -> int:
    """Torch threads: ``OMP_NUM_THREADS`` when set (a machine shared with other work), else every core (the CPU
    default's learner)."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1


def build(mode: str, model: str, lora: dict, port: int):
    import torch
    from bench_learner import default_learner_config

    from hicra_rl.config import LearnerLoraConfig
    from hicra_rl.learner.engine import PolicyLearner

    torch.set_num_threads(threads())
    cfg = default_learner_config(0, lora=LearnerLoraConfig(**lora) if mode == "lora" else LearnerLoraConfig())
    return PolicyLearner(cfg, model_path=model, master_port=port)


def memory_worker(mode: str, model: str, lora: dict, port: int, seed: int, conn) -> None:
    """Phase 1: one mode alone; sends its figures and exits."""
    from bench_learner import default_batch

    learner = build(mode, model, lora, port)
    loaded = rss_gib()
    batch = default_batch(seed)
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        learner.update(batch)
        seconds.append(time.perf_counter() - t0)
    conn.send({"rss_loaded_gib": loaded, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "optimizer_state_bytes": learner.optimizer_state_bytes(), "trainable": learner.trainable_params,
               "update_s": seconds})


def time_worker(model: str, lora: dict, rounds: int, seed: int, conn) -> None:
    """Phase 2: both learners in one process, updates alternated."""
    from bench_learner import default_batch

    port = free_port()   # one process group (world size 1) for both engines
    learners = {mode: build(mode, model, lora, port) for mode in MODES}
    batch = default_batch(seed)
    order = list(MODES)
    for r in range(rounds + 1):
        for mode in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            stats = learners[mode].update(batch)
            conn.send((r, mode, time.perf_counter() - t0, stats["actor/loss"], stats["actor/grad_norm"]))
    conn.send(None)


def run(target, args) -> list:
    """Run ``target(*args, conn)`` in a fresh spawned process; return everything it sent, in order."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    child.close()
    while True:
        try:
            msg = parent.recv()
        except EOFError:
            break
        if msg is None:
            break
        yield msg
    proc.join(timeout=120)
    if proc.exitcode not in (0, None):
        raise RuntimeError(f"{target.__name__} exited with {proc.exitcode}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="timed updates per mode, alternated")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default="all-linear", help="comma list of module names, or all-linear")
    p.add_argument("--model", default=None, help="HF model dir (default: the CPU default's cold start or SmolLM2-135M)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model = args.model or default_model()
    lora = {"rank": args.rank, "alpha": args.alpha, "target_modules": [t.strip() for t in args.targets.split(",")]}
    print(f"model {model}; LoRA rank {args.rank}, alpha {args.alpha:g}, targets {lora['target_modules']}; "
          f"{os.cpu_count()} cores, {threads()} torch threads", flush=True)

    memory = {}
    for mode in MODES:   # one at a time: each process alone on the machine
        (memory[mode],) = list(run(memory_worker, (mode, model, lora, free_port(), args.seed)))
        m = memory[mode]
        print(f"memory {mode:4s}: RSS after loading {m['rss_loaded_gib']:.2f} GiB, peak {m['peak_rss_gib']:.2f} GiB; "
              f"optimizer state {m['optimizer_state_bytes'] / 1e6:.1f} MB; {m['trainable']:,d} trainable; updates "
              f"{', '.join(f'{s:.1f}' for s in m['update_s'])} s", flush=True)

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    print(f"time: both learners in one process, {args.rounds} rounds after 1 warm-up each, alternated", flush=True)
    for r, mode, seconds, loss, grad_norm in run(time_worker, (model, lora, args.rounds, args.seed)):
        if r > 0:
            times[mode].append(seconds)
        print(f"  round {r}{' (warm-up)' if r == 0 else ''} {mode:4s}: update {seconds:6.2f} s  loss {loss:+.4f}  "
              f"grad_norm {grad_norm:.3g}", flush=True)

    print(f"\n{'':6s}{'update s (median)':>18s}{'peak RSS GiB':>14s}{'RSS loaded GiB':>16s}"
          f"{'optimizer state MB':>20s}{'trainable params':>18s}")
    for mode in MODES:
        m = memory[mode]
        print(f"{mode:6s}{statistics.median(times[mode]):18.2f}{m['peak_rss_gib']:14.2f}{m['rss_loaded_gib']:16.2f}"
              f"{m['optimizer_state_bytes'] / 1e6:20.1f}{m['trainable']:18,d}")
    f, l = memory["full"], memory["lora"]
    ratios = [lo / fu for lo, fu in zip(times["lora"], times["full"])]
    print(f"LoRA / full update time per round: {', '.join(f'{x:.2f}' for x in ratios)}")
    print(f"LoRA / full: update time {statistics.median(ratios):.2f}x (median over rounds), "
          f"peak RSS {l['peak_rss_gib'] / f['peak_rss_gib']:.2f}x, peak RSS above the loaded model "
          f"{(l['peak_rss_gib'] - l['rss_loaded_gib']) / (f['peak_rss_gib'] - f['rss_loaded_gib']):.2f}x, "
          f"optimizer state {l['optimizer_state_bytes'] / f['optimizer_state_bytes']:.4f}x "
          f"({l['trainable'] / f['trainable']:.2%} of the parameters train)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
