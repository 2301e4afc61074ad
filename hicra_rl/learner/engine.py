"""The policy learner: a DeepSpeed engine around a Hugging Face causal LM, one per rank.

No Ray in here: an actor shell owns one ``PolicyLearner`` per rank and passes it its rank, the world
size and the rendezvous address.  The maths lives in ``hicra_rl.algo`` (chunked log-probs, the
PPO-clip / clip-higher loss); this module only adds micro-batching, gradient accumulation across
micro-batches and ranks, and the optimizer step.

Gradient accumulation (the invariant the tests check): each micro-batch loss is aggregated with the
mini-batch's GLOBAL token / sequence counts (all ranks), so the sum of the micro-batch losses over
all ranks IS the full mini-batch loss.  DeepSpeed averages gradients over the data-parallel ranks,
so each micro-batch loss is multiplied by the world size before ``backward`` (and not divided by
the accumulation steps): the applied gradient is exactly the full-batch gradient.
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta

import numpy as np
import torch

from hicra_rl.algo.logprobs import logprobs_and_entropy
from hicra_rl.algo.losses import PolicyLossConfig, ppo_clip_loss
from hicra_rl.learner.sequences import gather_response, response_layout_mask, response_spans

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCHEDULERS = ("constant", "cosine")
OPTIMIZERS = ("torch_adamw", "deepspeed_adamw")

# Stats summed over micro-batches (each already normalised by the global counts) ...
_SUMMED = ("actor/pg_loss", "actor/kl_ref", "actor/loss")
# ... and stats that are token means of their micro-batch, re-weighted by its token count.
_TOKEN_WEIGHTED = ("actor/clipfrac", "actor/clipfrac_low", "actor/clipfrac_high", "actor/approx_kl", "actor/entropy")


@dataclass
class LearnerConfig:
    model_path: str
    zero_stage: int = 2
    dtype: str = "fp32"                   # "fp32" (CPU) | "bf16" (GPU)
    optimizer: str = "torch_adamw"        # torch AdamW (no JIT build) | DeepSpeed's fused/CPU Adam (GPU)
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_scheduler: str = "constant"        # "constant" | "cosine", both after a linear warmup
    warmup_steps: int = 0
    total_steps: int | None = None        # optimizer steps; required by "cosine"
    min_lr_ratio: float = 0.0             # cosine floor as a fraction of lr
    max_grad_norm: float = 1.0            # <= 0 disables clipping
    micro_batch_size: int = 4             # sequences per forward/backward on one rank
    num_mini_batches: int = 1             # optimizer steps per epoch over a rank's batch
    ppo_epochs: int = 1
    gradient_checkpointing: bool = False
    logprob_chunk_size: int = 1024
    logits_temperature: float = 1.0       # the sampler's temperature: log-probs of pi(.)^(1/T)
    seed: int = 0
    use_reference_model: bool = False     # a frozen copy of the initial policy for the KL term
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)

    def __post_init__(self):
        if isinstance(self.loss, Mapping):
            self.loss = PolicyLossConfig(**self.loss)
        self.betas = tuple(float(b) for b in self.betas)
        problems = []
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_scheduler not in SCHEDULERS:
            problems.append(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.lr_scheduler == "cosine" and not self.total_steps:
            problems.append("lr_scheduler 'cosine' needs total_steps")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("micro_batch_size", "num_mini_batches", "ppo_epochs", "logprob_chunk_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.logits_temperature <= 0:
            problems.append(f"logits_temperature must be > 0, got {self.logits_temperature}")
        if self.loss.kl_coef != 0 and not self.use_reference_model:
            problems.append("loss.kl_coef != 0 needs use_reference_model=True")
        if problems:
            raise ValueError("LearnerConfig: " + "; ".join(problems))


@dataclass
class PolicyBatch:
    """One rank's share of a training batch (layout: ``hicra_rl.learner.sequences``).

    ``advantages`` are per response token, already HICRA-shaped by the caller; ``loss_mask``
    (optional, response layout) removes tokens from the loss on top of the response span.
    """

    input_ids: torch.Tensor           # [B, T]
    attention_mask: torch.Tensor      # [B, T]
    response_mask: torch.Tensor       # [B, T]
    old_log_probs: torch.Tensor       # [B, W]
    advantages: torch.Tensor          # [B, W]
    ref_log_probs: torch.Tensor | None = None  # [B, W]
    loss_mask: torch.Tensor | None = None      # [B, W]

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PolicyLearner:
    """DeepSpeed-trained policy (and optional frozen reference) on one data-parallel rank.

    Every public method except ``full_state_dict``'s return value is collective: all ranks call it
    with batches of the same size.
    """

    def __init__(self, cfg: LearnerConfig, rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1",
                 master_port: int = 29500, local_rank: int = 0, timeout_s: float = 600.0):
        import deepspeed
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(local_rank)
        self.device = torch.device(f"cuda:{local_rank}" if on_gpu else "cpu")
        init_distributed(rank, world_size, master_addr, master_port, "nccl" if on_gpu else "gloo",
                         timeout_s, local_rank)
        seed_everything(cfg.seed)

        self.ds_config = self._deepspeed_config()
        dtype = DTYPES[cfg.dtype]
        # Loaded whole on every rank (CPU memory); ZeRO-3 partitions it in deepspeed.initialize.
        model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.tied_embeddings = bool(getattr(model.config, "tie_word_embeddings", False))

        optimizer = self._torch_optimizer(model) if cfg.optimizer == "torch_adamw" else None
        lr_factor = _lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            model_parameters=None if optimizer is not None else model.parameters(),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor),
        )
        self.engine.train()

        self.ref_engine = None
        if cfg.use_reference_model:
            ref = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype)
            ref.config.use_cache = False
            ref.requires_grad_(False)
            ref_config = {**self.ds_config, "zero_optimization": {"stage": 3 if cfg.zero_stage == 3 else 0}}
            ref_config.pop("optimizer", None)
            self.ref_engine, *_ = deepspeed.initialize(model=ref, config=ref_config)
            self.ref_engine.eval()

    # ------------------------------------------------------------------ set-up
    def _deepspeed_config(self) -> dict:
        cfg = self.cfg
        ds = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,  # the learner marks accumulation boundaries itself
            "gradient_clipping": max(cfg.max_grad_norm, 0.0),
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": cfg.dtype == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if cfg.optimizer == "deepspeed_adamw":
            ds["optimizer"] = {"type": "AdamW", "params": {
                "lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}}
        return ds

    def _torch_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW without weight decay on 1-D parameters (norms, biases)."""
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.cfg.lr, betas=self.cfg.betas,
                                 eps=self.cfg.eps)

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
        # logits at positions first-1 .. end-2 predict the tokens at first .. end-1
        logits = module(input_ids=ids, attention_mask=am, use_cache=False,
                        logits_to_keep=end - first + 1).logits[:, :-1]
        if self.cfg.logits_temperature != 1.0:
            logits = logits / self.cfg.logits_temperature
        logp, ent = logprobs_and_entropy(logits, ids[:, first:end], self.cfg.logprob_chunk_size)
        starts, lengths = starts.to(self.device), lengths.to(self.device)
        return (gather_response(logp, starts, lengths, width, offset=first),
                gather_response(ent, starts, lengths, width, offset=first))

    @torch.no_grad()
    def _log_probs_with(self, engine, input_ids, attention_mask, response_mask, width):
        starts, lengths = response_spans(response_mask, attention_mask)
        width = int(lengths.max()) if width is None else width
        if int(lengths.max()) > width:
            raise ValueError(f"width {width} is shorter than the longest response ({int(lengths.max())})")
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
        """log-probs of the frozen reference policy per response token, [B, width]."""
        if self.ref_engine is None:
            raise RuntimeError("compute_ref_log_probs needs LearnerConfig.use_reference_model=True")
        return self._log_probs_with(self.ref_engine, input_ids, attention_mask, response_mask, width)[0]

    def update(self, batch: PolicyBatch | Mapping) -> dict[str, float]:
        """``ppo_epochs`` x ``num_mini_batches`` optimizer steps over this rank's batch.

        Returns the step-averaged global stats (identical on every rank): pg_loss, the total loss,
        clip fractions, approx-KL to the old policy, entropy, KL to the reference, grad norm (before
        clipping), learning rate, and throughput.  Per-step stats are kept in ``self.step_stats``.
        """
        batch = PolicyBatch.coerce(batch)
        cfg = self.cfg
        b, width = batch.advantages.shape
        if batch.old_log_probs.shape != (b, width):
            raise ValueError(f"old_log_probs {tuple(batch.old_log_probs.shape)} != advantages {(b, width)}")
        if batch.input_ids.shape[0] != b:
            raise ValueError(f"input_ids has {batch.input_ids.shape[0]} rows, advantages {b}")
        if b % cfg.num_mini_batches:
            raise ValueError(f"{b} sequences do not split into {cfg.num_mini_batches} mini-batches")
        self._check_same_batch_size(b)
        starts, lengths = response_spans(batch.response_mask, batch.attention_mask)
        if int(lengths.max()) > width:
            raise ValueError(f"advantages have {width} columns, the longest response has {int(lengths.max())}")
        mask = response_layout_mask(lengths, width)
        if batch.loss_mask is not None:
            mask = mask * batch.loss_mask.float()
        if cfg.loss.kl_coef != 0 and batch.ref_log_probs is None:
            batch.ref_log_probs = self.compute_ref_log_probs(batch.input_ids, batch.attention_mask,
                                                             batch.response_mask, width)

        mini = b // cfg.num_mini_batches
        self.step_stats = []
        t0 = time.perf_counter()
        tokens = 0.0
        for _ in range(cfg.ppo_epochs):
            for m in range(cfg.num_mini_batches):
                rows = slice(m * mini, (m + 1) * mini)
                self.step_stats.append(self._optimizer_step(batch.rows(rows), starts[rows], lengths[rows], mask[rows]))
                tokens += float(batch.attention_mask[rows].sum())
        elapsed = time.perf_counter() - t0
        stats = {k: float(np.mean([s[k] for s in self.step_stats])) for k in self.step_stats[0]}
        stats["actor/lr"] = float(self.lr_scheduler.get_last_lr()[0])
        stats["actor/num_steps"] = float(len(self.step_stats))
        stats["perf/update_s"] = elapsed
        stats["perf/tokens_per_s"] = self._all_reduce_sum([tokens])[0] / max(elapsed, 1e-9)
        return stats

    def _optimizer_step(self, mb_batch: PolicyBatch, starts, lengths, mask) -> dict[str, float]:
        """Forward/backward over the micro-batches of one mini-batch, then one optimizer step."""
        cfg, engine = self.cfg, self.engine
        n_tok, n_seq = self._all_reduce_sum([float(mask.sum()), float(mask.shape[0])])
        sums = dict.fromkeys(_SUMMED, 0.0)
        weighted = dict.fromkeys(_TOKEN_WEIGHTED, 0.0)
        n = mask.shape[0]
        mb = cfg.micro_batch_size
        for s in range(0, n, mb):
            e = min(n, s + mb)
            logp, ent = self._response_log_probs(engine, mb_batch.input_ids[s:e], mb_batch.attention_mask[s:e],
                                                 starts[s:e], lengths[s:e], mask.shape[1])
            rows = slice(s, e)
            loss, st = ppo_clip_loss(logp, self._rows_on_device(mb_batch.old_log_probs, rows),
                                     self._rows_on_device(mb_batch.advantages, rows),
                                     self._rows_on_device(mask, rows), cfg.loss, entropy=ent,
                                     ref_log_probs=self._rows_on_device(mb_batch.ref_log_probs, rows),
                                     token_normalizer=n_tok, seq_normalizer=n_seq)
            engine.set_gradient_accumulation_boundary(e == n)
            # DeepSpeed averages over ranks; the normalisers are global, so undo the average.
            engine.backward(loss * self.world_size, scale_wrt_gas=False)
            sums["actor/loss"] += float(loss.detach())
            sums["actor/pg_loss"] += st["actor/pg_loss"]
            sums["actor/kl_ref"] += st.get("actor/kl_ref", 0.0)
            for k in _TOKEN_WEIGHTED:
                weighted[k] += st[k] * st["actor/n_tokens"]
        grad_norm = self._local_grad_norm() if self._needs_own_grad_norm() else None
        engine.step()
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        totals = self._all_reduce_sum([sums[k] for k in _SUMMED] + [weighted[k] for k in _TOKEN_WEIGHTED])
        out = dict(zip(_SUMMED, totals[:len(_SUMMED)]))
        out.update({k: v / max(n_tok, 1.0) for k, v in zip(_TOKEN_WEIGHTED, totals[len(_SUMMED):])})
        if cfg.loss.kl_coef == 0:
            out.pop("actor/kl_ref")
        out["actor/grad_norm"] = grad_norm
        out["actor/n_tokens"] = n_tok
        return out

    def _rows_on_device(self, t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
        return None if t is None else t[rows].to(self.device)

    def _needs_own_grad_norm(self) -> bool:
        # Plain data parallel in fp32 clips with torch's clip_grad_norm_ and does not keep the norm.
        return self.cfg.zero_stage == 0 and self.cfg.dtype == "fp32"

    def _local_grad_norm(self) -> float:
        """Norm of the (already all-reduced, identical on every rank) full gradients."""
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The full policy weights under HF names, as CPU tensors, on rank 0 ({} elsewhere).

        Collective (ZeRO-3 parameters are gathered one at a time).  Tied weights appear under every
        name (``lm_head.weight`` too: vLLM needs it)."""
        import deepspeed

        module = self.engine.module
        out: dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.rank == 0:
                    out[name] = param.detach().to("cpu", dtype=dtype or param.dtype, copy=True)
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            for buf_name, buf in mod.named_buffers(recurse=False):
                if buf_name not in mod._non_persistent_buffers_set and self.rank == 0:
                    out[f"{mod_name}.{buf_name}" if mod_name else buf_name] = buf.detach().to("cpu", copy=True)
        return out

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    def close(self) -> None:
        """Free the engines; the process group stays (the owner of the process decides)."""
        self.engine = self.ref_engine = None
