"""Policy-gradient losses: PPO-clip with clip-higher (DAPO), dual-clip, loss aggregation,
KL-to-reference estimators and the entropy bonus (the paper's entropy-regularisation baseline).

All inputs are [B, T] tensors over response tokens with a 0/1 ``mask``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k3")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    token_normalizer: float | None = None,
    seq_normalizer: float | None = None,
    norm_constant: float | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    - ``token-mean``: sum over all valid tokens / number of valid tokens (DAPO's default).
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (original GRPO).
    - ``seq-mean-token-sum-norm``: mean over sequences of token sum / ``norm_constant``
      (Dr.GRPO; the constant defaults to T, the padded generation length).

    ``token_normalizer`` / ``seq_normalizer`` replace the local token / sequence counts so that
    gradient accumulation over micro-batches reproduces the loss of the whole mini-batch.
    """
    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        denom = mask.sum().clamp_min(1.0) if token_normalizer is None else token_normalizer
        return (loss_mat * mask).sum() / denom
    n_seq = loss_mat.shape[0] if seq_normalizer is None else seq_normalizer
    if mode == "seq-mean-token-mean":
        per_seq = (loss_mat * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
        return per_seq.sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        constant = float(loss_mat.shape[-1]) if norm_constant is None else norm_constant
        return ((loss_mat * mask).sum(-1) / constant).sum() / n_seq
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGG_MODES}")


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimators (Schulman, "Approximating KL divergence").
    k1 = log r, k3 = (r - 1) - log r with r = pi_ref / pi  (unbiased, always >= 0)."""
    log_ratio = ref_log_probs - log_probs
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return torch.exp(log_ratio) - 1.0 - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_ESTIMATORS}")


@dataclass
class PolicyLossConfig:
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    dual_clip_c: float | None = None  # e.g. 3.0; None disables dual-clip
    agg_mode: str = "token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"

    def __post_init__(self):
        if not (0 <= self.clip_ratio_low < 1 and self.clip_ratio_high >= 0):
            raise ValueError(f"bad clip ratios low={self.clip_ratio_low} high={self.clip_ratio_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"unknown loss aggregation {self.agg_mode!r}; choose one of {AGG_MODES}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.kl_estimator!r}; choose one of {KL_ESTIMATORS}")


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

    agg = dict(mode=cfg.agg_mode, token_normalizer=token_normalizer, seq_normalizer=seq_normalizer)
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
