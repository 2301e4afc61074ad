"""Which strategy each response chose, tagged by the sentence that announces it (pure).

The strategy-choice testbed (``conf/data/strat_*.yaml``, docs/hicra_law.md) names its strategies and the
phrase that announces each (``data.strategies``: name -> phrase).  A response's strategy is the one whose
phrase occurs first in it (case-insensitive); a response announcing none is ``none``.  This is the quantity
HICRA's expected-gradient law speaks about (the share of the better strategy, per step), which lexicon
clusters (``strategy/cluster=``) are not: one strategy's phrases can fall into several clusters.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

NONE = "none"


def classify_strategy(text: str, strategies: Mapping[str, str]) -> str:
    """The name of the strategy announced first in ``text``, or ``"none"``."""
    low = text.lower()
    best, best_at = NONE, math.inf
    for name, phrase in strategies.items():
        at = low.find(phrase.lower())
        if 0 <= at < best_at:
            best, best_at = name, at
    return best


def strategy_metrics(texts: Sequence[str], correct: Sequence[bool], group_ids: Sequence,
                     strategies: Mapping[str, str]) -> dict[str, float]:
    """Per step: ``strategy/share=<name>`` (fraction of responses; every strategy and ``none``),
    ``strategy/accuracy=<name>`` (NaN when no response used it), ``strategy/mixed_group_frac`` (groups whose
    responses chose >= 2 different strategies) and ``strategy/mixed_group_accuracy`` (their mean accuracy:
    the p̄ of the law's 1 + α(1 − 2p̄), NaN without a mixed group)."""
    if len(texts) != len(correct) or len(texts) != len(group_ids):
        raise ValueError(f"{len(texts)} texts, {len(correct)} correct flags, {len(group_ids)} group ids")
    chosen = [classify_strategy(t, strategies) for t in texts]
    n = len(chosen)
    out: dict[str, float] = {}
    for name in [*strategies, NONE]:
        hits = [bool(c) for s, c in zip(chosen, correct) if s == name]
        out[f"strategy/share={name}"] = len(hits) / n if n else math.nan
        out[f"strategy/accuracy={name}"] = sum(hits) / len(hits) if hits else math.nan
    groups: dict = defaultdict(list)
    for g, s, c in zip(group_ids, chosen, correct):
        groups[g].append((s, bool(c)))
    mixed = [members for members in groups.values() if len({s for s, _ in members}) >= 2]
    out["strategy/mixed_group_frac"] = len(mixed) / len(groups) if groups else math.nan
    flat = [c for members in mixed for _, c in members]
    out["strategy/mixed_group_accuracy"] = sum(flat) / len(flat) if flat else math.nan
    return out


def strategy_table(rows: Sequence[Mapping], strategies: Mapping[str, str]) -> list[dict]:
    """Per-strategy accuracy over evaluation rows (``hicra-eval``'s eval.json ``rows``: each with
    ``responses`` and ``correct``, k per problem): one dict per strategy (and ``none`` when used) with
    ``strategy``, ``responses``, ``share``, ``correct``, ``accuracy`` (NaN when unused) and ``problems``
    (problems where it was used at least once)."""
    counts: dict[str, list[int]] = {name: [0, 0, 0] for name in [*strategies, NONE]}
    total = 0
    for r in rows:
        used = set()
        for text, ok in zip(r["responses"], r["correct"], strict=True):
            name = classify_strategy(text, strategies)
            counts[name][0] += 1
            counts[name][1] += bool(ok)
            used.add(name)
            total += 1
        for name in used:
            counts[name][2] += 1
    return [{"strategy": name, "responses": n, "share": n / total if total else math.nan, "correct": k,
             "accuracy": k / n if n else math.nan, "problems": p}
            for name, (n, k, p) in counts.items() if name != NONE or n]
