"""How a reward model's score and the verifier's reward make the reward a response trains on (pure Python).

``reward.source`` names the combination; ``w`` is ``reward.model_weight``, ``v`` the verifier's reward (after
the DAPO overlong / format shaping, when on), ``m`` the reward model's raw score, ``[acc]`` 1 where the
verifier accepted the response (``VerifyResult.correct``: score >= 1) and 0 elsewhere::

    verifier   r = v                         (the reward model, if set, is only measured: reward/model_*)
    model      r = w * m
    sum        r = v + w * m
    gated      r = v + w * sigmoid(m) * [acc]

**Gated: the model's score counts only where the verifier accepts.**  The alternative reading, "only
where no verifier applies", would make ``gated`` the same as ``verifier`` on every task this project
trains on (each has a verifier: math-verify or reasoning-gym's scorer).  With this choice the reward model
can only re-rank responses the verifier already accepted (e.g. among correct answers, prefer the clearer
solution); it can never pay for a wrong answer, which is what reward hacking of a learned reward would
exploit.  The sigmoid keeps the bonus in (0, w): an accepted response never falls below its own verifier
reward, so with the verifier's 0/1 rewards every accepted response still outranks every rejected one in its
group whatever the model says (a raw ``w * m`` could be very negative and invert that).

**Non-finite scores** are never a silent zero.  A response whose model score the source uses (``model``,
``sum``; ``gated`` where accepted) and which is NaN or infinite gets the mean reward of the other responses
of its group whose rewards are finite (0 when there is none): under the group-mean baseline
(``grpo_mean``) its advantage is then exactly 0 and the group's mean is unchanged, so it neither helps nor
hurts.  Each such response is counted (``CombinedRewards.nonfinite``, logged as ``reward/model_nonfinite``);
when every score a step needs is non-finite the model is broken and :class:`NonFiniteScoresError` stops
the run.

**Agreement with the verifier** (``reward/model_verifier_agreement``): over every group, every pair of one
response the verifier accepted and one it did not (a *mixed-correctness pair*; both scores finite), the
share the model ranks the same way (accepted scored higher), a tie counting 1/2.  It is the within-group
AUC of the model's score as a detector of correctness, pooled over the step's groups: 1 = the model orders
every such pair as the verifier, 0.5 = chance (or a constant model), 0 = always reversed.  NaN when the step
has no mixed-correctness pair (every group all right or all wrong).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

REWARD_SOURCES = ("verifier", "model", "sum", "gated")


class NonFiniteScoresError(RuntimeError):
    """Every reward-model score a step needed was NaN or infinite (broken weights, an overflow)."""


@dataclass(frozen=True)
class CombinedRewards:
    rewards: list[float]
    nonfinite: int      # responses whose needed model score was not finite (given their group's mean reward)


def sigmoid(x: float) -> float:
    """Numerically stable logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _uses_model(source: str, accepted: bool) -> bool:
    return source in ("model", "sum") or (source == "gated" and accepted)


def combine_rewards(source: str, verifier_rewards: Sequence[float], accepted: Sequence[bool],
                    model_scores: Sequence[float] | None, weight: float,
                    group_ids: Sequence[int]) -> CombinedRewards:
    """The reward of each response under ``source`` (see the module docstring); one entry per response."""
    if source not in REWARD_SOURCES:
        raise ValueError(f"reward source {source!r} is not one of {REWARD_SOURCES}")
    n = len(verifier_rewards)
    if len(accepted) != n or len(group_ids) != n:
        raise ValueError(f"{n} verifier rewards but {len(accepted)} accepted flags and {len(group_ids)} group ids")
    if source == "verifier":
        return CombinedRewards([float(v) for v in verifier_rewards], 0)
    if model_scores is None or len(model_scores) != n:
        raise ValueError(f"reward source {source!r} needs one model score per response "
                         f"({n}), got {None if model_scores is None else len(model_scores)}")
    rewards: list[float | None] = []
    for v, acc, m in zip(verifier_rewards, accepted, model_scores):
        if not _uses_model(source, bool(acc)):
            rewards.append(float(v))
        elif not math.isfinite(m):
            rewards.append(None)
        elif source == "model":
            rewards.append(weight * m)
        elif source == "sum":
            rewards.append(float(v) + weight * m)
        else:  # gated, accepted
            rewards.append(float(v) + weight * sigmoid(m))
    missing = [i for i, r in enumerate(rewards) if r is None]
    if missing and len(missing) == sum(_uses_model(source, bool(a)) for a in accepted):
        raise NonFiniteScoresError(
            f"the reward model gave no finite score for any of the {len(missing)} responses it had to score "
            f"(first: {model_scores[missing[0]]!r}); its weights or its dtype are broken")
    fills = {}
    for i in missing:
        same = [r for j, r in enumerate(rewards) if group_ids[j] == group_ids[i] and r is not None]
        fills[i] = sum(same) / len(same) if same else 0.0
    for i, fill in fills.items():
        rewards[i] = fill
    return CombinedRewards([float(r) for r in rewards], len(missing))


def model_verifier_agreement(scores: Sequence[float], correct: Sequence[bool],
                             group_ids: Sequence[int]) -> tuple[float, int]:
    """(agreement, number of mixed-correctness pairs) as defined in the module docstring."""
    groups: dict[int, tuple[list[float], list[float]]] = {}
    for s, c, g in zip(scores, correct, group_ids):
        if math.isfinite(s):
            groups.setdefault(g, ([], []))[0 if c else 1].append(float(s))
    agree, pairs = 0.0, 0
    for right, wrong in groups.values():
        for a in right:
            for b in wrong:
                pairs += 1
                agree += 1.0 if a > b else 0.5 if a == b else 0.0
    return (agree / pairs if pairs else float("nan")), pairs


def model_reward_metrics(scores: Sequence[float], correct: Sequence[bool], group_ids: Sequence[int],
                         source: str = "verifier") -> dict[str, float]:
    """The step's ``reward/model_*`` metrics from the reward model's raw scores (non-finite ones left out of
    the mean and standard deviation, and counted: all of them, and those ``source`` used, which got their
    group's mean reward)."""
    finite = [float(s) for s in scores if math.isfinite(s)]
    nonfinite_used = sum(not math.isfinite(s) and _uses_model(source, bool(c)) for s, c in zip(scores, correct))
    mean = sum(finite) / len(finite) if finite else float("nan")
    std = math.sqrt(sum((s - mean) ** 2 for s in finite) / len(finite)) if finite else float("nan")
    agreement, pairs = model_verifier_agreement(scores, correct, group_ids)
    return {"reward/model_mean": mean, "reward/model_std": std,
            "reward/model_verifier_agreement": agreement, "reward/model_verifier_pairs": float(pairs),
            "reward/model_nonfinite": float(len(scores) - len(finite)),
            "reward/model_nonfinite_used": float(nonfinite_used)}


__all__ = ["REWARD_SOURCES", "CombinedRewards", "NonFiniteScoresError", "combine_rewards", "model_reward_metrics",
           "model_verifier_agreement", "sigmoid"]
