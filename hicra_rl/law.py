"""HICRA's expected-gradient law (docs/hicra_law.md), torch-free so that ``hicra-report`` can use it.

With binary rewards and the group-mean baseline A_i = R_i − p̄, HICRA's advantage A + α|A| on the planning
token where a strategy is chosen moves that choice, in expectation, by GRPO's push times 1 + α(1 − 2p̄),
p̄ being the prompt's success rate.  Above p̄ = ½ HICRA is slower than GRPO, below it faster.
"""
from __future__ import annotations


def hicra_over_grpo_push(alpha, p_bar):
    """E[HICRA push] / E[GRPO push] on the strategy decision: 1 + α(1 − 2p̄).  Works elementwise on numpy
    arrays (p̄ per prompt) as well as on floats."""
    return 1.0 + alpha * (1.0 - 2.0 * p_bar)
