"""The default RL step, new path vs old path, side by side in one run, with the ratio.

    python benchmarks/bench_step.py [--steps 3] [--cold-start DIR] [--out runs/bench_step]

Runs ``hicra-train`` twice from the same cold start on the CPU default (16 prompts x 4, HICRA):
- old path: the separate old-log-prob forward, one row per response in micro-batches of 4, SmolLM2's
  default system prompt, vLLM's default CPU binding, ZeRO-2 on the one rank, glibc's default allocator in the
  learner (``learner.old_log_prob_forward=always learner.shared_prefix=false learner.micro_batch_size=4
  data.system_prompt=null rollout.cpu_threads=null learner.zero_stage=2
  cluster.learner_keep_freed_memory=false``);
- new path: the defaults (no old-log-prob forward on-policy, prompt groups packed into one row each in
  micro-batches of 16 responses, empty system prompt, vLLM on all cores, freed memory kept in the learner's
  heap: ``cluster.learner_keep_freed_memory``), plus
  ``learner.gemm_reference_every=1``: after each update the learner times every GEMM that update ran, at its
  shapes, back to back (perf/gemm_reference_gflops), in the same run and minute; those seconds are taken
  out of the new path's step and update times.
It prints the median step time of steps 2..N (step 1 warms up) of each and the ratio new / old, the
stage breakdown, and the in-run generation rate.  The learner's useful GFLOP/s (perf/update_gflops: 6 x
weights per token, ``hicra_rl.learner.flops``) is set against three references: the in-run one above
(perf/update_vs_gemm), and, measured in this process before, between and after the two runs (the medians
of the three, as the VM drifts), a fp32 GEMM of the model's MLP shapes (best of 10) and every GEMM of one
default update at its own shapes, back to back (``bench_learner.py``). These two are measured with the
fleet stopped, so they also charge the learner for the cores vLLM and Ray take during its update (the
share it got: ``perf/update_cpu_util``). Last, standalone vLLM and HF ``generate`` tokens/s on the step's
kind of prompts (64 = 16 x 4, T = 1, 48 new tokens) against the in-run rate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OLD = ["learner.old_log_prob_forward=always", "learner.shared_prefix=false", "learner.micro_batch_size=4",
       "data.system_prompt=null", "rollout.cpu_threads=null", "learner.zero_stage=2",
       "cluster.learner_keep_freed_memory=false"]
STAGES = ("generate", "reward", "tag_and_advantage", "old_log_probs", "update", "sync", "step")


def add_training_args(parser: argparse.ArgumentParser, steps: int, out: str) -> None:
    """--steps, --cold-start and --out of the benchmarks that run ``hicra-train`` (``train_command``)."""
    from bench_learner import DEFAULT_COLD_START

    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--cold-start", default=DEFAULT_COLD_START)
    parser.add_argument("--out", default=out)


def train_command(run_dir: Path, args, overrides: list[str]) -> list[str]:
    """``hicra-train`` for ``args.steps`` fresh steps from ``args.cold_start``, no checkpoints, no wandb."""
    return [str(Path(sys.executable).parent / "hicra-train"), f"trainer.run_dir={run_dir}", "trainer.resume=never",
            f"trainer.total_steps={args.steps}", "trainer.save_every=0", "logging.wandb=false",
            f"trainer.init_checkpoint={args.cold_start}", *overrides]


def run_train(name: str, overrides: list[str], args) -> list[dict]:
    run_dir = Path(args.out) / name
    cmd = train_command(run_dir, args, overrides)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"{name}: {time.perf_counter() - t0:.0f} s wall ({' '.join(overrides) or 'defaults'})", flush=True)
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def median_after_warmup(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows[1:] if r.get(key) is not None] or [r.get(key) or 0.0 for r in rows]
    return statistics.median(values)


def without_gemm_reference(rows: list[dict]) -> list[dict]:
    """The rows with the in-run GEMM reference's seconds (perf/gemm_reference_s, timed inside the learner's
    update call) taken out of timing/update_s and timing/step_s: the step as a run without it takes."""
    out = []
    for r in rows:
        extra = r.get("perf/gemm_reference_s") or 0.0
        out.append({**r, **{k: r[k] - extra for k in ("timing/update_s", "timing/step_s") if r.get(k) is not None}})
    return out


def gemm_gflops(hidden: int, inter: int, tokens: int, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(tokens, hidden), torch.randn(hidden, inter)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * tokens * hidden * inter / best / 1e9


def model_shapes_gflops(cfg, cold_start: str) -> float:
    """GFLOP/s of every GEMM of one update of the CPU default at its shapes (``bench_learner``: the first real
    batch it uses), run back to back in this process."""
    from bench_learner import dumped_batches, plan_gemm_shapes

    from hicra_rl.learner.flops import gemm_flops, time_gemms
    from hicra_rl.learner.micro_batches import plan_fixed_size
    from hicra_rl.learner.prefix_sharing import group_ids_by_prompt, pack_plan
    from hicra_rl.learner.sequences import response_spans

    batch = dumped_batches(cold_start)[0]
    starts, lengths = response_spans(batch["response_mask"], batch["attention_mask"])
    ids = batch["input_ids"].tolist()
    prompts = [row[:s] for row, s in zip(ids, starts.tolist())]
    groups = group_ids_by_prompt(prompts)
    ends = (starts + lengths).tolist()
    plan = plan_fixed_size(ends, 16, prompt_lengths=starts.tolist(), groups=groups)
    shapes = plan_gemm_shapes(cfg, pack_plan(ids, starts.tolist(), ends, plan, groups, one_row=True), lengths)
    return gemm_flops(shapes) / time_gemms(shapes) / 1e9


def standalone_generation(model_path: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """(vLLM tokens/s, HF generate tokens/s) on the same prompts, 4 samples each, T = 1."""
    import torch
    from transformers import AutoModelForCausalLM

    from hicra_rl.rollout import VLLMRolloutEngine

    with VLLMRolloutEngine(model_path, dtype="float32", max_model_len=1024, seed=0, kv_cache_gib=1,
                           cpu_threads="all") as engine:
        engine.generate(prompts[:2], n=4, max_tokens=8, seed=0)  # warm-up
        t0 = time.perf_counter()
        out = engine.generate(prompts, n=4, temperature=1.0, max_tokens=max_tokens, seed=1)
        vllm_rate = sum(len(r.token_ids) for r in out) / (time.perf_counter() - t0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    torch.set_num_threads(os.cpu_count() or 1)
    width = max(map(len, prompts))
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts for _ in range(4)])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(4)])
    t0 = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             max_new_tokens=max_tokens, pad_token_id=pad)
    new = gen[:, width:]
    hf_rate = float((new != pad).sum()) / (time.perf_counter() - t0)
    return vllm_rate, hf_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, steps=3, out="runs/bench_step")
    parser.add_argument("--skip-standalone", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.cold_start)
    # the GEMM references drift +-15 % from minute to minute on a shared VM: measure them before, between and
    # after the two runs and take the medians
    refs = []

    def measure_references(when: str) -> None:
        single = gemm_gflops(cfg.hidden_size, cfg.intermediate_size, 1024, os.cpu_count() or 1)
        refs.append((single, model_shapes_gflops(cfg, args.cold_start)))
        print(f"references {when}: single GEMM {refs[-1][0]:.0f} GFLOP/s, the model's shapes {refs[-1][1]:.0f} "
              "GFLOP/s", flush=True)

    measure_references("before the runs")
    rows = {"old": run_train("old", OLD, args)}
    measure_references("between the runs")
    # the new path also times every GEMM of each update at its shapes inside the learner, right after it
    # (perf/gemm_reference_gflops); its seconds are taken out of the step's timings below
    rows["new"] = without_gemm_reference(run_train("new", ["learner.gemm_reference_every=1"], args))
    measure_references("after the runs")
    print(f"\nmedian seconds per step (steps 2..{args.steps}; 16 prompts x 4, HICRA, from the cold start)")
    print(f"  {'stage':<20}{'old':>9}{'new':>9}")
    for stage in STAGES:
        old, new = (median_after_warmup(rows[k], f"timing/{stage}_s") for k in ("old", "new"))
        print(f"  {stage:<20}{old:9.1f}{new:9.1f}")
    ratio = median_after_warmup(rows["new"], "timing/step_s") / median_after_warmup(rows["old"], "timing/step_s")
    print(f"  step time new / old = {ratio:.2f}")

    gemm, shapes_rate = (statistics.median(r[i] for r in refs) for i in (0, 1))
    print(f"fp32 GEMM [1024x{cfg.hidden_size}]x[{cfg.hidden_size}x{cfg.intermediate_size}]: {gemm:.0f} GFLOP/s "
          f"(median of before/between/after: {', '.join(f'{r[0]:.0f}' for r in refs)})")
    print(f"fp32 GEMMs of the model's shapes (every matrix multiply of one default update, back to back): "
          f"{shapes_rate:.0f} GFLOP/s (median of {', '.join(f'{r[1]:.0f}' for r in refs)})")
    for name in ("old", "new"):
        r = rows[name][1:] or rows[name]
        rate = statistics.median(x["perf/update_gflops"] for x in r)   # useful FLOPs (hicra_rl.learner.flops)
        fwd_tokens = statistics.median(x["perf/forward_tokens_per_s"] * x["perf/update_s"] for x in r)
        util = statistics.median(x.get("perf/update_cpu_util", float("nan")) for x in r)
        print(f"learner update ({name}): {fwd_tokens:.0f} forward tokens, "
              f"{statistics.median(x['actor/n_tokens'] for x in r):.0f} response tokens in "
              f"{statistics.median(x['perf/update_s'] for x in r):.1f} s ~ {rate:.0f} GFLOP/s = "
              f"{100 * rate / gemm:.0f} % of the 1024-row GEMM, {100 * rate / shapes_rate:.0f} % of the model's "
              f"shapes; the learner had {100 * util:.0f} % of its threads' CPU time (perf/update_cpu_util)")
    r = rows["new"][1:] or rows["new"]
    ratios = [x["perf/update_vs_gemm"] for x in r]
    print(f"in the run, every GEMM of each new-path update at its shapes, timed in the learner right after it: "
          f"{statistics.median(x['perf/gemm_reference_gflops'] for x in r):.0f} GFLOP/s; learner / it "
          f"(perf/update_vs_gemm) median {100 * statistics.median(ratios):.0f} % (steps 2..{args.steps}: "
          f"{', '.join(f'{100 * v:.0f}' for v in ratios)} %)")
    in_run = median_after_warmup(rows["new"], "perf/generate_tokens_per_s")
    in_run_old = median_after_warmup(rows["old"], "perf/generate_tokens_per_s")
    print(f"in-run generation: new {in_run:.0f} tokens/s, old {in_run_old:.0f} tokens/s")
    if not args.skip_standalone:
        from transformers import AutoTokenizer

        from hicra_rl.config import DataConfig
        from hicra_rl.data.setup import load_prompts

        tok = AutoTokenizer.from_pretrained(args.cold_start)
        _, prompt_set = load_prompts(DataConfig(size=16), tok, 0, role="train")
        vllm_rate, hf_rate = standalone_generation(args.cold_start, [p.token_ids for p in prompt_set.prompts], 48)
        print(f"standalone on 16 x 4 prompts, 48 new tokens: vLLM {vllm_rate:.0f} tokens/s, HF generate "
              f"{hf_rate:.0f} tokens/s; in-run / HF = {in_run / hf_rate:.2f}x, in-run / standalone vLLM = "
              f"{in_run / vllm_rate:.2f}")


if __name__ == "__main__":
    main()
