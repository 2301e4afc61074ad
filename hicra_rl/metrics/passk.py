"""Pass@k (unbiased estimator of Chen et al. 2021) and Pass@1 averaged over k samples."""
from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct:
    1 - C(n - c, k) / C(n, k), computed as a stable product."""
    if not (0 <= c <= n) or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over problems of unbiased pass@k; ``correct[p]`` holds problem p's n sample outcomes."""
    if not correct:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(pass_at_k(len(row), sum(bool(x) for x in row), k) for row in correct) / len(correct)


def mean_pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Pass@1 averaged over the k samples of each problem (the paper's Pass@1, T = 0.6)."""
    return mean_pass_at_k(correct, 1)
