"""Policy-gradient losses: PPO-clip with clip-higher (DAPO), dual-clip, loss aggregation,
KL-to-reference estimators, the entropy bonus (the paper's entropy-regularisation baseline) and
rollout-learner mismatch correction (truncated importance sampling / rejection against vLLM's policy).

All inputs are [B, T] tensors over response tokens with a 0/1 ``mask``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from hicra_rl.algo.registry import lookup, registrar

LOSS_AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {}
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
# mode -> fn(log_ratio, mask, cap) -> (weights, keep_mask, capped_frac); see ``rollout_correction``
ROLLOUT_CORRECTIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


register_aggregation = registrar(LOSS_AGGREGATIONS, "loss aggregation")
register_kl_estimator = registrar(KL_ESTIMATORS, "KL estimator")
register_rollout_correction = registrar(ROLLOUT_CORRECTIONS, "rollout correction")


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


# --------------------------------------------------------------------------------------------------
# Rollout-learner mismatch correction (verl ``algorithm.rollout_correction``, TRL
# ``vllm_importance_sampling_correction``, OpenRLHF ``vllm_is_correction_type``)
#
# The tokens were sampled by vLLM (the behaviour policy pi_b), not by the learner's pi_old: different
# kernels, precision and batching make the two differ even with identical weights.  The PPO ratio
# pi / pi_old is only an unbiased off-policy correction if the data came from pi_old, so each token's
# loss is re-weighted by pi_old / pi_b (truncated at a cap: TIS), or sequences whose pi_old / pi_b is
# too far from 1 are dropped (rejection sampling).  Every registered mode takes
#   log_ratio = log pi_old - log pi_b   ([B, T], 0 at padding), mask (float 0/1), cap
# and returns (weights [B, T], keep_mask [B, T] 0/1, capped_frac scalar); no gradient flows.

_LOG_RATIO_BOUND = 20.0  # exp(+-20) ~ 5e8 / 2e-9: the safety bound verl applies before every exp


@register_rollout_correction("none")
def _correction_none(log_ratio, mask, cap):
    """No correction: weights 1, nothing masked (the stats are still computed)."""
    ones = torch.ones_like(log_ratio)
    return ones, ones, log_ratio.new_zeros(())


@register_rollout_correction("token_tis")
def _correction_token_tis(log_ratio, mask, cap):
    """Token-level truncated IS (verl ``rollout_is=token``, TRL's default): w_t = min(pi_old/pi_b, C).
    ``capped_frac``: the fraction of valid tokens whose ratio exceeded C."""
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
    capped = ((ratio > cap).to(mask.dtype) * mask).sum() / mask.sum().clamp_min(1.0)
    return ratio.clamp(max=cap), torch.ones_like(log_ratio), capped


@register_rollout_correction("seq_tis")
def _correction_seq_tis(log_ratio, mask, cap):
    """Sequence-level truncated IS (verl ``rollout_is=sequence``): w = min(prod_t pi_old/pi_b, C) over the
    sequence's valid tokens, the same weight on each of its tokens.  The log of the product is clamped to
    +-20 before the exp.  ``capped_frac``: the fraction of sequences (with a valid token) over C."""
    seq_log = (log_ratio * mask).sum(-1, keepdim=True)
    seq_ratio = torch.exp(seq_log.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
    has_tokens = (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)
    capped = ((seq_ratio > cap).to(mask.dtype) * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)
    return seq_ratio.clamp(max=cap).expand_as(log_ratio), torch.ones_like(log_ratio), capped


@register_rollout_correction("seq_mask")
def _correction_seq_mask(log_ratio, mask, cap):
    """Sequence-level rejection on the geometric mean (verl ``rollout_rs=geometric``): a sequence whose
    exp(mean_t log(pi_old/pi_b)) lies outside [1/C, C] loses all its tokens (keep 0); weights stay 1.
    Compared in log space (|mean log ratio| > log C), so nothing overflows.  verl's typical C here is
    1.0001-1.001: a per-token *average* ratio of 2 is an enormous mismatch."""
    n_tok = mask.sum(-1, keepdim=True)
    mean_log = (log_ratio * mask).sum(-1, keepdim=True) / n_tok.clamp_min(1.0)
    keep = (mean_log.abs() <= math.log(cap)).to(mask.dtype).expand_as(log_ratio)
    return torch.ones_like(log_ratio), keep.contiguous(), log_ratio.new_zeros(())


def rollout_correction(
    old_log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "none",
    cap: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Correction for the mismatch between the policy that sampled (vLLM, pi_b) and the learner's pi_old.

    ``old_log_probs``: log pi_old of each response token as the learner computes it (the old-log-prob
    forward, or on-policy the update's own forward, detached); ``behaviour_log_probs``: the log-prob vLLM
    reported when it sampled the token; ``mask``: 0/1 valid response tokens.  All [B, T].  ``mode`` is a
    key of ``ROLLOUT_CORRECTIONS``:

    * ``none``: weights 1, nothing masked;
    * ``token_tis``: w_t = min(pi_old(y_t) / pi_b(y_t), C) (verl ``rollout_is=token``, TRL
      ``vllm_importance_sampling_correction``, OpenRLHF ``tis``);
    * ``seq_tis``: w = min(prod_t pi_old / pi_b, C) per sequence, broadcast to its tokens (verl
      ``rollout_is=sequence``);
    * ``seq_mask``: drop a sequence whose geometric-mean ratio exp(mean_t log(pi_old / pi_b)) is outside
      [1/C, C]; weights 1 (verl ``rollout_rs=geometric``).

    Returns ``(weights, keep_mask, stats)``: ``weights`` [B, T] detached, 1 at padding; ``keep_mask``
    [B, T] 0/1 (0 on every token of a rejected sequence, 1 elsewhere, padding included) to multiply into
    the policy term; ``stats`` (floats, over valid tokens only; neutral values when there are none):

    * ``rollout_corr/ratio_mean``, ``rollout_corr/ratio_max``: per-token pi_old / pi_b (before truncation);
    * ``rollout_corr/weight_mean``: mean of the factor applied to the policy term, weights x keep_mask;
    * ``rollout_corr/capped_frac``: tokens (``token_tis``) or sequences (``seq_tis``) whose ratio was
      truncated at C; 0 for the other modes;
    * ``rollout_corr/masked_frac``: sequences (with a valid token) rejected; 0 unless ``seq_mask``;
    * ``rollout_corr/kl``: k1 estimate of KL(pi_b || pi_old) = mean log(pi_b / pi_old) over tokens;
    * ``rollout_corr/k3_kl``: k3 estimate of the same KL, mean of r - 1 - log r with r = pi_old / pi_b
      (>= 0 per token, lower variance);
    * ``rollout_corr/log_ppl_diff``: log PPL_learner - log PPL_vLLM, each sequence's mean over its tokens
      of log pi_b - log pi_old, averaged over sequences (> 0: the learner finds the samples less likely).

    Temperature: vLLM's default ``raw_logprobs`` are log-probs of the *untempered* model, whereas at
    temperature T the behaviour policy is softmax(logits / T) (i.e. pi^(1/T), renormalised; top-p / top-k
    truncate it further).  For these weights to mean pi_old / pi_b, the rollout engine must run with
    ``logprobs_mode="processed_logprobs"`` (``hicra_rl.rollout.engine`` supports it) and ``old_log_probs``
    must be the learner's log-probs of logits / T.  With raw log-probs and T != 1 the "ratio" measures the
    temperature, not the mismatch.  Positions where ``mask`` is 0 are ignored, whatever they hold.
    """
    fn = lookup(ROLLOUT_CORRECTIONS, "rollout correction", mode)
    if old_log_probs.shape != behaviour_log_probs.shape or old_log_probs.shape != mask.shape:
        raise ValueError(f"rollout correction needs [B, T] tensors of one shape, got old {tuple(old_log_probs.shape)}, "
                         f"behaviour {tuple(behaviour_log_probs.shape)}, mask {tuple(mask.shape)}")
    if not cap > 1.0:
        raise ValueError(f"rollout correction cap must be > 1, got {cap}")
    with torch.no_grad():
        mask_f = mask.to(torch.float32)
        valid = mask_f > 0
        # garbage at padding (0, -inf, NaN) must not leak into sums: log ratio 0 there
        log_ratio = torch.where(valid, old_log_probs.detach().float() - behaviour_log_probs.detach().float(), 0.0)
        weights, keep, capped = fn(log_ratio, mask_f, cap)
        weights = torch.where(valid, weights, 1.0)

        n_tok = mask_f.sum()
        denom = n_tok.clamp_min(1.0)
        seq_tok = mask_f.sum(-1)
        has_tokens = (seq_tok > 0).to(torch.float32)
        n_seq = has_tokens.sum().clamp_min(1.0)
        bounded = log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        ratio = torch.exp(bounded)
        seq_kept = keep.amin(-1) if keep.shape[-1] > 0 else has_tokens
        has_any = bool(n_tok > 0)
        stats = {
            "rollout_corr/ratio_mean": float((ratio * mask_f).sum() / denom) if has_any else 1.0,
            "rollout_corr/ratio_max": float(ratio[valid].max()) if has_any else 1.0,
            "rollout_corr/weight_mean": float((weights * keep * mask_f).sum() / denom) if has_any else 1.0,
            "rollout_corr/capped_frac": float(capped),
            "rollout_corr/masked_frac": float(((1.0 - seq_kept) * has_tokens).sum() / n_seq),
            "rollout_corr/kl": float((-log_ratio * mask_f).sum() / denom),
            "rollout_corr/k3_kl": float(((ratio - 1.0 - bounded) * mask_f).sum() / denom),
            "rollout_corr/log_ppl_diff": float(((-log_ratio * mask_f).sum(-1) / seq_tok.clamp_min(1.0)).sum() / n_seq),
        }
    dtype = old_log_probs.dtype if old_log_probs.is_floating_point() else torch.float32
    return weights.to(dtype), keep.to(dtype), stats


def sequence_level_stats(mode: str) -> tuple[str, ...]:
    """The ``rollout_corr/*`` statistics of ``rollout_correction`` that are shares or means over sequences
    (not tokens) for ``mode``: ``masked_frac``, ``log_ppl_diff``, and ``capped_frac`` under ``seq_tis``.  A
    caller combining micro-batches weights them by sequences, the others by tokens."""
    return ("rollout_corr/masked_frac", "rollout_corr/log_ppl_diff") + (
        ("rollout_corr/capped_frac",) if mode == "seq_tis" else ())


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
    rollout_correction: str = "none"    # a key of ROLLOUT_CORRECTIONS: none | token_tis | seq_tis | seq_mask
    rollout_correction_cap: float = 2.0  # C: TIS truncation / seq_mask band [1/C, C] (verl, TRL: 2.0)

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
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"unknown rollout correction {self.rollout_correction!r}; "
                             f"choose one of {sorted(ROLLOUT_CORRECTIONS)}")
        if not self.rollout_correction_cap > 1.0:
            raise ValueError(f"rollout_correction_cap must be > 1, got {self.rollout_correction_cap}")


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
    behaviour_log_probs: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip surrogate with asymmetric clipping (DAPO "clip-higher"):

        L_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t),   r_t = pi / pi_old

    optionally dual-clipped for A_t < 0 (Ye et al. 2020): L_t = min(L_t, -c A_t).
    ``advantages`` are per token (HICRA-shaped or broadcast GRPO).  Adds ``kl_coef * KL`` and
    subtracts ``entropy_coef * H``, each aggregated the same way as the policy term.
    Returns (loss, stats) with clip fractions, approx-KL to the old policy, entropy.

    Rollout correction (``rollout_correction``), two ways in:

    * ``behaviour_log_probs`` (vLLM's sampling log-probs, [B, T]): the correction ``cfg.rollout_correction``
      with cap ``cfg.rollout_correction_cap`` is computed here from ``old_log_probs`` and added to the
      stats (``rollout_corr/*``); with ``cfg.rollout_correction="none"`` only the stats are added and the
      loss is exactly the uncorrected one;
    * ``is_weights`` / ``keep_mask``: a correction computed by the caller (e.g. once per batch).

    The per-token policy term becomes L_t * w_t * keep_t before aggregation (w detached, as in verl and
    TRL); the entropy and KL-to-reference terms are not weighted or masked.  Normalisers are NOT
    changed: ``token_normalizer`` / ``seq_normalizer`` stay as the caller computed them, and when they
    are None the counts come from ``mask``, so a rejected sequence's tokens still count in the
    denominator (its tokens add 0 to the numerator).  This is the only choice that is consistent when
    pi_old comes from the update's own forward (on-policy), where the keep mask is known only per
    micro-batch.  verl instead drops rejected samples from the denominator (it edits the response mask
    before the update); a caller wanting that computes ``rollout_correction`` up front and passes
    ``mask * keep_mask`` both as ``mask`` and into its normaliser counts.
    With none of the three given and ``cfg.rollout_correction != "none"`` this raises: the correction
    was asked for but cannot be computed.
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

    corr_stats: dict[str, float] = {}
    if behaviour_log_probs is not None:
        if is_weights is not None or keep_mask is not None:
            raise ValueError("give behaviour_log_probs or a precomputed is_weights / keep_mask, not both")
        is_weights, keep_mask, corr_stats = rollout_correction(
            old_log_probs, behaviour_log_probs, mask, cfg.rollout_correction, cfg.rollout_correction_cap)
        if cfg.rollout_correction == "none":  # metrics only: leave the loss bit-identical
            is_weights = keep_mask = None
    elif cfg.rollout_correction != "none" and is_weights is None and keep_mask is None:
        raise ValueError(f"rollout_correction {cfg.rollout_correction!r} needs behaviour_log_probs (vLLM's "
                         "sampling log-probs) or precomputed is_weights / keep_mask")
    if is_weights is not None:
        pg_mat = pg_mat * is_weights.detach().to(pg_mat.dtype)
    if keep_mask is not None:
        pg_mat = pg_mat * keep_mask.detach().to(pg_mat.dtype)

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
    stats.update(corr_stats)
    return loss, stats
