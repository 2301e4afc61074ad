"""The policy learner: a DeepSpeed engine around a Hugging Face causal LM, one per rank.

No Ray in here: an actor shell owns one ``PolicyLearner`` per rank and passes it its rank, the world
size and the rendezvous address.  The maths lives in ``hicra_rl.algo`` (chunked log-probs, the
PPO-clip / clip-higher loss); this module adds the one gradient path every objective uses
(:meth:`PolicyLearner.gradient_step`): micro-batches, the global token / sequence normalisers,
world-size scaling, gradient accumulation, clipping and the optimizer step.  RL (``update``) and the
supervised cold start (``hicra-sft``) both call it with their own loss function.

Gradient accumulation (the invariant the tests check): each micro-batch loss is aggregated with the
mini-batch's GLOBAL token / sequence counts (all ranks), so the sum of the micro-batch losses over
all ranks IS the full mini-batch loss.  DeepSpeed averages gradients over the data-parallel ranks,
so each micro-batch loss is multiplied by the world size before ``backward`` (and not divided by
the accumulation steps): the applied gradient is exactly the full-batch gradient.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import timedelta

import numpy as np
import torch

from hicra_rl.algo.logprobs import logprobs_and_entropy
from hicra_rl.algo.losses import PolicyLossConfig, ppo_clip_loss, sequence_level_stats
from hicra_rl.batch import response_layout_mask
from hicra_rl.config import LearnerConfig, check_learner_config
from hicra_rl.learner.flops import gemm_flops, matrix_weights, time_gemms, update_gemm_shapes, useful_flops
from hicra_rl.learner.grouped_attention import enable_grouped_attention
from hicra_rl.learner.micro_batches import plan_fixed_size, plan_token_budget
from hicra_rl.learner.prefix_sharing import PackedGroups, group_ids_by_prompt, pack_plan, shared_prefix_log_probs
from hicra_rl.learner.sequences import logits_only_at, response_spans, response_token_index, scatter_response

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# PPO stats that are token means of their micro-batch (re-weighted by its token count); the loss terms
# are already normalised by the global counts and are summed.
_TOKEN_WEIGHTED = ("actor/clipfrac", "actor/clipfrac_low", "actor/clipfrac_high", "actor/approx_kl", "actor/entropy")


@dataclass
class MicroBatch:
    """What a loss function sees of one micro-batch: the current policy's log-probs and entropy (with
    gradient) and the loss mask, in the response layout [b, W] on the learner's device."""

    log_probs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor            # 0/1 float: tokens that count in the loss
    rows: torch.Tensor            # indices of the mini-batch rows this micro-batch holds
    token_normalizer: float       # tokens of the whole mini-batch that count in the loss, all ranks (>= 1)
    seq_normalizer: float         # sequences of the whole mini-batch with such a token, all ranks (>= 1)
    device: torch.device

    def take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """This micro-batch's rows of a mini-batch tensor, on the device."""
        return None if t is None else t[self.rows].to(self.device)


# loss_fn(micro_batch) -> (loss, stats summed over micro-batches, stats that are token means)
LossFn = Callable[[MicroBatch], tuple[torch.Tensor, dict[str, float], dict[str, float]]]


@dataclass
class PolicyBatch:
    """One rank's share of a training batch (layout: ``hicra_rl.learner.sequences``).

    ``advantages`` are per response token, already HICRA-shaped by the caller; ``loss_mask``
    (optional, response layout) removes tokens from the loss on top of the response span.
    ``old_log_probs`` None: the update is on-policy (one epoch, one mini-batch), so the policy that
    sampled is the one being updated: the ratio is 1 by construction and the update uses its own
    forward's log-probs, detached, instead of a separate forward pass.
    """

    input_ids: torch.Tensor           # [B, T]
    attention_mask: torch.Tensor      # [B, T]
    response_mask: torch.Tensor       # [B, T]
    old_log_probs: torch.Tensor | None  # [B, W]; None: on-policy (see above)
    advantages: torch.Tensor          # [B, W]
    ref_log_probs: torch.Tensor | None = None  # [B, W]
    loss_mask: torch.Tensor | None = None      # [B, W]
    behaviour_log_probs: torch.Tensor | None = None  # [B, W] vLLM's sampling log-probs (rollout correction)

    @classmethod
    def coerce(cls, batch: PolicyBatch | Mapping) -> PolicyBatch:
        if isinstance(batch, cls):
            return batch
        names = {f.name for f in fields(cls)}
        unknown = set(batch) - names
        if unknown:
            raise ValueError(f"PolicyBatch: unknown fields {sorted(unknown)}; expected {sorted(names)}")
        return cls(**batch)

    def rows(self, index: slice) -> PolicyBatch:
        return PolicyBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
                              for f in fields(self)})


def _lr_lambda(kind: str, warmup: int, total: int | None, min_ratio: float):
    """Linear warmup over ``warmup`` steps, then constant or cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: str,
                     timeout_s: float, local_rank: int = 0) -> None:
    """Join the process group (a no-op when one exists).  Sets the env vars DeepSpeed reads, so
    world size 1 needs no torchrun."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=os.environ.get("LOCAL_WORLD_SIZE", "1"),
                      MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    import deepspeed

    if torch.distributed.is_initialized() and (
            torch.distributed.get_world_size() != world_size or torch.distributed.get_rank() != rank):
        raise RuntimeError(
            f"a process group already exists as rank {torch.distributed.get_rank()}/"
            f"{torch.distributed.get_world_size()}, asked for {rank}/{world_size}")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s),
                               init_method=f"tcp://{master_addr}:{master_port}",
                               rank=rank, world_size=world_size)


def _kernel_stats(before, after) -> dict[str, float]:
    """This process's minor page faults between two ``getrusage`` readings, the kernel's share of its CPU
    seconds (on CPU mostly those faults: the kernel zeroes every page a new allocation touches), and its peak
    resident memory so far (Linux reports KiB)."""
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"perf/update_page_faults": float(after.ru_minflt - before.ru_minflt),
            "perf/update_sys_frac": system / max(user + system, 1e-9),
            "perf/learner_max_rss_gib": after.ru_maxrss / 2**20}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PolicyLearner:
    """DeepSpeed-trained policy (and optional frozen reference) on one data-parallel rank.

    Every public method except ``full_state_dict``'s return value is collective: all ranks call it
    with batches of the same size.
    """

    lora_task_type = "CAUSAL_LM"   # peft's task type of learner.lora (the reward learner: SEQ_CLS)

    def __init__(self, cfg: LearnerConfig, *, model_path: str, dtype: str = "float32",
                 loss: PolicyLossConfig | None = None, logits_temperature: float = 1.0, seed: int = 0,
                 total_steps: int | None = None, gradient_checkpointing: bool = False, rank: int = 0,
                 world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29500,
                 local_rank: int = 0, timeout_s: float = 600.0):
        """``cfg`` is the run's ``learner`` config; the rest comes from the other config groups: the
        model (path, dtype, gradient checkpointing), the algorithm (``loss``), the sampler's
        temperature (log-probs of pi^(1/T)) and the number of optimizer steps (cosine schedule)."""
        import deepspeed
        from transformers import AutoModelForCausalLM

        check_learner_config(cfg)
        if dtype not in DTYPES:
            raise ValueError(f"learner dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if cfg.scheduler == "cosine" and not total_steps:
            raise ValueError("learner.scheduler 'cosine' needs total_steps (optimizer steps)")
        if logits_temperature <= 0:
            raise ValueError(f"logits_temperature must be > 0, got {logits_temperature}")
        self.cfg, self.model_path, self.dtype = cfg, model_path, dtype
        self.loss_cfg = loss or PolicyLossConfig()
        self.logits_temperature = logits_temperature
        self.rank, self.world_size = rank, world_size
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(local_rank)
        self.device = torch.device(f"cuda:{local_rank}" if on_gpu else "cpu")
        init_distributed(rank, world_size, master_addr, master_port, "nccl" if on_gpu else "gloo",
                         timeout_s, local_rank)
        seed_everything(seed)

        self.ds_config = self._deepspeed_config()
        torch_dtype = DTYPES[dtype]
        # Loaded whole on every rank (CPU memory); ZeRO-3 partitions it in deepspeed.initialize.
        model = self._load_model(model_path, torch_dtype)
        model.config.use_cache = False
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.shared_prefix and cfg.shared_prefix_attention == "grouped":
            enable_grouped_attention(model)   # packed rows without an [L x L] mask; sdpa for everything else
        self.tied_embeddings = bool(getattr(model.config, "tie_word_embeddings", False))
        self.model_config = model.config
        self.matrix_weights = matrix_weights(model, model.config)   # (decoder, vocabulary projection)
        # learner.lora: the base weights frozen, adapters on the targeted layers (hicra_rl.learner.lora)
        self.lora_layers = {}
        if cfg.lora.rank > 0:
            from hicra_rl.learner.lora import add_lora

            model, self.lora_layers = add_lora(model, cfg.lora, model_path, self.lora_task_type)
        self.lora = bool(self.lora_layers)
        self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if self.lora and rank == 0:
            total = sum(p.numel() for p in model.parameters())
            logging.getLogger("hicra_rl").info(
                "learner: LoRA rank %d (alpha %g) on %d layers: %d trainable parameters, %.3f%% of %d",
                cfg.lora.rank, cfg.lora.alpha, len(self.lora_layers), self.trainable_params,
                100 * self.trainable_params / total, total)
        self.updates = 0
        # (padded positions, response tokens) of each micro-batch of the last gradient_step / update
        self.last_gemm_work: list[tuple[int, int]] = []

        optimizer = self._torch_optimizer(model) if cfg.optimizer == "torch_adamw" else None
        lr_factor = _lr_lambda(cfg.scheduler, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            model_parameters=None if optimizer is not None else [p for p in model.parameters() if p.requires_grad],
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor),
        )
        self.engine.train()

        self.ref_engine = None
        # the KL term's reference is the initial policy: with LoRA the base model itself (adapters disabled,
        # compute_ref_log_probs), else a frozen copy
        if self.loss_cfg.kl_coef != 0 and not self.lora:
            ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
            ref.config.use_cache = False
            ref.requires_grad_(False)
            ref_config = {**self.ds_config, "zero_optimization": {"stage": 3 if cfg.zero_stage == 3 else 0}}
            ref_config.pop("optimizer", None)
            self.ref_engine, *_ = deepspeed.initialize(model=ref, config=ref_config)
            self.ref_engine.eval()

    # ------------------------------------------------------------------ set-up
    def _load_model(self, model_path: str, torch_dtype: torch.dtype) -> torch.nn.Module:
        """The trained model (a causal LM; ``hicra_rl.learner.reward_model.RewardLearner``: a scalar head)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)

    def _deepspeed_config(self) -> dict:
        cfg = self.cfg
        ds = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,  # the learner marks accumulation boundaries itself
            "gradient_clipping": max(cfg.max_grad_norm, 0.0),
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": self.dtype == "bfloat16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if cfg.optimizer == "deepspeed_adamw":
            ds["optimizer"] = {"type": "AdamW", "params": {
                "lr": cfg.lr, "betas": [float(b) for b in cfg.betas], "eps": cfg.eps, "weight_decay": cfg.weight_decay}}
        return ds

    def _torch_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW without weight decay on 1-D parameters (norms, biases); torch's fused kernel on CPU and CUDA
        (one pass over parameters, gradients and moments instead of one per operation: 0.07 s against
        0.34 s for SmolLM2-135M on the 2-core machine)."""
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                 eps=self.cfg.eps, fused=self.device.type in ("cpu", "cuda") or None)

    # ------------------------------------------------------------------ helpers
    def barrier(self) -> None:
        torch.distributed.barrier()

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def _check_same_batch_size(self, n: int) -> None:
        sizes = torch.tensor([n], dtype=torch.long, device=self.device)
        gathered = [torch.zeros_like(sizes) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, sizes)
        sizes = [int(s) for s in gathered]
        if len(set(sizes)) != 1:
            raise ValueError(f"every rank needs the same number of sequences (ZeRO's collectives run per "
                             f"micro-batch); got {sizes} by rank")

    def _response_log_probs(self, module, input_ids, attention_mask, starts, lengths, width):
        """Forward ``module`` on one micro-batch; log pi and entropy per response token [b, width]."""
        end = int((starts + lengths).max())
        first = int(starts.min())
        ids = input_ids[:, :end].to(self.device)
        am = attention_mask[:, :end].to(self.device)
        # the logit at position p predicts the token at p + 1; the head sees positions first-1 .. end-1
        starts, lengths = starts.to(self.device), lengths.to(self.device)
        rows, j = response_token_index(lengths)
        pos = starts[rows] + j
        with logits_only_at(module, rows, pos - first):
            logits = module(input_ids=ids, attention_mask=am, use_cache=False, logits_to_keep=end - first + 1).logits
        if self.logits_temperature != 1.0:
            logits = logits / self.logits_temperature
        logp, ent = logprobs_and_entropy(logits, ids[rows, pos], self.cfg.logprob_chunk_size)
        b = ids.shape[0]
        return scatter_response(logp, rows, j, b, width), scatter_response(ent, rows, j, b, width)

    @torch.no_grad()
    def _log_probs_with(self, engine, input_ids, attention_mask, response_mask, width):
        starts, lengths = response_spans(response_mask, attention_mask)
        width = int(lengths.max()) if width is None else width
        if int(lengths.max()) > width:
            raise ValueError(f"width {width} is shorter than the longest response ({int(lengths.max())})")
        if self.cfg.micro_batch_tokens:  # length-sorted micro-batches under the token budget
            order, out_lp, out_ent = [], [], []
            for rows in self._plan_rows((starts + lengths).tolist()):
                rows_t = torch.tensor(rows, dtype=torch.long)
                lp, ent = self._response_log_probs(engine, input_ids[rows_t], attention_mask[rows_t], starts[rows_t],
                                                   lengths[rows_t], width)
                order += rows
                out_lp.append(lp.cpu())
                out_ent.append(ent.cpu())
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
            return torch.cat(out_lp)[inverse], torch.cat(out_ent)[inverse]
        out_lp, out_ent = [], []
        mb = self.cfg.micro_batch_size
        for s in range(0, input_ids.shape[0], mb):
            lp, ent = self._response_log_probs(engine, input_ids[s:s + mb], attention_mask[s:s + mb],
                                               starts[s:s + mb], lengths[s:s + mb], width)
            out_lp.append(lp.cpu())
            out_ent.append(ent.cpu())
        return torch.cat(out_lp), torch.cat(out_ent)

    # ------------------------------------------------------------------ public API
    def compute_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          response_mask: torch.Tensor, width: int | None = None):
        """(log_probs, entropy) of the current policy per response token, [B, width] (response layout;
        width defaults to the longest response).  No gradient; CPU tensors."""
        was_training = self.engine.training
        self.engine.eval()
        try:
            return self._log_probs_with(self.engine, input_ids, attention_mask, response_mask, width)
        finally:
            self.engine.train(was_training)

    def compute_ref_log_probs(self, input_ids, attention_mask, response_mask, width: int | None = None):
        """log-probs of the frozen reference policy per response token, [B, width] (with LoRA: the base
        model, the policy with its adapters switched off)."""
        if self.lora and self.loss_cfg.kl_coef != 0:
            was_training = self.engine.training
            self.engine.eval()
            try:
                with self.engine.module.disable_adapter():
                    return self._log_probs_with(self.engine, input_ids, attention_mask, response_mask, width)[0]
            finally:
                self.engine.train(was_training)
        if self.ref_engine is None:
            raise RuntimeError("compute_ref_log_probs needs a reference model (loss kl_coef != 0)")
        return self._log_probs_with(self.ref_engine, input_ids, attention_mask, response_mask, width)[0]

    def update(self, batch: PolicyBatch | Mapping) -> dict[str, float]:
        """``ppo_epochs`` x ``mini_batches_per_step`` PPO-clip optimizer steps over this rank's batch.

        Returns the step-averaged global stats (identical on every rank): pg_loss, the total loss,
        clip fractions, approx-KL to the old policy, entropy, KL to the reference, grad norm (before
        clipping), learning rate, and throughput.  Per-step stats are kept in ``self.step_stats``.
        On-policy (``old_log_probs`` None), the log-probs and entropies of the policy before the update
        are kept in ``self.forward_log_probs`` / ``self.forward_entropy`` ([B, W], CPU).
        """
        batch = PolicyBatch.coerce(batch)
        cfg = self.cfg
        b, width = batch.advantages.shape
        self.forward_log_probs = self.forward_entropy = None
        if batch.old_log_probs is None:
            if cfg.ppo_epochs != 1 or cfg.mini_batches_per_step != 1:
                raise ValueError(f"old_log_probs are needed: {cfg.ppo_epochs} epochs x {cfg.mini_batches_per_step} "
                                 "mini-batches is not on-policy after the first optimizer step")
            self.forward_log_probs, self.forward_entropy = torch.zeros(b, width), torch.zeros(b, width)
        elif batch.old_log_probs.shape != (b, width):
            raise ValueError(f"old_log_probs {tuple(batch.old_log_probs.shape)} != advantages {(b, width)}")
        if batch.input_ids.shape[0] != b:
            raise ValueError(f"input_ids has {batch.input_ids.shape[0]} rows, advantages {b}")
        if b % cfg.mini_batches_per_step:
            raise ValueError(f"{b} sequences do not split into {cfg.mini_batches_per_step} mini-batches")
        _, lengths = response_spans(batch.response_mask, batch.attention_mask)
        if int(lengths.max()) > width:
            raise ValueError(f"advantages have {width} columns, the longest response has {int(lengths.max())}")
        if self.loss_cfg.kl_coef != 0 and batch.ref_log_probs is None:
            batch.ref_log_probs = self.compute_ref_log_probs(batch.input_ids, batch.attention_mask,
                                                             batch.response_mask, width)

        mini = b // cfg.mini_batches_per_step
        self.step_stats = []
        gemm_work = []
        t0, cpu0 = time.perf_counter(), time.process_time()
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        tokens = forward_tokens = 0.0
        for _ in range(cfg.ppo_epochs):
            for m in range(cfg.mini_batches_per_step):
                part = batch.rows(slice(m * mini, (m + 1) * mini))
                self._ratio_max = 0.0  # rollout_corr/ratio_max: the largest over micro-batches and ranks
                out = self.gradient_step(part.input_ids, part.attention_mask, part.response_mask,
                                         self._ppo_loss_fn(part), loss_mask=part.loss_mask, width=width)
                out["actor/grad_norm"] = out.pop("grad_norm")
                out["actor/nonfinite_skipped"] = out.pop("nonfinite_skipped")
                out["actor/n_tokens"] = out.pop("n_tokens")
                out["perf/padding_frac"] = out.pop("padding_frac")
                out["perf/micro_batches"] = out.pop("micro_batches")
                if "rollout_corr/ratio_max" in out:
                    out["rollout_corr/ratio_max"] = self._max_over_ranks(self._ratio_max)
                forward_tokens += out.pop("forward_tokens")
                gemm_work += self.last_gemm_work
                self.step_stats.append(out)
                tokens += float(part.attention_mask.sum())
        elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        stats = {k: float(np.mean([s[k] for s in self.step_stats])) for k in self.step_stats[0]}
        stats["actor/lr"] = float(self.lr_scheduler.get_last_lr()[0])
        stats["actor/num_steps"] = float(len(self.step_stats))
        stats["perf/update_s"] = elapsed
        stats["perf/tokens_per_s"] = self._all_reduce_sum([tokens])[0] / max(elapsed, 1e-9)
        # tokens the forward passes actually computed (a shared prompt counts once), rank 0
        stats["perf/forward_tokens_per_s"] = forward_tokens / max(elapsed, 1e-9)
        # CPU seconds of this process over (wall seconds x torch threads), rank 0: on a CPU learner, below ~0.98
        # means other processes took its cores during the update (on a GPU learner it is the host's share)
        stats["perf/update_cpu_util"] = cpu_s / max(elapsed * torch.get_num_threads(), 1e-9)
        stats.update(_kernel_stats(usage0, resource.getrusage(resource.RUSAGE_SELF)))
        self.updates += 1
        self.last_gemm_work = gemm_work
        stats.update(self._gflops_stats(elapsed, forward_tokens))
        return stats

    def _gflops_stats(self, elapsed: float, forward_tokens: float) -> dict[str, float]:
        """perf/update_gflops: this rank's useful FLOPs (``flops.useful_flops``) per second of the update; every
        ``gemm_reference_every``-th update also perf/gemm_reference_gflops, the GFLOP/s of every matrix
        multiply the update ran, at its shapes, timed back to back right now, their ratio, and the seconds
        this took (perf/gemm_reference_s: part of the step's timing/update_s, not of perf/update_s)."""
        head_tokens = sum(t for _, t in self.last_gemm_work)
        rate = useful_flops(*self.matrix_weights, forward_tokens, head_tokens) / max(elapsed, 1e-9) / 1e9
        out = {"perf/update_gflops": rate}
        every = self.cfg.gemm_reference_every
        if every and self.updates % every == 0:
            shapes = update_gemm_shapes(self.model_config, self.last_gemm_work)
            t0 = time.perf_counter()
            reference = gemm_flops(shapes) / max(time_gemms(shapes, DTYPES[self.dtype], self.device), 1e-9) / 1e9
            out["perf/gemm_reference_gflops"] = reference
            out["perf/update_vs_gemm"] = rate / reference
            out["perf/gemm_reference_s"] = time.perf_counter() - t0
        return out

    def _ppo_loss_fn(self, part: PolicyBatch) -> LossFn:
        """The PPO-clip / clip-higher loss of one mini-batch (``hicra_rl.algo.losses``)."""

        def loss_fn(mb: MicroBatch):
            if part.old_log_probs is None:  # on-policy: pi_old is this very forward's policy (ratio 1)
                old = mb.log_probs.detach()
                self.forward_log_probs[mb.rows] = old.cpu()
                self.forward_entropy[mb.rows] = mb.entropy.detach().cpu()
            else:
                old = mb.take(part.old_log_probs)
            loss, st = ppo_clip_loss(mb.log_probs, old, mb.take(part.advantages), mb.mask,
                                     self.loss_cfg, entropy=mb.entropy, ref_log_probs=mb.take(part.ref_log_probs),
                                     token_normalizer=mb.token_normalizer, seq_normalizer=mb.seq_normalizer,
                                     behaviour_log_probs=mb.take(part.behaviour_log_probs))
            summed = {"actor/loss": float(loss.detach()), "actor/pg_loss": st["actor/pg_loss"]}
            if "actor/kl_ref" in st:
                summed["actor/kl_ref"] = st["actor/kl_ref"]
            # shares / means over sequences: weighted by the micro-batch's sequences over the global count,
            # summed (over micro-batches and ranks) they are the whole batch's
            per_seq = sequence_level_stats(self.loss_cfg.rollout_correction)
            mb_seqs = float((mb.mask.sum(-1) > 0).sum())
            summed.update({k: st[k] * mb_seqs / mb.seq_normalizer for k in per_seq if k in st})
            # token means of the micro-batch, re-weighted by its token count (rollout_corr/ratio_max is then
            # replaced by the largest over micro-batches and ranks, in update)
            means = {k: st[k] for k in _TOKEN_WEIGHTED if k in st}
            means.update({k: v for k, v in st.items() if k.startswith("rollout_corr/") and k not in per_seq})
            if "rollout_corr/ratio_max" in st:
                self._ratio_max = max(self._ratio_max, st["rollout_corr/ratio_max"])
            return loss, summed, means

        return loss_fn

    def gradient_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                      loss_fn: LossFn, *, loss_mask: torch.Tensor | None = None,
                      width: int | None = None) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch: forward/backward over micro-batches of
        ``micro_batch_size`` sequences (or ``micro_batch_tokens`` padded tokens) with ``loss_fn``, global
        normalisers, world-size scaling, accumulation, gradient clipping.  Collective.

        Returns the stats all-reduced over ranks: ``loss_fn``'s summed stats, its token-mean stats
        (weighted by each micro-batch's token count), ``grad_norm`` (before clipping) and ``n_tokens``;
        and this rank's ``padding_frac``, ``forward_tokens`` and ``micro_batches`` (the same on every rank).
        """
        engine = self.engine
        self._check_same_batch_size(input_ids.shape[0])
        starts, lengths = response_spans(response_mask, attention_mask)
        width = int(lengths.max()) if width is None else width
        if int(lengths.max()) > width:
            raise ValueError(f"width {width} is shorter than the longest response ({int(lengths.max())})")
        mask = response_layout_mask(lengths, width)
        if loss_mask is not None:
            mask = mask * loss_mask.float()
        # tokens and sequences that count in the loss: a row the loss mask removes entirely (a fill-up group
        # of dynamic sampling) is in neither; at least 1 each, so an all-masked batch is a loss of 0, not 0 / 0
        n_tok, n_seq = self._all_reduce_sum([float(mask.sum()), float((mask.sum(-1) > 0).sum())])
        summed: dict[str, float] = {}
        weighted: dict[str, float] = {}
        plan = self._plan_micro_batches(input_ids, starts, lengths)
        real_tokens = 0.0
        self.last_gemm_work = []
        for i, (rows, packed) in enumerate(plan):
            if packed is None:
                logp, ent = self._response_log_probs(engine, input_ids[rows], attention_mask[rows], starts[rows],
                                                     lengths[rows], width)
                real_tokens += float((starts[rows] + lengths[rows]).sum())
                positions = len(rows) * int((starts[rows] + lengths[rows]).max())
            else:
                logp, ent = shared_prefix_log_probs(engine, packed.to(self.device), width, self.logits_temperature,
                                                    self.cfg.logprob_chunk_size)
                real_tokens += packed.n_tokens
                positions = packed.padded_tokens
            self.last_gemm_work.append((positions, int(lengths[rows].sum())))
            mb_mask = mask[rows].to(self.device)
            mb = MicroBatch(logp, ent, mb_mask, rows, max(n_tok, 1.0), max(n_seq, 1.0), self.device)
            loss, mb_summed, mb_means = loss_fn(mb)
            engine.set_gradient_accumulation_boundary(i == len(plan) - 1)
            # DeepSpeed averages over ranks; the normalisers are global, so undo the average.
            with self._gradient_sync():
                engine.backward(loss * self.world_size, scale_wrt_gas=False)
            # token-mean stats weigh each micro-batch by its loss tokens; a batch whose every token is masked
            # (all fill-up groups) weighs micro-batches equally, so a stat's own no-token value (e.g. a
            # rollout-correction ratio of 1) comes through instead of 0 / 0
            mb_weight = float(mb_mask.sum()) if n_tok > 0 else 1.0
            for k, v in mb_summed.items():
                summed[k] = summed.get(k, 0.0) + v
            for k, v in mb_means.items():
                weighted[k] = weighted.get(k, 0.0) + v * mb_weight
        # A non-finite gradient norm skips the optimizer step: DeepSpeed's ZeRO optimizers do it themselves
        # (their overflow check: grads cleared, norm reported as inf); the plain fp32 path skips it here.
        if self._needs_own_grad_norm():
            grad_norm = self._local_grad_norm()
            skipped = not math.isfinite(grad_norm)
            if skipped:
                engine.zero_grad()
            else:
                engine.step()
        else:
            engine.step()
            grad_norm = engine.get_global_grad_norm()  # None when DeepSpeed computed no norm (no clipping)
            skipped = grad_norm is not None and not math.isfinite(float(grad_norm))
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        keys_summed, keys_weighted = sorted(summed), sorted(weighted)
        totals = self._all_reduce_sum([summed[k] for k in keys_summed] + [weighted[k] for k in keys_weighted]
                                      + [float(len(plan))])
        out = dict(zip(keys_summed, totals[:len(keys_summed)]))
        weight_total = n_tok if n_tok > 0 else max(totals[-1], 1.0)
        out.update({k: v / weight_total for k, v in zip(keys_weighted, totals[len(keys_summed):-1])})
        out["grad_norm"] = grad_norm
        out["nonfinite_skipped"] = float(skipped)
        out["n_tokens"] = n_tok
        out["padding_frac"] = 1.0 - real_tokens / max(sum(p for p, _ in self.last_gemm_work), 1.0)
        out["forward_tokens"] = real_tokens
        out["micro_batches"] = float(len(plan))
        return out

    def _plan_micro_batches(self, input_ids, starts, lengths) -> list[tuple[torch.Tensor, PackedGroups | None]]:
        """(rows, packed) per micro-batch.  Rows are grouped by length (each micro-batch is cut to its longest
        row: less padding; the loss is a sum with global normalisers, so grouping changes only the summation
        order).  With ``shared_prefix`` a micro-batch is whole prompt groups (up to ``micro_batch_size``
        responses, at least one group) packed into one row each, every prompt computed once.  With
        ``micro_batch_tokens`` the micro-batches are cut by padded tokens instead (``_plan_rows``)."""
        ends = starts + lengths
        if not self.cfg.shared_prefix:
            return [(torch.tensor(rows, dtype=torch.long), None) for rows in self._plan_rows(ends.tolist())]
        ids = input_ids.tolist()
        group_of = group_ids_by_prompt([row[:s] for row, s in zip(ids, starts.tolist())])
        plan = self._plan_rows(ends.tolist(), starts.tolist(), group_of)
        # the grouped attention takes a micro-batch's groups in one unpadded row; the masked one a row each
        # (its [L x L] mask grows with the square of the row)
        return pack_plan(ids, starts.tolist(), ends.tolist(), plan, group_of,
                         one_row=self.cfg.shared_prefix_attention == "grouped")

    def _plan_rows(self, ends: list[int], prompt_lengths: list[int] | None = None,
                   groups: list[int] | None = None) -> list[list[int]]:
        """Row indices per micro-batch (``hicra_rl.learner.micro_batches``): ``micro_batch_size`` sequences
        (or prompt groups with ``groups``), or with ``micro_batch_tokens`` > 0 a padded-token budget.  Every
        rank must run the same number of micro-batches (ZeRO's collectives): under a token budget the ranks
        agree on the largest count and split their plans up to it; with fixed sizes the counts agree by
        construction (the same number of rows), except for prompt groups, where a mismatch raises."""
        budget = self.cfg.micro_batch_tokens
        if not budget:
            plan = plan_fixed_size(ends, self.cfg.micro_batch_size, prompt_lengths=prompt_lengths, groups=groups)
            if groups is not None:
                self._check_same_count(len(plan), "micro-batches (shared_prefix packs whole prompt groups)")
            return plan
        plan = plan_token_budget(ends, budget, prompt_lengths=prompt_lengths, groups=groups)
        target = int(self._max_over_ranks(len(plan)))
        if target > len(plan):
            plan = plan_token_budget(ends, budget, target, prompt_lengths=prompt_lengths, groups=groups)
        return plan

    def _max_over_ranks(self, x: float) -> float:
        """The largest ``x`` of all ranks (collective)."""
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def _check_same_count(self, n: int, what: str) -> None:
        counts = torch.tensor([n], dtype=torch.long, device=self.device)
        gathered = [torch.zeros_like(counts) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, counts)
        if len({int(c) for c in gathered}) != 1:
            raise ValueError(f"every rank needs the same number of {what}; got {[int(c) for c in gathered]} by rank "
                             "(give each rank whole prompt groups of equal sizes, or set learner.micro_batch_tokens)")

    def broadcast_from_rank0(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (collective): decisions such as "stop now" must agree."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.broadcast(t, src=0)
        return float(t.item())

    def _gradient_sync(self):
        """DeepSpeed's all-reduce of the gradients after a backward, except where it is the identity: one rank
        without ZeRO, whose all-reduce still flattens every gradient into a buffer and copies it back
        (0.2 s of a 16 s update for SmolLM2-135M on the 2-core machine)."""
        if self.world_size == 1 and self.cfg.zero_stage == 0:
            return self.engine.no_sync()
        return contextlib.nullcontext()

    def _needs_own_grad_norm(self) -> bool:
        # Plain data parallel in fp32 clips with torch's clip_grad_norm_ and does not keep the norm.
        return self.cfg.zero_stage == 0 and self.dtype == "float32"

    def _local_grad_norm(self) -> float:
        """Norm of the (already all-reduced, identical on every rank) full gradients."""
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The full policy weights under HF names, as CPU tensors, on rank 0 ({} elsewhere).

        Collective (ZeRO-3 parameters are gathered one at a time).  Tied weights appear under every
        name (``lm_head.weight`` too: vLLM needs it).  With LoRA: the base model's names and shapes, the
        adapters merged into their layers (``hicra_rl.learner.lora.merged_state_dict``)."""
        import deepspeed

        module = self.engine.module
        out: dict[str, torch.Tensor] = {}
        copy_dtype = None if self.lora else dtype   # with LoRA: merge in the weights' dtype, then cast
        for name, param in module.named_parameters(remove_duplicate=False):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.rank == 0:
                    out[name] = param.detach().to("cpu", dtype=copy_dtype or param.dtype, copy=True)
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            for buf_name, buf in mod.named_buffers(recurse=False):
                if buf_name not in mod._non_persistent_buffers_set and self.rank == 0:
                    out[f"{mod_name}.{buf_name}" if mod_name else buf_name] = buf.detach().to("cpu", copy=True)
        if self.lora and self.rank == 0:
            from hicra_rl.learner.lora import merged_state_dict

            out = merged_state_dict(out, self.lora_layers)
            if dtype is not None:
                out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
        return out

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA adapters (peft's parameter names), CPU copies, on rank 0 ({} elsewhere); collective."""
        import deepspeed

        from hicra_rl.learner.lora import is_adapter_param

        out: dict[str, torch.Tensor] = {}
        for name, param in self.engine.module.named_parameters():
            if is_adapter_param(name):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if self.rank == 0:
                        out[name] = param.detach().to("cpu", copy=True)
        return out

    def base_fingerprint(self) -> dict:
        """Elements and norms of the frozen (LoRA base) weights, the same on every rank; collective under
        ZeRO-3.  A checkpoint records it: the base is not saved, a resume loads it from the model path."""
        import deepspeed

        from hicra_rl.learner.lora import weights_fingerprint

        def frozen():
            for name, param in self.engine.module.named_parameters():
                if not param.requires_grad:
                    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                        yield name, param.detach()

        return weights_fingerprint(frozen())

    def hf_module(self) -> torch.nn.Module:
        """The HF model (``save_pretrained`` of the merged weights): the engine's module, or under LoRA the
        model peft wraps."""
        module = self.engine.module
        return module.get_base_model() if self.lora else module

    def _base_optimizer(self):
        opt = self.optimizer
        inner = getattr(opt, "optimizer", None)   # DeepSpeed's ZeRO / bf16 wrappers keep torch's optimizer here
        return inner if inner is not None and hasattr(inner, "state") else opt

    def optimizer_state_numel(self) -> int:
        """Elements of this rank's optimizer state tensors (AdamW: the two moments; scalars such as the step
        count left out): trainable parameters x 2 without ZeRO, this rank's partition x 2 with ZeRO-1/2/3."""
        return sum(t.numel() for st in self._base_optimizer().state.values() for t in st.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def optimizer_state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self._base_optimizer().state.values()
                   for t in st.values() if torch.is_tensor(t) and t.dim() > 0)

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    def close(self) -> None:
        """Free the engines; the process group stays (the owner of the process decides)."""
        self.engine = self.ref_engine = None
