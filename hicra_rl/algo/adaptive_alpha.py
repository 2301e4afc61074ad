"""Adaptive HICRA (``algorithm=hicra_adaptive``): HICRA's planning-token bonus switched on by a gate.

alpha_t = alpha_max * g_t, with g_t in [0, 1] computed from the metrics of past *training* steps only
(never evaluation data).  The paper (arXiv 2509.03646) finds that HICRA helps once the model's low-level
procedures are reliable and hurts while they are not; its two phases are: execution-token relative
perplexity falls and settles first (procedures consolidate), then strategic exploration drives the gains.
The gate opens only as far as the least satisfied of three conditions:

* drop      d = ramp(relative fall of the execution perplexity EMA since its first value; 0 .. ppl_drop)
* flatness  f = clip(1 - |fractional change per step of that EMA over the last W steps| / ppl_slope, 0, 1)
* competence q = ramp(EMA of the training accuracy; acc_low .. acc_high)

consolidation c = min(d, f); raw gate = min(c, q); g = gate_ema * g_prev + (1 - gate_ema) * raw, and g = 0
until W + 1 steps with valid signals have been seen.  A step whose signals are missing or not finite leaves
the whole state (and so g and alpha) unchanged.  See docs/hicra_adaptive.md for the formulas and defaults.

Pure Python (no torch, Ray or vLLM); the driver calls :meth:`AdaptiveAlphaGate.metrics` before a step (the
alpha that step uses and why), then :meth:`AdaptiveAlphaGate.update` with the step's metrics row.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

# the training metrics the gate reads (hicra_rl/metrics/step.py)
PPL_KEY = "relative_perplexity/execution"
ACC_KEY = "reward/accuracy"

# the metrics the gate logs (docs/metrics.md, docs/hicra_adaptive.md)
ALPHA_KEY = "algorithm/alpha"
GATE_KEY = "algorithm/gate"
RAW_KEY = "algorithm/gate_raw"
CONSOLIDATION_KEY = "algorithm/gate_consolidation"
COMPETENCE_KEY = "algorithm/gate_competence"
DROP_KEY = "algorithm/gate_drop"
FLATNESS_KEY = "algorithm/gate_flatness"
PART_KEYS = (RAW_KEY, CONSOLIDATION_KEY, COMPETENCE_KEY, DROP_KEY, FLATNESS_KEY)
METRIC_KEYS = (ALPHA_KEY, GATE_KEY, *PART_KEYS)

STATE_VERSION = 1


@dataclass(frozen=True)
class GateParams:
    """The gate's constants; each is a field of ``AlgorithmConfig`` (``CONFIG_FIELDS`` names it)."""

    alpha_max: float = 0.2   # algorithm.hicra_alpha: HICRA's alpha once the gate is fully open
    window: int = 4          # algorithm.adaptive_window: W, steps over which the perplexity slope is taken
    ema: float = 0.7         # algorithm.adaptive_ema: weight of the past in the EMAs of both signals
    ppl_drop: float = 0.05   # algorithm.adaptive_ppl_drop: relative fall counted as consolidated (0: no need)
    ppl_slope: float = 0.01  # algorithm.adaptive_ppl_slope: change per step (fraction of level) still "moving"
    acc_low: float = 0.2     # algorithm.adaptive_acc_low: accuracy EMA at which competence starts above 0
    acc_high: float = 0.6    # algorithm.adaptive_acc_high: accuracy EMA at which competence is 1
    gate_ema: float = 0.5    # algorithm.adaptive_gate_ema: weight of the past in the gate's own smoothing

    @classmethod
    def from_config(cls, cfg: Any) -> GateParams:
        """From an ``AlgorithmConfig`` (or anything with its attribute names); missing ones keep the defaults."""
        defaults = cls()
        return cls(**{f.name: getattr(cfg, CONFIG_FIELDS[f.name], getattr(defaults, f.name)) for f in fields(cls)})


# GateParams field -> AlgorithmConfig field
CONFIG_FIELDS = {
    "alpha_max": "hicra_alpha",
    "window": "adaptive_window",
    "ema": "adaptive_ema",
    "ppl_drop": "adaptive_ppl_drop",
    "ppl_slope": "adaptive_ppl_slope",
    "acc_low": "adaptive_acc_low",
    "acc_high": "adaptive_acc_high",
    "gate_ema": "adaptive_gate_ema",
}


def gate_config_errors(cfg: Any) -> list[tuple[str, str]]:
    """``(AlgorithmConfig field, message)`` for every invalid gate constant of ``cfg`` (an ``AlgorithmConfig``
    or a :class:`GateParams`); empty when all are valid."""
    p = cfg if isinstance(cfg, GateParams) else GateParams.from_config(cfg)
    errors = []

    def check(ok: bool, name: str, msg: str) -> None:
        if not ok:
            errors.append((CONFIG_FIELDS[name], msg))

    check(0.0 <= p.alpha_max <= 1.0, "alpha_max", f"must be in [0, 1], got {p.alpha_max}")
    check(isinstance(p.window, int) and not isinstance(p.window, bool) and p.window >= 1, "window",
          f"must be an integer >= 1 (steps in the perplexity slope), got {p.window!r}")
    check(0.0 <= p.ema < 1.0, "ema", f"must be in [0, 1) (weight of the past in the EMA), got {p.ema}")
    check(0.0 <= p.gate_ema < 1.0, "gate_ema", f"must be in [0, 1) (weight of the past in the gate), got {p.gate_ema}")
    check(0.0 <= p.ppl_drop < 1.0, "ppl_drop",
          f"must be in [0, 1) (a relative fall of the execution perplexity; 0 drops the condition), got {p.ppl_drop}")
    check(p.ppl_slope > 0.0, "ppl_slope", f"must be > 0 (a change per step, as a fraction of the level), got {p.ppl_slope}")
    check(0.0 <= p.acc_low <= 1.0, "acc_low", f"must be in [0, 1], got {p.acc_low}")
    check(0.0 <= p.acc_high <= 1.0 and p.acc_high > p.acc_low, "acc_high",
          f"must be in [0, 1] and > adaptive_acc_low ({p.acc_low}), got {p.acc_high}")
    return errors


# ---------------------------------------------------------------------------------------------- pure parts
def ema(prev: float | None, x: float, beta: float) -> float:
    """Exponential moving average with weight ``beta`` on the past; the first value starts it (``prev`` None)."""
    return x if prev is None else beta * prev + (1.0 - beta) * x


def ramp(x: float, lo: float, hi: float) -> float:
    """0 at or below ``lo``, 1 at or above ``hi``, linear in between (``hi > lo``)."""
    return min(1.0, max(0.0, (x - lo) / (hi - lo)))


def drop_score(start: float, level: float, target: float) -> float:
    """How far the perplexity EMA has fallen from its first value, relative to ``target``: the relative fall
    ``(start - level) / start`` ramped over [0, target]; a rise gives 0.  ``target == 0``: always 1."""
    if target == 0.0:
        return 1.0
    return ramp((start - level) / start, 0.0, target)


def flatness_score(past: float, level: float, window: int, tol: float) -> float:
    """1 when the perplexity EMA no longer moves: its change per step over the last ``window`` steps as a
    fraction of its level, ``r = (past - level) / (window * level)``, gives ``clip(1 - |r| / tol, 0, 1)``;
    falling and rising both count as moving."""
    r = (past - level) / (window * level)
    return min(1.0, max(0.0, 1.0 - abs(r) / tol))


def gate_parts(ppl_history: Sequence[float], ppl_start: float, acc_ema: float, p: GateParams) -> dict[str, float]:
    """The gate's parts from the smoothed signals: ``ppl_history`` holds the execution perplexity EMA of the
    last valid steps, oldest first (at least ``window + 1`` values for a slope; fewer: warm-up, and the
    flatness, consolidation and raw gate are NaN).  Keys are the logged metric names (``PART_KEYS``)."""
    level = ppl_history[-1]
    d = drop_score(ppl_start, level, p.ppl_drop)
    q = ramp(acc_ema, p.acc_low, p.acc_high)
    if len(ppl_history) < p.window + 1:
        f = c = raw = math.nan
    else:
        f = flatness_score(ppl_history[-1 - p.window], level, p.window, p.ppl_slope)
        c = min(d, f)
        raw = min(c, q)
    return {RAW_KEY: raw, CONSOLIDATION_KEY: c, COMPETENCE_KEY: q, DROP_KEY: d, FLATNESS_KEY: f}


def _signal(metrics: Mapping[str, Any], key: str) -> float | None:
    """The metric as a finite float, or None (missing, None, NaN, inf or not a number)."""
    try:
        x = float(metrics[key])
    except (KeyError, TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _nan_parts() -> dict[str, float]:
    return {k: math.nan for k in PART_KEYS}


# ---------------------------------------------------------------------------------------------- the gate
class AdaptiveAlphaGate:
    """alpha for the next step = ``alpha_max * g``; ``g`` from past training steps' metrics (module docstring).

    ``AdaptiveAlphaGate(algorithm_config)`` (or a :class:`GateParams`); ``.alpha`` is the alpha the next step
    uses (0 before any update), ``.update(step_metrics)`` folds one step's metrics row in and returns
    ``(alpha, g, parts)`` for the following step, ``.metrics()`` the loggable ``algorithm/…`` keys of the
    current alpha, and ``state_dict()`` / ``load_state_dict()`` (JSON-safe) make a resumed run continue exactly.
    """

    def __init__(self, config: Any):
        self.params = config if isinstance(config, GateParams) else GateParams.from_config(config)
        errors = gate_config_errors(self.params)
        if errors:
            raise ValueError("; ".join(f"algorithm.{k}: {m}" for k, m in errors))
        self.n_valid = 0                     # steps whose signals were used
        self.n_held = 0                      # steps skipped for a missing / non-finite signal
        self.ppl_start: float | None = None  # the first perplexity EMA value (= the first valid signal)
        self.ppl_ema: float | None = None
        self.acc_ema: float | None = None
        self.ppl_history: list[float] = []   # the perplexity EMA of the last window + 1 valid steps
        self.gate = 0.0
        self.parts = _nan_parts()

    @property
    def alpha(self) -> float:
        """The HICRA alpha of the next step."""
        return self.params.alpha_max * self.gate

    def update(self, step_metrics: Mapping[str, Any]) -> tuple[float, float, dict[str, float]]:
        """Fold in one training step's metrics (needs ``relative_perplexity/execution`` and
        ``reward/accuracy``); returns ``(alpha, g, parts)`` for the next step.  If either signal is missing
        or not finite (or the perplexity is not > 0) nothing changes: g holds its last value."""
        p = self.params
        ppl, acc = _signal(step_metrics, PPL_KEY), _signal(step_metrics, ACC_KEY)
        if ppl is None or acc is None or ppl <= 0.0:
            self.n_held += 1
            return self.alpha, self.gate, dict(self.parts)
        self.n_valid += 1
        self.ppl_ema = ema(self.ppl_ema, ppl, p.ema)
        self.acc_ema = ema(self.acc_ema, acc, p.ema)
        if self.ppl_start is None:
            self.ppl_start = self.ppl_ema
        self.ppl_history = (self.ppl_history + [self.ppl_ema])[-(p.window + 1):]
        self.parts = gate_parts(self.ppl_history, self.ppl_start, self.acc_ema, p)
        raw = self.parts[RAW_KEY]
        # warm-up (no full window yet): the gate stays shut; afterwards it is smoothed from 0
        self.gate = 0.0 if math.isnan(raw) else ema(self.gate, raw, p.gate_ema)
        return self.alpha, self.gate, dict(self.parts)

    def metrics(self) -> dict[str, float]:
        """``algorithm/alpha`` (the next step's alpha), ``algorithm/gate`` and the parts that set them."""
        return {ALPHA_KEY: self.alpha, GATE_KEY: self.gate, **self.parts}

    # ------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """JSON-safe state (NaN parts as None), for the checkpoint's ``extra.json``."""
        return {
            "version": STATE_VERSION, "n_valid": self.n_valid, "n_held": self.n_held,
            "ppl_start": self.ppl_start, "ppl_ema": self.ppl_ema, "acc_ema": self.acc_ema,
            "ppl_history": list(self.ppl_history), "gate": self.gate,
            "parts": {k: (None if math.isnan(v) else v) for k, v in self.parts.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"adaptive alpha gate state version {state.get('version')!r}, expected {STATE_VERSION}")
        self.n_valid, self.n_held = int(state["n_valid"]), int(state["n_held"])
        opt = (lambda v: None if v is None else float(v))
        self.ppl_start, self.ppl_ema, self.acc_ema = opt(state["ppl_start"]), opt(state["ppl_ema"]), opt(state["acc_ema"])
        self.ppl_history = [float(v) for v in state["ppl_history"]][-(self.params.window + 1):]
        self.gate = float(state["gate"])
        parts = state.get("parts") or {}
        self.parts = {k: (math.nan if parts.get(k) is None else float(parts[k])) for k in PART_KEYS}


__all__ = [
    "ACC_KEY", "ALPHA_KEY", "AdaptiveAlphaGate", "GATE_KEY", "GateParams", "METRIC_KEYS", "PART_KEYS", "PPL_KEY",
    "drop_score", "ema", "flatness_score", "gate_config_errors", "gate_parts", "ramp",
]
