"""The learner's GFLOP/s against the GEMMs of the model's own shapes, interleaved in one process.

    python benchmarks/bench_learner.py [--rounds 5] [--cold-start DIR] [--rollouts DIR | --synthetic]

On a shared 2-core VM a GEMM's speed drifts by +-15 % from one minute to the next, so a reference measured
once, minutes away from the update, says little. Here each round runs
1. one HICRA update of the DeepSpeed learner on a real batch of the CPU default (16 prompt groups of 4
   responses, packed groups, micro-batches of 16 responses): the prompts, responses and token advantages a
   default run dumped (``trainer.dump_rollouts=true``; committed under ``benchmarks/data/rollouts-cpu-default``,
   one step per round in turn). ``--synthetic`` uses random tokens of the same layout instead (30-38-token
   prompts, 30-45-token responses: even lengths, so less padding than real responses), then
2. the reference: every matrix multiply that update ran, at its shapes (per micro-batch: q, k, v, o,
   gate, up, down for each of the layers at the micro-batch's packed positions, and the vocabulary
   projection at its response tokens; forward, input-gradient and weight-gradient GEMMs), each once,
   back to back, on random fp32 matrices: the time the update would take if it were nothing but GEMMs.
   The learner does this itself right after the update (``learner.gemm_reference_every=1``, the same
   reading ``hicra-train`` logs as perf/gemm_reference_gflops and perf/update_vs_gemm).

The learner's rate (perf/update_gflops) counts useful FLOPs only (6 x weights per real token, the vocabulary
projection at response tokens; no attention, no padding: ``hicra_rl.learner.flops``); the reference's rate is
its GEMM FLOPs over its time. It prints both per round and the median of the ratio, and, for comparison with
``bench_step.py``, a single [1024 x hidden] x [hidden x intermediate] GEMM (best of 10) measured in the same
round.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

DEFAULT_COLD_START = os.path.expanduser("~/.cache/hicra-rl/cold_start/smollm2_135m-arith-v2")
DEFAULT_ROLLOUTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "rollouts-cpu-default")


def default_learner_config(zero_stage: int = 0, **overrides):
    """The ``learner`` config of the CPU default (packed prompt groups, micro-batches of 16 responses)."""
    from hicra_rl.config import LearnerConfig

    return LearnerConfig(zero_stage=zero_stage, lr=3e-6, micro_batch_size=16, shared_prefix=True, **overrides)


def default_learner(cold_start: str, port: int, zero_stage: int = 0, **overrides):
    """The DeepSpeed learner alone (no Ray, no vLLM), world size 1, as the CPU default runs it, on every core."""
    from hicra_rl.learner.engine import PolicyLearner

    torch.set_num_threads(os.cpu_count() or 1)
    return PolicyLearner(default_learner_config(zero_stage, **overrides), model_path=cold_start, master_port=port)


def default_batch(seed: int):
    from hicra_rl.learner.sequences import build_sequences

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(16):
        p = torch.randint(10, 40000, (int(30 + 9 * float(torch.rand(1, generator=g))),), generator=g).tolist()
        for _ in range(4):
            n = int(30 + 16 * float(torch.rand(1, generator=g)))
            prompts.append(p)
            responses.append(torch.randint(10, 40000, (n,), generator=g).tolist())
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    width = max(len(r) for r in responses)
    return {"input_ids": ids, "attention_mask": am, "response_mask": rm,
            "advantages": torch.randn(len(ids), width, generator=g) * 0.1, "old_log_probs": None}


def rollout_batches(folder: str, pad_id: int) -> list[dict]:
    """The learner's batch of each step a run dumped (``<run_dir>/rollouts/step-N.jsonl``), built as the
    driver builds it: [prompt | response] rows, token advantages in the response layout, on-policy."""
    import json
    from pathlib import Path

    from hicra_rl.batch import pad_ragged
    from hicra_rl.learner.sequences import build_sequences

    files = sorted(Path(folder).glob("step-*.jsonl"), key=lambda f: int(f.stem.split("-")[1]))
    if not files:
        raise FileNotFoundError(f"{folder}: no step-N.jsonl (write them with hicra-train trainer.dump_rollouts=true)")
    batches = []
    for f in files:
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        for i, r in enumerate(rows):
            for key in ("prompt_ids", "response_ids", "token_advantages"):
                if key not in r:
                    raise ValueError(f"{f}: row {i + 1} has no field {key!r} (dumped by an older hicra-train?)")
        responses = [r["response_ids"] for r in rows]
        ids, am, rm = build_sequences([r["prompt_ids"] for r in rows], responses, pad_id)
        adv = pad_ragged([r["token_advantages"] for r in rows], 0.0, torch.float32, max(map(len, responses)))
        batches.append({"input_ids": ids, "attention_mask": am, "response_mask": rm, "advantages": adv,
                        "old_log_probs": None})
    return batches


def dumped_batches(cold_start: str, folder: str = DEFAULT_ROLLOUTS) -> list[dict]:
    """``rollout_batches`` padded with the padding token the driver uses for ``cold_start``'s tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cold_start)
    return rollout_batches(folder, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def plan_gemm_shapes(cfg, plan, lengths: torch.Tensor) -> list[tuple[int, int, int]]:
    """Every matrix multiply (``hicra_rl.learner.flops.update_gemm_shapes``) of a shared-prefix plan ((rows,
    packed) pairs, as ``pack_plan`` gives them), ``lengths`` the responses' lengths."""
    from hicra_rl.learner.flops import update_gemm_shapes

    return update_gemm_shapes(cfg, [(packed.padded_tokens, int(lengths[rows].sum())) for rows, packed in plan])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=29617)
    parser.add_argument("--cold-start", default=DEFAULT_COLD_START)
    parser.add_argument("--rollouts", default=DEFAULT_ROLLOUTS, help="a run's rollouts/ folder (dump_rollouts)")
    parser.add_argument("--synthetic", action="store_true", help="random tokens of the default layout instead")
    args = parser.parse_args()
    from bench_step import gemm_gflops
    from transformers import AutoConfig

    from hicra_rl.learner.flops import gemm_flops, update_gemm_shapes

    cfg = AutoConfig.from_pretrained(args.cold_start)
    learner = default_learner(args.cold_start, args.port, gemm_reference_every=1)
    body, head = learner.matrix_weights
    if args.synthetic:
        batches, source = [default_batch(r + 1) for r in range(args.rounds)], "synthetic batches"
    else:
        batches, source = dumped_batches(args.cold_start, args.rollouts), f"the dumped steps of {args.rollouts}"
    learner.update(default_batch(0))   # warm-up
    ratios, single_ratios = [], []
    print(f"{cfg.num_hidden_layers} layers, {body / 1e6:.1f}M matrix weights + {head / 1e6:.1f}M vocabulary "
          f"projection; {torch.get_num_threads()} threads; {source}")
    for r in range(args.rounds):
        batch = batches[r % len(batches)]
        stats = learner.update(batch)   # learner.gemm_reference_every=1: its GEMMs are timed right after it
        rate, ref_rate = stats["perf/update_gflops"], stats["perf/gemm_reference_gflops"]
        gemm_s = gemm_flops(update_gemm_shapes(cfg, learner.last_gemm_work)) / ref_rate / 1e9   # the products' own time (not their operands' set-up)
        single = gemm_gflops(cfg.hidden_size, cfg.intermediate_size, 1024, torch.get_num_threads())
        ratios.append(stats["perf/update_vs_gemm"])
        single_ratios.append(rate / single)
        print(f"round {r + 1}: {int(batch['attention_mask'].sum())} tokens, padding "
              f"{100 * stats['perf/padding_frac']:.1f} % | update {stats['perf/update_s']:5.1f} s, {rate:4.0f} GFLOP/s | "
              f"its GEMMs alone {gemm_s:5.1f} s, {ref_rate:4.0f} GFLOP/s | ratio "
              f"{100 * ratios[-1]:3.0f} % | single 1024-row GEMM {single:4.0f} GFLOP/s, ratio "
              f"{100 * single_ratios[-1]:3.0f} %", flush=True)
    for name, values in (("the GEMMs of the model's shapes", ratios), ("the single 1024-row GEMM", single_ratios)):
        print(f"learner / {name}: median {100 * statistics.median(values):.0f} % "
              f"(min {100 * min(values):.0f}, max {100 * max(values):.0f}) over {len(values)} rounds")


if __name__ == "__main__":
    main()
