"""The Bradley–Terry pairwise loss of reward-model training (pure torch; ``hicra-rm train``).

A reward model r scores a (prompt, response) with one number.  Bradley–Terry models the probability that
the chosen response beats the rejected one as sigma(r_chosen - r_rejected) (Bradley & Terry 1952; the
reward-model loss of InstructGPT, Ouyang et al. 2022, Eq. 1)::

    loss = mean over pairs of  -log sigma(r_chosen - r_rejected)  =  softplus(-(r_chosen - r_rejected))

(softplus form: no overflow for large margins).  Its gradient with respect to r_chosen is
-sigma(-(r_chosen - r_rejected)) / n_pairs and the opposite for r_rejected: a pair the model already ranks
by a wide margin contributes almost nothing, a tie contributes 1/2 each way.

Pair accuracy (the held-out figure ``hicra-rm train`` reports each epoch) is the share of pairs with
r_chosen > r_rejected, a tie counting 1/2 (so a constant model scores 0.5, not 0 or 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """Sum over pairs of -log sigma(chosen - rejected), divided by ``normalizer`` (default: the number of
    pairs, i.e. the mean).  ``chosen`` and ``rejected`` are the scores of the same pairs, shape [n]."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must be two [n] tensors of one shape, got {tuple(chosen.shape)} "
                         f"and {tuple(rejected.shape)}")
    n = chosen.numel() if normalizer is None else normalizer
    return F.softplus(-(chosen.float() - rejected.float())).sum() / max(float(n), 1.0)


def pair_accuracy(chosen: torch.Tensor | list[float], rejected: torch.Tensor | list[float]) -> float:
    """Share of pairs ranked the preferred way (chosen > rejected); a tie counts 1/2.  NaN for no pairs."""
    c, r = torch.as_tensor(chosen, dtype=torch.float64), torch.as_tensor(rejected, dtype=torch.float64)
    if c.shape != r.shape:
        raise ValueError(f"{c.numel()} chosen scores but {r.numel()} rejected ones")
    if c.numel() == 0:
        return float("nan")
    return float(((c > r).double() + 0.5 * (c == r).double()).mean())


__all__ = ["bradley_terry_loss", "pair_accuracy"]
