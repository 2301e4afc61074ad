"""Policy-gradient losses: PPO-clip with clip-higher (DAPO), dual-clip, loss aggregation,
KL-to-reference estimators and the entropy bonus (the paper's entropy-regularisation baseline).

All inputs are [B, T] tensors over response tokens with a 0/1 ``mask``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hicra_rl.algo.registry import lookup, registrar

LOSS_AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {}
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


register_aggregation = registrar(LOSS_AGGREGATIONS, "loss aggregation")
register_kl_estimator = registrar(KL_ESTIMATORS, "KL estimator")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


@register_aggregation("token-mean")
def token_mean(loss_mat, mask, token_normalizer=None, **_) -> torch.Tensor:
    """Sum over all valid tokens / number of valid tokens (DAPO's default)."""
    denom = mask.sum().clamp_min(1.0) if token_normalizer is None else token_normalizer
    return (loss_mat * mask).sum() / denom


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(loss_mat, mask, seq_normalizer=None, **_) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean (the original GRPO)."""
    n_seq = loss_mat.shape[0] if seq_normalizer is None else seq_normalizer
    return ((loss_mat * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)).sum() / n_seq


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss_mat, mask, seq_normalizer=None, norm_constant=None, **_) -> torch.Tensor:
    """Dr.GRPO: mean over sequences of (token sum / a constant).  The constant must not depend on the
    batch (Dr.GRPO and verl use the generation budget, ``max_new_tokens``), so it is required."""
    if norm_constant is None:
        raise ValueError("loss aggregation 'seq-mean-token-sum-norm' needs norm_constant (the generation budget, "
                         "rollout.max_new_tokens), not the batch's padded width")
    n_seq = loss_mat.shape[0] if seq_normalizer is None else seq_normalizer
    return ((loss_mat * mask).sum(-1) / norm_constant).sum() / n_seq


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    token_normalizer: float | None = None,
    seq_normalizer: float | None = None,
    norm_constant: float | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar with the aggregation ``mode`` (``LOSS_AGGREGATIONS``).

    ``token_normalizer`` / ``seq_normalizer`` replace the local token / sequence counts so that
    gradient accumulation over micro-batches reproduces the loss of the whole mini-batch.
    """
    return lookup(LOSS_AGGREGATIONS, "loss aggregation", mode)(loss_mat, mask.to(loss_mat.dtype), token_normalizer=token_normalizer, seq_normalizer=seq_normalizer,
              norm_constant=norm_constant)


@register_kl_estimator("k1")
def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """k1 = -log r with r = pi_ref / pi."""
    return -log_ratio


@register_kl_estimator("k3")
def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r (unbiased, always >= 0)."""
    log_ratio = log_ratio.clamp(-20.0, 20.0)
    return torch.exp(log_ratio) - 1.0 - log_ratio


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimators (Schulman, "Approximating KL divergence"), r = pi_ref / pi."""
    return lookup(KL_ESTIMATORS, "KL estimator", kind)(ref_log_probs - log_probs)


@dataclass
class PolicyLossConfig:
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    dual_clip_c: float | None = None  # e.g. 3.0; None disables dual-clip
    agg_mode: str = "token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    norm_constant: float | None = None  # seq-mean-token-sum-norm (Dr.GRPO): the generation budget

    def __post_init__(self):
        if not (0 <= self.clip_ratio_low < 1 and self.clip_ratio_high >= 0):
            raise ValueError(f"bad clip ratios low={self.clip_ratio_low} high={self.clip_ratio_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.agg_mode not in LOSS_AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation {self.agg_mode!r}; choose one of {sorted(LOSS_AGGREGATIONS)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.kl_estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
        if self.agg_mode == "seq-mean-token-sum-norm" and not (self.norm_constant and self.norm_constant > 0):
            raise ValueError("agg_mode 'seq-mean-token-sum-norm' needs norm_constant > 0 (the generation budget)")


def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    entropy: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    token_normalizer: float | None = None,
    seq_normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip surrogate with asymmetric clipping (DAPO "clip-higher"):

        L_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t),   r_t = pi / pi_old

    optionally dual-clipped for A_t < 0 (Ye et al. 2020): L_t = min(L_t, -c A_t).
    ``advantages`` are per token (HICRA-shaped or broadcast GRPO).  Adds ``kl_coef * KL`` and
    subtracts ``entropy_coef * H``, each aggregated the same way as the policy term.
    Returns (loss, stats) with clip fractions, approx-KL to the old policy, entropy.
    """
    mask_f = mask.to(log_probs.dtype)
    log_ratio = (log_probs - old_log_probs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    surr1 = -advantages * ratio
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    surr2 = -advantages * clipped_ratio
    pg_mat = torch.maximum(surr1, surr2)
    if cfg.dual_clip_c is not None:
        dual = -advantages * cfg.dual_clip_c
        pg_mat = torch.where(advantages < 0, torch.minimum(pg_mat, dual), pg_mat)

    agg = dict(mode=cfg.agg_mode, token_normalizer=token_normalizer, seq_normalizer=seq_normalizer,
               norm_constant=cfg.norm_constant)
    loss = aggregate_loss(pg_mat, mask, **agg)
    stats: dict[str, float] = {"actor/pg_loss": float(loss.detach())}

    if cfg.entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs the per-token entropy")
        ent_term = aggregate_loss(entropy, mask, **agg)
        loss = loss - cfg.entropy_coef * ent_term
    if cfg.kl_coef != 0.0:
        if ref_log_probs is None:
            raise ValueError("kl_coef != 0 needs reference log-probs")
        kl_term = aggregate_loss(kl_penalty(log_probs, ref_log_probs, cfg.kl_estimator), mask, **agg)
        loss = loss + cfg.kl_coef * kl_term
        stats["actor/kl_ref"] = float(kl_term.detach())

    with torch.no_grad():
        valid = mask_f.sum().clamp_min(1.0)
        low = ((ratio < 1.0 - cfg.clip_ratio_low) & (advantages < 0)).to(mask_f.dtype)
        high = ((ratio > 1.0 + cfg.clip_ratio_high) & (advantages > 0)).to(mask_f.dtype)
        stats["actor/clipfrac_low"] = float((low * mask_f).sum() / valid)
        stats["actor/clipfrac_high"] = float((high * mask_f).sum() / valid)
        stats["actor/clipfrac"] = stats["actor/clipfrac_low"] + stats["actor/clipfrac_high"]
        # k3 estimate of KL(pi_old || pi)
        stats["actor/approx_kl"] = float(((ratio - 1.0 - log_ratio) * mask_f).sum() / valid)
        if entropy is not None:
            stats["actor/entropy"] = float((entropy * mask_f).sum() / valid)
        stats["actor/n_tokens"] = float(mask_f.sum())
    return loss, stats
