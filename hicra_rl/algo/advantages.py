"""Outcome-reward advantages and HICRA's hierarchy-aware shaping.

Pure tensor functions (no Ray / vLLM / DeepSpeed).  Estimators live in a small
registry, like verl's ``core_algos``, so a config string picks one.

Paper: Wang et al., "Emergent Hierarchical Reasoning in LLMs through
Reinforcement Learning" (arXiv 2509.03646).
"""
from __future__ import annotations

from typing import Callable

import torch

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {}


def register_advantage(name: str):
    def wrap(fn):
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} registered twice")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def _group_index(group_ids) -> tuple[torch.Tensor, int]:
    """Map arbitrary group labels (ints, strings) to 0..G-1 indices."""
    if isinstance(group_ids, torch.Tensor):
        _, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0
    index: dict = {}
    out = [index.setdefault(g, len(index)) for g in group_ids]
    return torch.tensor(out, dtype=torch.long), len(index)


def _group_stats(rewards: torch.Tensor, group_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group mean, unbiased group std (0 for groups of one) and group size."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [batch], got shape {tuple(rewards.shape)}")
    idx, n_groups = _group_index(group_ids)
    if idx.numel() != rewards.numel():
        raise ValueError(f"{rewards.numel()} rewards but {idx.numel()} group ids")
    r = rewards.to(torch.float64)
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, idx, torch.ones_like(r))
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, idx, r)
    mean = total / count
    centred = r - mean[idx]
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, idx, centred * centred)
    var = torch.where(count > 1, sq / (count - 1).clamp_min(1), torch.zeros_like(sq))
    return mean[idx], var.sqrt()[idx], count[idx]


@register_advantage("grpo_mean")
def mean_centred_advantages(rewards: torch.Tensor, group_ids, **_) -> torch.Tensor:
    """A_i = R_i - mean_{j in group(i)} R_j  (the paper's default; no std normalisation)."""
    mean, _, _ = _group_stats(rewards, group_ids)
    return (rewards.to(torch.float64) - mean).to(rewards.dtype)


@register_advantage("grpo_std")
def std_normalised_advantages(rewards: torch.Tensor, group_ids, eps: float = 1e-6, **_) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (R_i - mean) / (std + eps); groups with std 0 give exactly 0."""
    mean, std, _ = _group_stats(rewards, group_ids)
    centred = rewards.to(torch.float64) - mean
    adv = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return adv.to(rewards.dtype)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, group_ids, **_) -> torch.Tensor:
    """Dr.GRPO (Liu et al. 2025): mean-centred, no std division.  Its other half, the
    length-unbiased aggregation, is the loss mode ``seq-mean-token-sum-norm``."""
    return mean_centred_advantages(rewards, group_ids)


def compute_advantages(name: str, rewards: torch.Tensor, group_ids, **kwargs) -> torch.Tensor:
    try:
        fn = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    return fn(rewards, group_ids, **kwargs)


def hicra_advantages(advantages: torch.Tensor, planning_mask: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """HICRA token advantages (paper Eq. 6):  A'_t = A + alpha * |A|  if token t is a planning
    token, else A.

    ``advantages`` is per sequence [B] or already per token [B, T]; ``planning_mask`` is [B, T]
    (bool or 0/1).  Returns [B, T].  With ``alpha == 0`` the result equals GRPO's advantages
    broadcast over tokens, bit for bit.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"HICRA alpha must be in [0, 1), got {alpha}")
    if planning_mask.dim() != 2:
        raise ValueError(f"planning_mask must be [batch, tokens], got shape {tuple(planning_mask.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != planning_mask.shape[0]:
            raise ValueError(
                f"{advantages.shape[0]} sequence advantages but planning_mask has {planning_mask.shape[0]} rows"
            )
        advantages = advantages[:, None].expand(planning_mask.shape)
    elif advantages.shape != planning_mask.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} vs planning_mask {tuple(planning_mask.shape)}")
    if alpha == 0.0:
        return advantages.clone()
    bonus = alpha * advantages.abs() * planning_mask.to(advantages.dtype)
    return advantages + bonus
