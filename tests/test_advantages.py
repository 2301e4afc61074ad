import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hicra_rl.algo import compute_advantages, hicra_advantages


def test_mean_centred_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    groups = [0, 0, 0, 0, 1, 1, 1, 1, 2]
    adv = compute_advantages("grpo_mean", rewards, groups)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_std_normalised_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3])
    adv = compute_advantages("grpo_std", rewards, ["a", "a", "a", "a", "b"], eps=0.0)
    # group a: mean 0.5, unbiased std sqrt(1/3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    expected = [0.8660254, -0.8660254, -0.8660254, 0.8660254, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_degenerate_groups_are_exactly_zero_never_nan():
    for name in ("grpo_mean", "grpo_std", "dr_grpo"):
        single = compute_advantages(name, torch.tensor([0.7]), [3])
        equal = compute_advantages(name, torch.tensor([1.0, 1.0, 1.0]), [0, 0, 0])
        assert single.tolist() == [0.0]
        assert equal.tolist() == [0.0, 0.0, 0.0]
        assert not torch.isnan(equal).any()


def test_dr_grpo_equals_mean_centring_and_tensor_group_ids():
    rewards = torch.tensor([2.0, 0.0, 1.0, 5.0])
    groups = torch.tensor([7, 7, 9, 9])
    assert compute_advantages("dr_grpo", rewards, groups).tolist() == [1.0, -1.0, -2.0, 2.0]


def test_unknown_estimator_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        compute_advantages("ppo", torch.tensor([1.0]), [0])
    with pytest.raises(ValueError, match="2 rewards but 3 group ids"):
        compute_advantages("grpo_mean", torch.tensor([1.0, 0.0]), [0, 0, 1])


def test_hicra_hand_computed():
    adv = torch.tensor([0.5, -0.5])
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    out = hicra_advantages(adv, mask, alpha=0.2)
    # success amplified on planning tokens (0.5 + 0.2*0.5), failure dampened (-0.5 + 0.2*0.5)
    assert torch.allclose(out, torch.tensor([[0.6, 0.5, 0.6], [-0.4, -0.4, -0.5]]))


def test_hicra_alpha_zero_is_grpo_exactly():
    adv = torch.randn(6, dtype=torch.float64)
    mask = torch.rand(6, 11) > 0.5
    out = hicra_advantages(adv, mask, alpha=0.0)
    assert torch.equal(out, adv[:, None].expand(6, 11))


@pytest.mark.parametrize("alpha", [1.5, 1.0000001, -0.1])
def test_hicra_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got"):
        hicra_advantages(torch.zeros(1), torch.zeros(1, 2, dtype=torch.bool), alpha=alpha)


def test_hicra_alpha_one_zeroes_a_failures_planning_tokens():
    adv = torch.tensor([0.75, -0.25])
    mask = torch.tensor([[True, False], [True, False]])
    out = hicra_advantages(adv, mask, alpha=1.0)
    assert out.tolist() == [[1.5, 0.75], [0.0, -0.25]]


def test_hicra_rejects_bad_shapes():
    with pytest.raises(ValueError, match="3 sequence advantages"):
        hicra_advantages(torch.zeros(3), torch.zeros(2, 4, dtype=torch.bool))


@settings(max_examples=200, deadline=None)
@given(
    # subnormal advantages (|A| < 2.2e-308) round A(1 - alpha) to 0: no reward is that small
    st.lists(st.floats(-5, 5, allow_nan=False, allow_subnormal=False), min_size=1, max_size=8),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_hicra_planning_advantage_at_least_execution(adv_list, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    adv = torch.tensor(adv_list, dtype=torch.float64)
    mask = torch.rand(len(adv_list), 9, generator=gen) > 0.5
    out = hicra_advantages(adv, mask, alpha)
    for i in range(len(adv_list)):
        # every planning token's advantage >= every execution token's advantage in the same response
        if mask[i].any() and (~mask[i]).any():
            assert out[i][mask[i]].min() >= out[i][~mask[i]].max()
        # execution tokens are untouched; planning tokens equal A + alpha|A|
        assert torch.all(out[i][~mask[i]] == adv[i])
        assert torch.allclose(out[i][mask[i]], adv[i] + alpha * adv[i].abs())
        # the sign of the advantage never flips (alpha <= 1; at alpha = 1 a negative A's planning tokens get 0)
        assert torch.all(torch.sign(out[i]) * torch.sign(adv[i]) >= 0)
        if alpha < 1.0:
            assert torch.all(torch.sign(out[i]) == torch.sign(adv[i]).expand(9)) or adv[i] == 0
    assert math.isfinite(float(out.sum()))
