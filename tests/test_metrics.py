import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hicra_rl.metrics import (
    RelativePerplexity,
    conditional_entropy,
    mean_pass_at_1,
    mean_pass_at_k,
    pass_at_k,
    semantic_entropy,
    split_perplexity,
    split_token_means,
)


def test_semantic_entropy_hand_computed():
    used = [["how many", "in total", "how many"], []]
    # p = (2/3, 1/3)
    assert semantic_entropy(used) == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert semantic_entropy(used, unique_per_response=True) == pytest.approx(math.log(2))
    assert semantic_entropy([[], []]) == 0.0


@given(st.integers(1, 60))
def test_uniform_over_n_sgs_is_ln_n(n):
    used = [[f"sg {i}"] for i in range(n)]
    assert semantic_entropy(used) == pytest.approx(math.log(n))


def test_conditional_entropy_hand_computed():
    pairs = [("s1", "e1"), ("s1", "e2"), ("s2", "e1"), ("s2", "e1")]
    # H(E|S) = 1/2 * ln 2 (s1 splits evenly) + 1/2 * 0 (s2 is deterministic)
    assert conditional_entropy(pairs) == pytest.approx(0.5 * math.log(2))
    assert conditional_entropy([]) == 0.0


def test_split_token_means_and_perplexity():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    planning = torch.tensor([[1, 0, 0], [1, 1, 0]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = split_token_means(values, planning, valid)
    assert out == {"planning": pytest.approx((1 + 4 + 5) / 3), "execution": pytest.approx(5 / 2),
                   "all": pytest.approx(15 / 5)}
    log_probs = -values
    ppl = split_perplexity(log_probs, planning, valid)
    assert ppl["planning"] == pytest.approx(math.exp(10 / 3))
    empty = split_token_means(values, torch.zeros(2, 3), valid)
    assert math.isnan(empty["planning"])


def test_relative_perplexity_baseline_and_state():
    rel = RelativePerplexity()
    assert rel({"planning": 4.0, "execution": 2.0}) == {"planning": 1.0, "execution": 1.0}
    assert rel({"planning": 2.0, "execution": 3.0}) == {"planning": 0.5, "execution": 1.5}
    resumed = RelativePerplexity()
    resumed.load_state_dict(rel.state_dict())
    assert resumed({"planning": 1.0, "execution": 1.0}) == {"planning": 0.25, "execution": 0.5}


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(3, 1, 1) == pytest.approx(1 / 3)
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    correct = [[True, False, False, False], [True, True, False, False]]
    assert mean_pass_at_1(correct) == pytest.approx((0.25 + 0.5) / 2)
    # pass@2: 1 - C(3,2)/C(4,2) = 0.5 ; 1 - C(2,2)/C(4,2) = 5/6
    assert mean_pass_at_k(correct, 2) == pytest.approx((0.5 + 5 / 6) / 2)


@given(st.integers(1, 30), st.data())
def test_pass_at_k_matches_combinatorial_definition(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
