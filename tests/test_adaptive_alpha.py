"""Adaptive HICRA's gate (hicra_rl/algo/adaptive_alpha.py): alpha_t = alpha_max * g_t from past training steps.

Expected values are worked out by hand in the comments (docs/hicra_adaptive.md has the formulas)."""
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hicra_rl.algo.adaptive_alpha import (
    ALPHA_KEY,
    COMPETENCE_KEY,
    CONSOLIDATION_KEY,
    DROP_KEY,
    FLATNESS_KEY,
    GATE_KEY,
    METRIC_KEYS,
    RAW_KEY,
    AdaptiveAlphaGate,
    GateParams,
)
from hicra_rl.algo.advantages import hicra_step_advantages
from hicra_rl.config import AlgorithmConfig, ConfigError, TrainConfig, validate

REPO = Path(__file__).resolve().parents[1]
PPL, ACC = "relative_perplexity/execution", "reward/accuracy"
EPS = 1e-12


def m(ppl, acc) -> dict:
    return {PPL: ppl, ACC: acc, "reward/mean": 0.5}


# one step's batch: 2 prompts x 2 responses, ragged planning masks
REWARDS = [1.0, 0.0, 1.0, 1.0]
GROUPS = [0, 0, 1, 1]
MASKS = [[True, False, True], [False, True], [True], [False, False, True, False]]
LENGTHS = [3, 2, 1, 4]


def step_advantages(alpha: float):
    return hicra_step_advantages(REWARDS, GROUPS, MASKS, LENGTHS, estimator="grpo_mean", alpha=alpha)


# ---------------------------------------------------------------- g = 0 is GRPO, g = 1 is HICRA, exactly
def test_shut_gate_gives_grpo_advantages_exactly():
    gate = AdaptiveAlphaGate(AlgorithmConfig(name="hicra_adaptive"))
    assert gate.alpha == 0.0 and gate.gate == 0.0  # before any step
    for _ in range(4):  # warm-up: W = 4 needs W + 1 = 5 valid steps, so the gate stays shut
        alpha, g, _ = gate.update(m(0.5, 1.0))
        assert alpha == 0.0 and g == 0.0
    ours, grpo = step_advantages(gate.alpha), step_advantages(0.0)
    assert torch.equal(ours.token, grpo.token) and torch.equal(ours.sequence, grpo.sequence)
    # GRPO by hand: group 0 mean 0.5 -> A = +0.5, -0.5; group 1 all correct -> 0, 0; padding 0
    expected = torch.tensor([[0.5, 0.5, 0.5, 0.0], [-0.5, -0.5, 0.0, 0.0], [0.0] * 4, [0.0] * 4])
    assert torch.equal(ours.token, expected)


def test_open_gate_gives_hicra_advantages_exactly():
    p = GateParams(alpha_max=0.2, window=1, ema=0.0, ppl_drop=0.1, ppl_slope=0.05, acc_low=0.2, acc_high=0.6,
                   gate_ema=0.0)
    gate = AdaptiveAlphaGate(p)
    gate.update(m(1.0, 0.9))  # warm-up (1 < W + 1 = 2 steps)
    # P = 0.8: fell 20% >= 10% -> d = 1, but r = (1.0 - 0.8) / (1 x 0.8) = 0.25 per step -> f = 0
    assert gate.update(m(0.8, 0.9))[1] == 0.0
    # P = 0.8 again: r = 0 -> f = 1; c = min(1, 1) = 1; accuracy 0.9 >= 0.6 -> q = 1; g = 1
    alpha, g, parts = gate.update(m(0.8, 0.9))
    assert g == 1.0 and alpha == 0.2 == gate.alpha
    assert parts[CONSOLIDATION_KEY] == 1.0 and parts[COMPETENCE_KEY] == 1.0
    ours, hicra = step_advantages(gate.alpha), step_advantages(0.2)
    assert torch.equal(ours.token, hicra.token)
    # HICRA by hand: planning tokens get A + 0.2|A|: +0.5 -> 0.6, -0.5 -> -0.4; execution tokens keep A
    expected = torch.tensor([[0.6, 0.5, 0.6, 0.0], [-0.5, -0.4, 0.0, 0.0], [0.0] * 4, [0.0] * 4])
    assert torch.allclose(ours.token, expected, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- a hand-computed sequence
P = GateParams(alpha_max=0.2, window=2, ema=0.5, ppl_drop=0.1, ppl_slope=0.05, acc_low=0.2, acc_high=0.6,
               gate_ema=0.5)
SEQUENCE = [m(1.0, 0.2), m(0.8, 0.6), m(0.8, 0.6), m(0.85, 0.5), m(0.85, 0.5), m(math.nan, 0.5), m(0.85, 0.9),
            m(1.05, 0.7)]
NAN = math.nan
# per step: g, drop d, flatness f, consolidation c = min(d, f), competence q, raw = min(c, q)
# EMAs (weight 0.5 on the past): P = 1, .9, .85, .85, .85, (held), .85, .95;  A = .2, .4, .5, .5, .5, (held), .7, .7
# d = ramp((1 - P) / 1; 0, 0.1);  f = clip(1 - |(P[k-2] - P[k]) / (2 P[k])| / 0.05);  q = ramp(A; 0.2, 0.6)
EXPECTED = [
    # step 1: warm-up (1 of W + 1 = 3 valid steps): g = 0; d = 0, q = 0
    (0.0, 0.0, NAN, NAN, 0.0, NAN),
    # step 2: warm-up; fell 10% -> d = 1; q = (0.4 - 0.2) / 0.4 = 0.5
    (0.0, 1.0, NAN, NAN, 0.5, NAN),
    # step 3: r = (1 - .85) / 1.7 = 0.088/step > 0.05 -> f = 0, so raw = 0 and g = 0.5 x 0 + 0.5 x 0 = 0
    (0.0, 1.0, 0.0, 0.0, 0.75, 0.0),
    # step 4: r = (.9 - .85) / 1.7 = 1/34 -> f = 1 - 20/34 = 7/17; raw = min(7/17, .75) = 7/17; g = 7/34
    (7 / 34, 1.0, 7 / 17, 7 / 17, 0.75, 7 / 17),
    # step 5: r = 0 -> f = 1; raw = min(1, .75) = .75; g = 0.5 x 7/34 + 0.5 x 0.75 = 65/136
    (65 / 136, 1.0, 1.0, 1.0, 0.75, 0.75),
    # step 6: the perplexity is NaN: everything held
    (65 / 136, 1.0, 1.0, 1.0, 0.75, 0.75),
    # step 7: A = 0.5 x .5 + 0.5 x .9 = .7 -> q = 1; f = 1 (the window skips step 6); raw = 1; g = 201/272
    (201 / 272, 1.0, 1.0, 1.0, 1.0, 1.0),
    # step 8: P = .95 rose: fell only 5% -> d = 0.5; r = (.85 - .95) / 1.9 = -1/19, |r| / .05 = 20/19 -> f = 0;
    # raw = 0; g = 0.5 x 201/272 = 201/544: a perplexity that moves again closes the gate
    (201 / 544, 0.5, 0.0, 0.0, 1.0, 0.0),
]


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= EPS


def test_hand_computed_gate_sequence():
    gate = AdaptiveAlphaGate(P)
    for step, (metrics, (g, d, f, c, q, raw)) in enumerate(zip(SEQUENCE, EXPECTED), 1):
        before = gate.alpha
        alpha, got_g, parts = gate.update(metrics)
        assert close(got_g, g), (step, got_g, g)
        assert close(alpha, 0.2 * g) and alpha == gate.alpha, step
        got = (parts[DROP_KEY], parts[FLATNESS_KEY], parts[CONSOLIDATION_KEY], parts[COMPETENCE_KEY], parts[RAW_KEY])
        assert all(close(x, y) for x, y in zip(got, (d, f, c, q, raw))), (step, got)
        # metrics() describes the alpha the *next* step uses; the step just done used `before`
        assert gate.metrics() == {ALPHA_KEY: alpha, GATE_KEY: got_g, **parts}
        if step == 6:
            assert alpha == before
    assert (gate.n_valid, gate.n_held) == (7, 1)


def test_warm_up_keeps_the_gate_shut_even_when_every_condition_holds():
    gate = AdaptiveAlphaGate(replace(P, window=3, gate_ema=0.0))
    gate.update(m(1.0, 1.0))
    for _ in range(2):  # fell 50% (d = 1), accuracy 1 (q = 1), but only 3 of W + 1 = 4 valid steps
        assert gate.update(m(0.5, 1.0))[1] == 0.0
    parts = gate.metrics()
    assert (parts[DROP_KEY], parts[COMPETENCE_KEY]) == (1.0, 1.0) and math.isnan(parts[FLATNESS_KEY])


# ---------------------------------------------------------------- missing / NaN signals: g holds
@pytest.mark.parametrize("bad", [
    {ACC: 0.5}, {PPL: 0.9}, {PPL: math.nan, ACC: 0.5}, {PPL: 0.9, ACC: math.nan}, {PPL: math.inf, ACC: 0.5},
    {PPL: None, ACC: 0.5}, {PPL: "x", ACC: 0.5}, {PPL: 0.0, ACC: 0.5}, {PPL: -1.0, ACC: 0.5}, {},
], ids=lambda b: repr(b))
def test_missing_or_non_finite_signal_holds_everything(bad):
    gate = AdaptiveAlphaGate(P)
    for metrics in SEQUENCE[:5]:
        gate.update(metrics)
    before = gate.state_dict()
    alpha, g, parts = gate.update(bad)
    assert close(g, 65 / 136) and close(alpha, 0.2 * 65 / 136)
    assert alpha == gate.alpha and g == gate.gate
    after = gate.state_dict()
    assert after["n_held"] == before["n_held"] + 1
    assert {k: v for k, v in after.items() if k != "n_held"} == {k: v for k, v in before.items() if k != "n_held"}
    assert parts == {k: v for k, v in gate.metrics().items() if k not in (ALPHA_KEY, GATE_KEY)}


def test_held_steps_do_not_count_towards_the_warm_up_window():
    gate = AdaptiveAlphaGate(replace(P, window=1, gate_ema=0.0))
    gate.update(m(1.0, 1.0))
    gate.update(m(math.nan, 1.0))
    gate.update({})
    assert gate.n_valid == 1 and math.isnan(gate.metrics()[FLATNESS_KEY]) and gate.gate == 0.0
    # the second valid step completes the window: P = 0.5 x 1 + 0.5 x 1 = 1, r = 0 -> f = 1; no fall -> d = 0
    _, g, parts = gate.update(m(1.0, 1.0))
    assert (parts[FLATNESS_KEY], parts[DROP_KEY], g) == (1.0, 0.0, 0.0)


def test_zero_ppl_drop_drops_the_fall_condition():
    gate = AdaptiveAlphaGate(replace(P, window=1, ppl_drop=0.0, gate_ema=0.0))
    gate.update(m(1.0, 1.0))
    _, g, parts = gate.update(m(1.0, 1.0))  # never fell, flat, accurate: open
    assert (parts[DROP_KEY], g) == (1.0, 1.0)


# ---------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_gives_identical_future_outputs():
    for cut in (1, 3, 6):  # in the warm-up (NaN parts), just after it, after a held step
        a = AdaptiveAlphaGate(P)
        for metrics in SEQUENCE[:cut]:
            a.update(metrics)
        saved = json.loads(json.dumps(a.state_dict(), allow_nan=False))  # the checkpoint's extra.json
        b = AdaptiveAlphaGate(P)
        b.load_state_dict(saved)
        assert b.alpha == a.alpha and b.state_dict() == a.state_dict()
        for metrics in SEQUENCE[cut:] + SEQUENCE:
            out_a, out_b = a.update(metrics), b.update(metrics)
            assert out_a[:2] == out_b[:2]
            assert json.dumps(out_a[2]) == json.dumps(out_b[2])  # NaN == NaN here


def test_load_state_dict_rejects_an_unknown_version():
    gate = AdaptiveAlphaGate(P)
    with pytest.raises(ValueError, match="version"):
        gate.load_state_dict({**gate.state_dict(), "version": 99})


# ---------------------------------------------------------------- what the driver logs
def test_metric_keys_and_docs():
    assert METRIC_KEYS == ("algorithm/alpha", "algorithm/gate", "algorithm/gate_raw", "algorithm/gate_consolidation",
                           "algorithm/gate_competence", "algorithm/gate_drop", "algorithm/gate_flatness")
    gate = AdaptiveAlphaGate(P)
    assert tuple(gate.metrics()) == METRIC_KEYS
    assert gate.metrics()[ALPHA_KEY] == 0.0
    documented = set(re.findall(r"`([a-z_]+/[^`\s]+)`", (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")))
    assert set(METRIC_KEYS) <= documented
    assert set(METRIC_KEYS) <= set(re.findall(r"`([a-z_]+/[^`\s]+)`",
                                              (REPO / "docs" / "hicra_adaptive.md").read_text(encoding="utf-8")))


# ---------------------------------------------------------------- configuration
def test_params_come_from_the_algorithm_config_and_the_yaml_matches_the_schema():
    cfg = AlgorithmConfig(name="hicra_adaptive", hicra_alpha=0.3, adaptive_window=7, adaptive_ema=0.1,
                          adaptive_ppl_drop=0.2, adaptive_ppl_slope=0.03, adaptive_acc_low=0.1,
                          adaptive_acc_high=0.9, adaptive_gate_ema=0.25)
    assert GateParams.from_config(cfg) == GateParams(0.3, 7, 0.1, 0.2, 0.03, 0.1, 0.9, 0.25)
    assert GateParams.from_config(AlgorithmConfig()) == GateParams()  # one set of defaults
    yaml = OmegaConf.load(REPO / "conf" / "algorithm" / "hicra_adaptive.yaml")
    default = AlgorithmConfig()
    assert yaml.name == "hicra_adaptive" and yaml.hicra_alpha == 0.2
    for key in [k for k in vars(default) if k.startswith("adaptive_")]:
        assert yaml[key] == getattr(default, key), key


def _validate(**algorithm) -> None:
    cfg = TrainConfig()
    cfg.algorithm = AlgorithmConfig(**{"name": "hicra_adaptive", **algorithm})
    validate(cfg)


def test_hicra_adaptive_validates_with_alpha_above_zero():
    _validate()
    _validate(hicra_alpha=0.5)


@pytest.mark.parametrize("field,value,fragment", [
    ("adaptive_window", 0, "must be an integer >= 1"),
    ("adaptive_ema", 1.0, "must be in [0, 1) (weight of the past in the EMA), got 1.0"),
    ("adaptive_gate_ema", -0.1, "must be in [0, 1) (weight of the past in the gate), got -0.1"),
    ("adaptive_ppl_drop", 1.0, "must be in [0, 1)"),
    ("adaptive_ppl_drop", -0.01, "must be in [0, 1)"),
    ("adaptive_ppl_slope", 0.0, "must be > 0"),
    ("adaptive_acc_low", -0.1, "must be in [0, 1], got -0.1"),
    ("adaptive_acc_high", 0.2, "must be in [0, 1] and > adaptive_acc_low (0.2), got 0.2"),
    ("adaptive_acc_high", 1.5, "must be in [0, 1]"),
])
def test_invalid_gate_constants_name_the_field(field, value, fragment):
    with pytest.raises(ConfigError) as err:
        _validate(**{field: value})
    assert f"config error at 'algorithm.{field}'" in str(err.value)
    assert fragment in str(err.value)
    with pytest.raises(ValueError, match=re.escape(f"algorithm.{field}")):  # built in code, too
        AdaptiveAlphaGate(AlgorithmConfig(**{field: value}))


def test_hicra_adaptive_needs_alpha_max_above_zero():
    with pytest.raises(ConfigError) as err:
        _validate(hicra_alpha=0.0)
    assert "config error at 'algorithm.hicra_alpha'" in str(err.value)
    assert "'hicra_adaptive' uses hicra_alpha as its alpha_max and needs it > 0 (got 0.0)" in str(err.value)


def test_baselines_still_need_alpha_zero():
    with pytest.raises(ConfigError) as err:
        _validate(name="grpo", hicra_alpha=0.2)
    assert "config error at 'algorithm.hicra_alpha': algorithm 'grpo' must have hicra_alpha 0 (got 0.2); " \
           "use algorithm=hicra or algorithm=hicra_adaptive" in str(err.value)
