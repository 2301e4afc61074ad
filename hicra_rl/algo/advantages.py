"""Outcome-reward advantages and HICRA's hierarchy-aware shaping.

Pure tensor functions (no Ray / vLLM / DeepSpeed).  Estimators live in a small
registry, like verl's ``core_algos``, so a config string picks one.

Paper: Wang et al., "Emergent Hierarchical Reasoning in LLMs through
Reinforcement Learning" (arXiv 2509.03646).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from hicra_rl.algo.registry import lookup, registrar
from hicra_rl.batch import pad_ragged, response_layout_mask

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {}


register_advantage = registrar(ADVANTAGE_ESTIMATORS, "advantage estimator")


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
    return lookup(ADVANTAGE_ESTIMATORS, "advantage estimator", name)(rewards, group_ids, **kwargs)


def hicra_advantages(advantages: torch.Tensor, planning_mask: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """HICRA token advantages (paper Eq. 6):  A'_t = A + alpha * |A|  if token t is a planning
    token, else A.

    ``advantages`` is per sequence [B] or already per token [B, T]; ``planning_mask`` is [B, T]
    (bool or 0/1).  Returns [B, T].  With ``alpha == 0`` the result equals GRPO's advantages
    broadcast over tokens, bit for bit; with ``alpha == 1`` a failed response's planning tokens get 0.
    In expectation the shaping scales GRPO's strategy gradient by 1 + alpha (1 - 2 p_bar) (docs/hicra_law.md).
    """
    if not 0.0 <= alpha <= 1.0:  # alpha > 1 would make a failure's planning tokens positive (docs/hicra_law.md)
        raise ValueError(f"HICRA alpha must be in [0, 1], got {alpha}")
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


@dataclass
class StepAdvantages:
    """What one HICRA step hands the learner; token tensors are in the response layout [B, W]
    (column j is a response's j-th token, columns past its length are padding)."""

    sequence: torch.Tensor        # [B] outcome advantage A of each response
    token: torch.Tensor           # [B, W] A + alpha |A| on planning tokens, A on execution tokens, 0 on padding
    response_mask: torch.Tensor   # [B, W] 1.0 on response tokens, 0.0 on padding
    planning_mask: torch.Tensor   # [B, W] bool, False on padding


def hicra_step_advantages(
    rewards: Sequence[float] | torch.Tensor,
    group_ids: Sequence,
    planning_masks: Sequence[Sequence[bool]],
    response_lengths: Sequence[int],
    *,
    estimator: str = "grpo_mean",
    alpha: float = 0.2,
    width: int | None = None,
    **estimator_kwargs,
) -> StepAdvantages:
    """The whole credit assignment of one step (paper Eq. 6 on top of a group baseline): sequence
    advantages from the registered ``estimator``, HICRA shaping with ``alpha`` on the planning tokens,
    padding zeroed.  ``planning_masks`` are ragged, one per response, each as long as the response."""
    lengths = [int(n) for n in response_lengths]
    if len(planning_masks) != len(lengths):
        raise ValueError(f"{len(planning_masks)} planning masks for {len(lengths)} responses")
    for i, (mask, n) in enumerate(zip(planning_masks, lengths)):
        if len(mask) != n:
            raise ValueError(f"response {i}: planning mask has {len(mask)} entries for {n} response tokens")
    width = max(lengths, default=0) if width is None else width
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    sequence = compute_advantages(estimator, rewards, group_ids, **estimator_kwargs)
    planning = pad_ragged([list(m) for m in planning_masks], False, torch.bool, width)
    response_mask = response_layout_mask(torch.tensor(lengths), width)
    token = hicra_advantages(sequence, planning, alpha) * response_mask
    return StepAdvantages(sequence=sequence, token=token, response_mask=response_mask, planning_mask=planning)
