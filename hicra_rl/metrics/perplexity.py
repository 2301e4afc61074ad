"""Perplexity split planning / execution, relative to its value at step 0 (paper Fig. 3 style)."""
from __future__ import annotations

import math

import torch

from hicra_rl.metrics.entropy import split_token_means


def split_perplexity(
    log_probs: torch.Tensor, planning_mask: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, float]:
    """exp(mean NLL) over planning, execution and all response tokens."""
    nll = split_token_means(-log_probs, planning_mask, response_mask)
    return {k: (math.exp(v) if not math.isnan(v) else float("nan")) for k, v in nll.items()}


class RelativePerplexity:
    """Relative perplexity = perplexity(step) / perplexity(first step seen), per split.

    Its state (the step-0 baseline) is saved in checkpoints so a resumed run reports the same ratios.
    """

    def __init__(self, baseline: dict[str, float] | None = None):
        self.baseline = dict(baseline) if baseline else {}

    def __call__(self, perplexity: dict[str, float]) -> dict[str, float]:
        for k, v in perplexity.items():
            if k not in self.baseline and not math.isnan(v):
                self.baseline[k] = v
        return {k: (v / self.baseline[k] if k in self.baseline else float("nan")) for k, v in perplexity.items()}

    def state_dict(self) -> dict:
        return {"baseline": dict(self.baseline)}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = dict(state.get("baseline", {}))
