"""Semantic entropy over Strategic Grams and token entropy split planning / execution.

Paper (arXiv 2509.03646, Sec. 4): semantic entropy is the Shannon entropy of the frequency
distribution of Strategic Grams used across a step's rollouts; it measures strategic diversity,
whereas token entropy measures local next-token uncertainty.  All entropies are in nats.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable

import torch


def shannon_entropy(counts: Iterable[float]) -> float:
    """H = -sum p_i ln p_i over the non-zero counts (0 for an empty distribution)."""
    values = [float(c) for c in counts if c > 0]
    total = sum(values)
    if total <= 0:
        return 0.0
    # + 0.0: a one-outcome distribution has entropy 0.0, not -0.0 (which prints as "-0.000")
    return -sum((c / total) * math.log(c / total) for c in values) + 0.0


def semantic_entropy(sg_occurrences: Iterable[Iterable[Hashable]], unique_per_response: bool = False) -> float:
    """Shannon entropy of the SG frequency distribution of one step.

    ``sg_occurrences`` holds, per response, the SGs (n-gram strings or cluster ids) found in it.
    By default every occurrence counts; ``unique_per_response`` counts each SG once per response.
    """
    counts: Counter = Counter()
    for used in sg_occurrences:
        counts.update(set(used) if unique_per_response else used)
    return shannon_entropy(counts.values())


def conditional_entropy(pairs: Iterable[tuple[Hashable, Hashable]]) -> float:
    """H(E | S) = -sum_{s,e} p(s, e) ln p(e | s) over (SG, following execution n-gram) pairs:
    how varied the execution is that follows one strategic move."""
    joint = Counter(pairs)
    total = sum(joint.values())
    if total == 0:
        return 0.0
    marginal: Counter = Counter()
    for (s, _), c in joint.items():
        marginal[s] += c
    return -sum((c / total) * math.log(c / marginal[s]) for (s, _), c in joint.items()) + 0.0  # never -0.0


def split_token_means(
    values: torch.Tensor, planning_mask: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, float]:
    """Mean of a per-token quantity [B, T] over planning tokens, execution tokens and all tokens
    (NaN where a split has no token, so an empty split is never reported as 0)."""
    valid = response_mask.bool()
    planning = planning_mask.bool() & valid
    execution = ~planning_mask.bool() & valid
    out = {}
    for name, m in (("planning", planning), ("execution", execution), ("all", valid)):
        n = int(m.sum())
        out[name] = float(values[m].double().sum() / n) if n else float("nan")
    return out
