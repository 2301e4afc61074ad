"""A LoRA policy's two weight-sync paths into vLLM, side by side in one run (issue 23, item 3; docs/lora.md).

    python benchmarks/lora_sync_paths.py [--rounds 3] [--rank 16] [--alpha 32] [--model DIR] [--max-tokens 128]

- **merged** (what ``hicra-train`` does): the learner merges ``W + (alpha / r) B A`` into the base weights
  (``hicra_rl.learner.lora.merged_state_dict``) and the engine reloads the whole model
  (``VLLMRolloutEngine.update_weights``, the shm-file transport);
- **adapter** (vLLM's own LoRA path): the adapters are written as a peft folder (``save_pretrained``) and the engine
  loads them under a new adapter id (``VLLMRolloutEngine.load_adapter``); vLLM applies them at every forward.

One process holds both engines (the CPU default's model, ``enforce_eager`` as on CPU), and the same LoRA policy
(rank/alpha on all-linear, ``B`` drawn at random so that the adapters matter). Rounds alternate which path goes
first (ABBA), so both see the same minutes of this VM. Per round and path: the sync (merge or write + load) and a
rollout of the CPU default's shape (16 training prompts x 4 samples, T = 1, ``--max-tokens``), as tokens per
second. Before timing, the log-probs both engines give the same 8 sampled responses must agree within 1e-3
(the two paths serve one policy). Prints medians and adapter / merged ratios.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DEFAULT_COLD_START = os.path.expanduser("~/.cache/hicra-rl/cold_start/smollm2_135m-arith-v2")


def training_prompts(model_path: str, n: int) -> list[list[int]]:
    """The first ``n`` training prompts of the CPU default (conf/config.yaml), tokenised as the trainer does."""
    from hydra import compose, initialize_config_dir
    from transformers import AutoTokenizer

    from hicra_rl.config import register_configs, to_schema
    from hicra_rl.data.setup import load_prompts

    register_configs()
    with initialize_config_dir(config_dir=str(HERE.parent / "conf"), version_base=None):
        cfg = to_schema(compose(config_name="config"))
    _, prompts = load_prompts(cfg.data, AutoTokenizer.from_pretrained(model_path), seed=cfg.trainer.seed, role="train")
    return [list(p.token_ids) for p in prompts.prompts[:n]]


def lora_policy(model_path: str, rank: int, alpha: float, seed: int):
    """(peft model, layer infos) of the base with adapters on all-linear, ``B`` ~ N(0, 0.02) (peft starts it at 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hicra_rl.config import LearnerLoraConfig
    from hicra_rl.learner.lora import add_lora

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    wrapped, layers = add_lora(model, LearnerLoraConfig(rank=rank, alpha=alpha), model_path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return wrapped, layers


def merged_weights(wrapped, layers) -> dict:
    from hicra_rl.learner.lora import merged_state_dict

    named = {n: t.detach().clone() for n, t in wrapped.state_dict(keep_vars=False).items()}
    return merged_state_dict(named, layers)


def rollout_tokens_per_s(engine, prompts, max_tokens: int, seed: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, n=4, temperature=1.0, max_tokens=max_tokens, seed=seed)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in out)
    return tokens / seconds, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--model", default=DEFAULT_COLD_START)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(f"lora_sync_paths: {args.model} is not a model folder (make run writes the cold start)")
    from hicra_rl.rollout.engine import VLLMRolloutEngine

    prompts = training_prompts(args.model, 16)
    wrapped, layers = lora_policy(args.model, args.rank, args.alpha, seed=0)
    shm = tempfile.mkdtemp(prefix="hicra-lora-sync-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    engines = {}
    try:
        t0 = time.perf_counter()
        engines["merged"] = VLLMRolloutEngine(args.model, dtype="float32", max_model_len=1024, kv_cache_gib=1)
        start_merged = time.perf_counter() - t0
        t0 = time.perf_counter()
        engines["adapter"] = VLLMRolloutEngine(args.model, dtype="float32", max_model_len=1024, kv_cache_gib=1,
                                               max_lora_rank=args.rank)
        start_adapter = time.perf_counter() - t0

        def sync(path: str, round_: int) -> float:
            t0 = time.perf_counter()
            if path == "merged":
                engines["merged"].update_weights(merged_weights(wrapped, layers))
            else:
                folder = os.path.join(shm, f"adapter-{round_}")
                wrapped.save_pretrained(folder)
                engines["adapter"].load_adapter(folder)
                shutil.rmtree(os.path.join(shm, f"adapter-{round_ - 1}"), ignore_errors=True)
            return time.perf_counter() - t0

        first = {path: sync(path, 0) for path in ("merged", "adapter")}
        # one policy, two paths: the same log-probs on the same responses
        sampled = engines["merged"].generate(prompts[:8], n=1, temperature=1.0, max_tokens=32, seed=1)
        resp = [r.token_ids for r in sampled]
        lp = {k: e.prompt_logprobs(prompts[:8], resp) for k, e in engines.items()}
        diff = max(abs(a - b) for ra, rb in zip(lp["merged"], lp["adapter"]) for a, b in zip(ra, rb))
        print(f"max |log-prob merged - adapter| over {sum(map(len, resp))} tokens: {diff:.2e}")
        if diff > 1e-3:
            print("lora_sync_paths: the two paths do not serve the same policy", file=sys.stderr)
            return 1
        times = {k: {"sync_s": [], "tok_s": []} for k in engines}
        for r in range(1, args.rounds + 1):
            order = ("merged", "adapter") if r % 2 else ("adapter", "merged")
            for path in order:
                times[path]["sync_s"].append(sync(path, r))
                tok_s, n_tok = rollout_tokens_per_s(engines[path], prompts, args.max_tokens, seed=100 + r)
                times[path]["tok_s"].append(tok_s)
                print(f"round {r} {path:7s}: sync {times[path]['sync_s'][-1]:.2f} s, rollout {tok_s:.0f} tokens/s "
                      f"({n_tok} tokens)", flush=True)
    finally:
        for e in engines.values():
            e.close()
        shutil.rmtree(shm, ignore_errors=True)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}
    print(f"\nLoRA rank {args.rank} (alpha {args.alpha}) on all-linear of {args.model}; {args.rounds} rounds, ABBA")
    print("| path | engine start (s) | first sync (s) | sync (s, median) | rollout tokens/s (median) |")
    print("| --- | --- | --- | --- | --- |")
    for path, start in (("merged", start_merged), ("adapter", start_adapter)):
        print(f"| {path} | {start:.1f} | {first[path]:.2f} | {med[path]['sync_s']:.2f} | {med[path]['tok_s']:.0f} |")
    print(f"\nadapter / merged: sync {med['adapter']['sync_s'] / med['merged']['sync_s']:.2f}x, "
          f"rollout throughput {med['adapter']['tok_s'] / med['merged']['tok_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
