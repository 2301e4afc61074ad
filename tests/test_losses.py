import math

import pytest
import torch

from hicra_rl.algo import PolicyLossConfig, aggregate_loss, kl_penalty, ppo_clip_loss


def _lp(ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[math.log(ratio)]]), torch.tensor([[0.0]])


def test_on_policy_loss_is_minus_token_mean_advantage():
    adv = torch.tensor([[1.0, -1.0, 2.0], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    lp = torch.zeros(2, 3)
    loss, stats = ppo_clip_loss(lp, lp, adv, mask, PolicyLossConfig())
    assert float(loss) == pytest.approx(-(1 - 1 + 2 + 0.5) / 4)
    assert stats["actor/clipfrac"] == 0.0
    assert stats["actor/approx_kl"] == 0.0


@pytest.mark.parametrize(
    "ratio, adv, expected_loss, low, high",
    [
        (1.5, 1.0, -1.28, 0.0, 1.0),   # clip-higher: 1 + eps_high = 1.28
        (0.5, -1.0, 0.8, 1.0, 0.0),    # clip-low: 1 - eps_low = 0.8
        (0.5, 1.0, -0.5, 0.0, 0.0),    # pessimistic side: unclipped ratio wins
        (1.2, 1.0, -1.2, 0.0, 0.0),    # inside [0.8, 1.28]: 1.2 would be clipped by symmetric 0.2
    ],
)
def test_clip_higher_asymmetric(ratio, adv, expected_loss, low, high):
    lp, old = _lp(ratio)
    loss, stats = ppo_clip_loss(lp, old, torch.tensor([[adv]]), torch.ones(1, 1), PolicyLossConfig())
    assert float(loss) == pytest.approx(expected_loss, abs=1e-6)
    assert stats["actor/clipfrac_low"] == low
    assert stats["actor/clipfrac_high"] == high


def test_dual_clip_bounds_negative_advantage_loss():
    lp, old = _lp(5.0)
    adv = torch.tensor([[-1.0]])
    plain, _ = ppo_clip_loss(lp, old, adv, torch.ones(1, 1), PolicyLossConfig())
    dual, _ = ppo_clip_loss(lp, old, adv, torch.ones(1, 1), PolicyLossConfig(dual_clip_c=3.0))
    assert float(plain) == pytest.approx(5.0)
    assert float(dual) == pytest.approx(3.0)


def test_aggregation_modes_hand_computed():
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(aggregate_loss(loss_mat, mask, "token-mean")) == pytest.approx(10 / 4)
    assert float(aggregate_loss(loss_mat, mask, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm", norm_constant=3.0)) == pytest.approx(
        (6 / 3 + 4 / 3) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(loss_mat, mask, "sum")


def test_dr_grpo_normaliser_is_the_generation_budget_not_the_padded_width():
    """The same two responses padded to width 3 or 8 give the same Dr.GRPO loss: (6/16 + 4/16) / 2."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    wide = torch.nn.functional.pad(loss_mat, (0, 5), value=9.0)
    wide_mask = torch.nn.functional.pad(mask, (0, 5))
    for lm, m in ((loss_mat, mask), (wide, wide_mask)):
        assert float(aggregate_loss(lm, m, "seq-mean-token-sum-norm", norm_constant=16.0)) == pytest.approx(
            (6 / 16 + 4 / 16) / 2)
    with pytest.raises(ValueError, match="needs norm_constant"):
        aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="needs norm_constant"):
        PolicyLossConfig(agg_mode="seq-mean-token-sum-norm")


def test_micro_batch_normalisers_reproduce_full_batch_loss():
    torch.manual_seed(0)
    loss_mat = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).int()
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        full = aggregate_loss(loss_mat, mask, mode, norm_constant=5.0)
        parts = sum(
            aggregate_loss(loss_mat[i : i + 2], mask[i : i + 2], mode, token_normalizer=float(mask.sum()),
                           seq_normalizer=6, norm_constant=5.0)
            for i in range(0, 6, 2)
        )
        assert float(parts) == pytest.approx(float(full), abs=1e-6)


def test_kl_estimators_hand_computed():
    lp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    assert float(kl_penalty(lp, ref, "k1")) == pytest.approx(math.log(2))
    assert float(kl_penalty(lp, ref, "k3")) == pytest.approx(0.5 - 1 + math.log(2))
    assert float(kl_penalty(lp, lp, "k3")) == 0.0


def test_entropy_bonus_and_kl_terms_enter_the_loss():
    lp = torch.zeros(1, 2)
    adv = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    entropy = torch.full((1, 2), 2.0)
    loss, stats = ppo_clip_loss(lp, lp, adv, mask, PolicyLossConfig(entropy_coef=0.01), entropy=entropy)
    assert float(loss) == pytest.approx(-0.02)
    assert stats["actor/entropy"] == pytest.approx(2.0)
    ref = torch.full((1, 2), math.log(0.5))
    loss, stats = ppo_clip_loss(lp, lp, adv, mask, PolicyLossConfig(kl_coef=0.1, kl_estimator="k1"), ref_log_probs=ref)
    assert float(loss) == pytest.approx(0.1 * math.log(2))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        ppo_clip_loss(lp, lp, adv, mask, PolicyLossConfig(kl_coef=0.1))


def test_config_fails_fast():
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        PolicyLossConfig(dual_clip_c=0.5)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        PolicyLossConfig(kl_estimator="k2")


def test_gradient_zero_where_clipped():
    lp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    old = torch.zeros(1, 2)
    loss, _ = ppo_clip_loss(lp, old, torch.ones(1, 2), torch.ones(1, 2), PolicyLossConfig())
    loss.backward()
    # clipped token contributes no gradient; unclipped: d(-r/2)/dlogp = -r/2 = -0.55
    assert lp.grad.tolist()[0] == pytest.approx([0.0, -0.55])
