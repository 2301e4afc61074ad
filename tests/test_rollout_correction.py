"""Rollout-learner mismatch correction (hicra_rl.algo.losses.rollout_correction): truncated importance
sampling against vLLM's behaviour policy (token / sequence) and geometric sequence rejection, each
checked on hand-computed values, and their effect on ppo_clip_loss."""
import math
from pathlib import Path

import pytest
import torch

from hicra_rl.algo import ROLLOUT_CORRECTIONS, PolicyLossConfig, ppo_clip_loss, rollout_correction

LN = math.log
NAN = float("nan")

# log pi_old - log pi_b per token; x = padding (its values must not matter)
#   row 0: ratios 3, 0.5, 1        row 1: 1.5, x, x
#   row 2: ratios 4, 4, 1          row 3: 0.25, 0.25, x
LOG_RATIO = torch.tensor([[LN(3), LN(0.5), 0.0],
                          [LN(1.5), 0.0, 0.0],
                          [LN(4), LN(4), 0.0],
                          [LN(0.25), LN(0.25), 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
VALID = MASK.bool()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(old, behaviour) log-probs with LOG_RATIO as their difference and garbage at padding."""
    beh = -torch.arange(1, 13, dtype=torch.float32).reshape(4, 3) / 4
    old = beh + LOG_RATIO
    beh = torch.where(VALID, beh, torch.tensor(NAN))       # vLLM reports nothing there
    old = torch.where(VALID, old, torch.tensor(-1e30))
    return old, beh


def _close(a: torch.Tensor, b) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-5, atol=1e-6)


def test_the_registry_has_the_four_modes():
    assert set(ROLLOUT_CORRECTIONS) == {"none", "token_tis", "seq_tis", "seq_mask"}
    with pytest.raises(ValueError, match="unknown rollout correction 'icepop'"):
        rollout_correction(*_inputs(), MASK, "icepop")
    with pytest.raises(ValueError, match="cap must be > 1"):
        rollout_correction(*_inputs(), MASK, "token_tis", cap=1.0)


def test_none_weights_one_nothing_masked():
    w, keep, stats = rollout_correction(*_inputs(), MASK, "none")
    assert torch.equal(w, torch.ones(4, 3)) and torch.equal(keep, torch.ones(4, 3))
    assert stats["rollout_corr/capped_frac"] == 0.0 and stats["rollout_corr/masked_frac"] == 0.0
    assert stats["rollout_corr/weight_mean"] == 1.0


def test_token_tis_hand_computed():
    w, keep, stats = rollout_correction(*_inputs(), MASK, "token_tis", cap=2.0)
    # min(ratio, 2) on valid tokens, 1 at padding
    _close(w, [[2.0, 0.5, 1.0], [1.5, 1.0, 1.0], [2.0, 2.0, 1.0], [0.25, 0.25, 1.0]])
    assert torch.equal(keep, torch.ones(4, 3))
    assert not w.requires_grad
    # 9 valid tokens, ratios 3, .5, 1, 1.5, 4, 4, 1, .25, .25
    assert stats["rollout_corr/ratio_mean"] == pytest.approx(15.5 / 9)
    assert stats["rollout_corr/ratio_max"] == pytest.approx(4.0)
    assert stats["rollout_corr/capped_frac"] == pytest.approx(3 / 9)   # 3, 4, 4 hit the cap
    assert stats["rollout_corr/weight_mean"] == pytest.approx((2 + .5 + 1 + 1.5 + 2 + 2 + 1 + .25 + .25) / 9)
    assert stats["rollout_corr/masked_frac"] == 0.0


def test_seq_tis_hand_computed():
    w, keep, stats = rollout_correction(*_inputs(), MASK, "seq_tis", cap=2.0)
    # products over valid tokens: 3 * .5 * 1 = 1.5; 1.5; 4 * 4 * 1 = 16 -> 2 (capped); .25 * .25 = 1/16
    _close(w[VALID], [1.5] * 3 + [1.5] + [2.0] * 3 + [1 / 16] * 2)
    _close(w[~VALID], [1.0] * 3)
    assert torch.equal(keep, torch.ones(4, 3))
    assert stats["rollout_corr/capped_frac"] == pytest.approx(1 / 4)  # one sequence of four
    assert stats["rollout_corr/weight_mean"] == pytest.approx((1.5 * 4 + 2 * 3 + 2 / 16) / 9)


def test_seq_tis_clamps_the_log_before_exp():
    old = torch.zeros(1, 100)
    beh = torch.full((1, 100), -5.0)  # product e^500: inf without the clamp
    w, _, stats = rollout_correction(old, beh, torch.ones(1, 100), "seq_tis", cap=2.0)
    assert torch.isfinite(w).all() and torch.equal(w, torch.full((1, 100), 2.0))
    assert all(math.isfinite(v) for v in stats.values())
    w, _, _ = rollout_correction(beh, old, torch.ones(1, 100), "seq_tis", cap=2.0)
    assert (w > 0).all() and (w < 1e-8).all()  # e^-500 bounded at e^-20, not 0 / NaN


def test_seq_mask_geometric_rejection_hand_computed():
    w, keep, stats = rollout_correction(*_inputs(), MASK, "seq_mask", cap=2.0)
    # geometric means: 1.5^(1/3) = 1.14 keep; 1.5 keep; 16^(1/3) = 2.52 > 2 drop; (1/16)^(1/2) = .25 < .5 drop
    assert torch.equal(w, torch.ones(4, 3))
    assert torch.equal(keep, torch.tensor([[1.0] * 3, [1.0] * 3, [0.0] * 3, [0.0] * 3]))
    assert stats["rollout_corr/masked_frac"] == pytest.approx(0.5)
    assert stats["rollout_corr/capped_frac"] == 0.0
    assert stats["rollout_corr/weight_mean"] == pytest.approx(4 / 9)  # rows 0, 1 keep 4 of 9 valid tokens
    # a wider band keeps row 2 (2.52 < 3) but not row 3 (.25 < 1/3)
    _, keep, stats = rollout_correction(*_inputs(), MASK, "seq_mask", cap=3.0)
    assert keep[:, 0].tolist() == [1.0, 1.0, 1.0, 0.0] and stats["rollout_corr/masked_frac"] == 0.25


def test_mismatch_kl_and_perplexity_stats_hand_computed():
    _, _, stats = rollout_correction(*_inputs(), MASK, "none")
    ratios = [3, .5, 1, 1.5, 4, 4, 1, .25, .25]
    assert stats["rollout_corr/kl"] == pytest.approx(-sum(LN(r) for r in ratios) / 9)
    assert stats["rollout_corr/k3_kl"] == pytest.approx(sum(r - 1 - LN(r) for r in ratios) / 9)
    # per sequence mean of log pi_b - log pi_old, then mean over the 4 sequences
    per_seq = [-LN(1.5) / 3, -LN(1.5), -LN(16) / 3, -LN(1 / 16) / 2]
    assert stats["rollout_corr/log_ppl_diff"] == pytest.approx(sum(per_seq) / 4)
    assert stats["rollout_corr/k3_kl"] >= 0


@pytest.mark.parametrize("mode", sorted(ROLLOUT_CORRECTIONS))
def test_padding_values_are_ignored(mode):
    old, beh = _inputs()
    w1, k1, s1 = rollout_correction(old, beh, MASK, mode)
    old2 = torch.where(VALID, old, torch.tensor(123.0))
    beh2 = torch.where(VALID, beh, torch.tensor(-float("inf")))
    w2, k2, s2 = rollout_correction(old2, beh2, MASK, mode)
    assert torch.equal(w1, w2) and torch.equal(k1, k2) and s1 == s2
    assert torch.isfinite(w1).all() and all(math.isfinite(v) for v in s1.values())


@pytest.mark.parametrize("mode", sorted(ROLLOUT_CORRECTIONS))
def test_identical_policies_mean_no_correction(mode):
    lp = -torch.rand(3, 4)
    w, keep, stats = rollout_correction(lp, lp.clone(), torch.ones(3, 4), mode)
    assert torch.equal(w, torch.ones(3, 4)) and torch.equal(keep, torch.ones(3, 4))
    assert stats["rollout_corr/ratio_mean"] == 1.0 and stats["rollout_corr/kl"] == 0.0
    assert stats["rollout_corr/k3_kl"] == 0.0 and stats["rollout_corr/log_ppl_diff"] == 0.0


def test_no_valid_token_gives_neutral_stats():
    w, keep, stats = rollout_correction(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), "seq_mask")
    assert stats["rollout_corr/ratio_mean"] == 1.0 and stats["rollout_corr/ratio_max"] == 1.0
    assert stats["rollout_corr/masked_frac"] == 0.0 and stats["rollout_corr/kl"] == 0.0


# ---------------------------------------------------------------- in ppo_clip_loss
ADV = torch.tensor([[1.0, -1.0, 2.0], [0.5, 9.0, 9.0], [1.0, 1.0, -1.0], [-2.0, 1.0, 9.0]])


def _policy_log_probs() -> torch.Tensor:
    torch.manual_seed(0)
    return (-torch.rand(4, 3) - 0.1).requires_grad_(True)


def test_none_is_exactly_the_uncorrected_loss_and_adds_the_stats():
    old, beh = _inputs()
    old = torch.where(VALID, old, 0.0)
    lp = _policy_log_probs()
    base, base_stats = ppo_clip_loss(lp, old, ADV, MASK, PolicyLossConfig())
    loss, stats = ppo_clip_loss(lp, old, ADV, MASK, PolicyLossConfig(), behaviour_log_probs=beh)
    assert torch.equal(loss, base)
    assert {k: v for k, v in stats.items() if not k.startswith("rollout_corr/")} == base_stats
    assert stats["rollout_corr/ratio_max"] == pytest.approx(4.0)
    (g_base,) = torch.autograd.grad(base, lp)
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.equal(g, g_base)


def test_token_tis_multiplies_the_per_token_policy_loss_hand_computed():
    """On-policy (ratio 1, no clipping): L = -sum_t w_t A_t / n_valid with w = min(pi_old / pi_b, 2)."""
    old, beh = _inputs()
    lp = torch.where(VALID, old, 0.0)
    cfg = PolicyLossConfig(rollout_correction="token_tis")
    loss, stats = ppo_clip_loss(lp, lp.detach(), ADV, MASK, cfg, behaviour_log_probs=beh)
    w = [2.0, 0.5, 1.0, 1.5, 2.0, 2.0, 1.0, 0.25, 0.25]
    a = [1.0, -1.0, 2.0, 0.5, 1.0, 1.0, -1.0, -2.0, 1.0]
    assert float(loss) == pytest.approx(-sum(x * y for x, y in zip(w, a)) / 9)
    assert stats["actor/pg_loss"] == pytest.approx(float(loss))
    assert stats["rollout_corr/capped_frac"] == pytest.approx(3 / 9)


@pytest.mark.parametrize("mode", ["token_tis", "seq_tis", "seq_mask"])
def test_the_weight_multiplies_the_per_token_gradient(mode):
    """d loss / d log pi_t = w_t * keep_t * (the uncorrected gradient at t): the weight is a detached
    constant, and no gradient reaches the behaviour log-probs."""
    old, beh = _inputs()
    old = torch.where(VALID, old, 0.0)
    beh = beh.clone().requires_grad_(True)
    lp = _policy_log_probs()
    base, _ = ppo_clip_loss(lp, old, ADV, MASK, PolicyLossConfig())
    loss, _ = ppo_clip_loss(lp, old, ADV, MASK, PolicyLossConfig(rollout_correction=mode), behaviour_log_probs=beh)
    (g_base,) = torch.autograd.grad(base, lp)
    loss.backward()
    w, keep, _ = rollout_correction(old, beh, MASK, mode)
    assert g_base.abs().sum() > 0
    torch.testing.assert_close(lp.grad, w * keep * g_base)
    assert beh.grad is None


def test_seq_mask_keeps_rejected_tokens_in_the_normaliser():
    """Rows 2 and 3 are rejected: their tokens add 0 to the numerator but still count in the token-mean's
    denominator (9 valid tokens), with or without a caller's global normaliser."""
    old, beh = _inputs()
    lp = torch.where(VALID, old, 0.0)
    cfg = PolicyLossConfig(rollout_correction="seq_mask")
    kept = -(1.0 - 1.0 + 2.0 + 0.5)
    loss, _ = ppo_clip_loss(lp, lp, ADV, MASK, cfg, behaviour_log_probs=beh)
    assert float(loss) == pytest.approx(kept / 9)
    loss, _ = ppo_clip_loss(lp, lp, ADV, MASK, cfg, behaviour_log_probs=beh, token_normalizer=18.0)
    assert float(loss) == pytest.approx(kept / 18)
    cfg = PolicyLossConfig(rollout_correction="seq_mask", agg_mode="seq-mean-token-mean")
    loss, _ = ppo_clip_loss(lp, lp, ADV, MASK, cfg, behaviour_log_probs=beh)
    assert float(loss) == pytest.approx((-2.0 / 3 - 0.5) / 4)  # 4 sequences, 2 of them 0


def test_precomputed_weights_give_the_same_loss():
    old, beh = _inputs()
    old = torch.where(VALID, old, 0.0)
    lp = _policy_log_probs()
    for mode in ("token_tis", "seq_tis", "seq_mask"):
        cfg = PolicyLossConfig(rollout_correction=mode)
        direct, _ = ppo_clip_loss(lp, old, ADV, MASK, cfg, behaviour_log_probs=beh)
        w, keep, _ = rollout_correction(old, beh, MASK, mode)
        pre, _ = ppo_clip_loss(lp, old, ADV, MASK, cfg, is_weights=w, keep_mask=keep)
        assert torch.equal(direct, pre)
        with pytest.raises(ValueError, match="not both"):
            ppo_clip_loss(lp, old, ADV, MASK, cfg, behaviour_log_probs=beh, is_weights=w)


def test_a_correction_without_behaviour_log_probs_is_an_error():
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="needs behaviour_log_probs"):
        ppo_clip_loss(lp, lp, torch.ones(1, 2), torch.ones(1, 2), PolicyLossConfig(rollout_correction="token_tis"))


def test_policy_loss_config_validation():
    assert PolicyLossConfig().rollout_correction == "none"
    assert PolicyLossConfig().rollout_correction_cap == 2.0
    with pytest.raises(ValueError, match="unknown rollout correction 'tis'"):
        PolicyLossConfig(rollout_correction="tis")
    with pytest.raises(ValueError, match="rollout_correction_cap must be > 1"):
        PolicyLossConfig(rollout_correction="token_tis", rollout_correction_cap=0.5)


def test_train_config_validates_and_passes_the_correction_through():
    from hydra import compose, initialize_config_dir

    from hicra_rl.config import ConfigError, policy_loss_config, register_configs, to_schema

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        def load(*overrides):
            return to_schema(compose(config_name="config", overrides=list(overrides)))

        plc = policy_loss_config(load())
        assert (plc.rollout_correction, plc.rollout_correction_cap) == ("none", 2.0)
        plc = policy_loss_config(load("algorithm.rollout_correction=seq_mask",
                                      "algorithm.rollout_correction_cap=1.001"))
        assert (plc.rollout_correction, plc.rollout_correction_cap) == ("seq_mask", 1.001)
        with pytest.raises(ConfigError) as err:
            load("algorithm.rollout_correction=tis")
        assert "config error at 'algorithm.rollout_correction'" in str(err.value)
        assert "unknown correction 'tis'" in str(err.value)
        with pytest.raises(ConfigError) as err:
            load("algorithm.rollout_correction_cap=1.0")
        assert "config error at 'algorithm.rollout_correction_cap'" in str(err.value)
