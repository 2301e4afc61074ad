"""All per-step training metrics from one step's data (pure; the metrics actor is a shell around it)."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from hicra_rl.metrics.entropy import conditional_entropy, semantic_entropy, split_token_means
from hicra_rl.metrics.passk import mean_pass_at_k
from hicra_rl.metrics.perplexity import RelativePerplexity, split_perplexity
from hicra_rl.metrics.strategies import strategy_metrics


def following_ngram(text: str, end: int, n: int = 3) -> str | None:
    """The n words that follow a Strategic Gram ending at char ``end`` (its execution continuation)."""
    words = text[end:].lower().split()
    return " ".join(words[:n]) if len(words) >= 1 else None


def maximal_occurrences(occurrences: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Merge SG occurrences whose character spans overlap, transitively, into one occurrence, so one
    strategic move counts once in the SG frequency distribution: nested ("the total number" inside
    "the total number of") and partly overlapping ("so the final answer is" / "final answer is boxed")
    alike. Spans are half-open ``[start, end)``, so touching spans stay apart. A merged run spans from
    its first start to its last end and is labelled by its longest gram (most characters; ties: the
    earliest start, then the first listed). Sorted by start."""
    out: list[tuple[int, int, str]] = []
    label_len = 0
    for s, e, ng in sorted(occurrences, key=lambda o: o[0]):
        if out and s < out[-1][1]:
            run_start, run_end, label = out[-1]
            if e - s > label_len:
                label, label_len = ng, e - s
            out[-1] = (run_start, max(run_end, e), label)
        else:
            out.append((s, e, ng))
            label_len = e - s
    return out


def strategy_usage(
    sg_occurrences: list[list[tuple[int, int, str]]], gram_clusters: dict[str, int]
) -> dict[str, float]:
    """Share of responses that use each strategy cluster: ``strategy/cluster=<id>`` = fraction of the
    responses with at least one occurrence of any gram of the cluster (the rollout-side analogue of the
    miner's Cluster-DF). Every cluster of ``gram_clusters`` gets a key (0 when unused); grams without a
    cluster are ignored. NaN for every cluster when there is no response."""
    used = [{gram_clusters[ng] for _, _, ng in occ if ng in gram_clusters} for occ in sg_occurrences]
    n = len(used)
    return {
        f"strategy/cluster={c}": (sum(c in u for u in used) / n if n else math.nan)
        for c in sorted(set(gram_clusters.values()))
    }


def step_metrics(
    *,
    rewards: list[float],
    correct: list[bool],
    group_ids: list[int],
    response_lengths: list[int],
    finish_reasons: list[str],
    sg_occurrences: list[list[tuple[int, int, str]]],
    response_texts: list[str],
    planning_mask: torch.Tensor,
    response_mask: torch.Tensor,
    token_entropy: torch.Tensor,
    token_log_probs: torch.Tensor,
    rel_ppl: RelativePerplexity,
    pass_k: int,
    gram_clusters: dict[str, int] | None = None,
    strategies: dict[str, str] | None = None,
) -> dict[str, float]:
    """Semantic entropy, planning/execution token entropy and (relative) perplexity, reward,
    accuracy, Pass@k over each prompt's G samples, response length and the planning-token share;
    with ``gram_clusters`` (SG -> cluster id, e.g. ``Lexicon.cluster_of``) also the share of
    responses using each strategy cluster (:func:`strategy_usage`); with ``strategies`` (name -> announcing
    phrase, ``data.strategies``) the share and accuracy of each named strategy
    (:func:`hicra_rl.metrics.strategies.strategy_metrics`)."""
    out: dict[str, float] = {}
    out["reward/mean"] = float(np.mean(rewards)) if rewards else math.nan
    out["reward/accuracy"] = float(np.mean(correct)) if correct else math.nan
    by_group: dict[int, list[bool]] = defaultdict(list)
    for g, c in zip(group_ids, correct):
        by_group[g].append(bool(c))
    groups = list(by_group.values())
    out["reward/pass@1"] = mean_pass_at_k(groups, 1)
    k = min(pass_k, min(len(g) for g in groups))
    out[f"reward/pass@{pass_k}"] = mean_pass_at_k(groups, k)
    out["reward/solve_none_frac"] = float(np.mean([not any(g) for g in groups]))
    out["reward/solve_all_frac"] = float(np.mean([all(g) for g in groups]))
    out["response/length_mean"] = float(np.mean(response_lengths))
    out["response/length_max"] = float(np.max(response_lengths))
    out["response/truncated_frac"] = float(np.mean([r == "length" for r in finish_reasons]))

    if gram_clusters is not None:
        out.update(strategy_usage(sg_occurrences, gram_clusters))
    if strategies:
        out.update(strategy_metrics(response_texts, correct, group_ids, strategies))
    sg_occurrences = [maximal_occurrences(occ) for occ in sg_occurrences]
    used = [[ng for _, _, ng in occ] for occ in sg_occurrences]
    out["strategic/semantic_entropy"] = semantic_entropy(used)
    out["strategic/distinct_sgs"] = float(len({ng for u in used for ng in u}))
    out["strategic/sgs_per_response"] = float(np.mean([len(u) for u in used]))
    pairs = []
    for occ, text in zip(sg_occurrences, response_texts):
        for _, end, ng in occ:
            nxt = following_ngram(text, end)
            if nxt:
                pairs.append((ng, nxt))
    out["strategic/conditional_entropy"] = conditional_entropy(pairs)
    valid = response_mask.bool()
    out["strategic/planning_token_frac"] = float((planning_mask.bool() & valid).sum() / valid.sum().clamp_min(1))

    ent = split_token_means(token_entropy, planning_mask, response_mask)
    ppl = split_perplexity(token_log_probs, planning_mask, response_mask)
    rel = rel_ppl(ppl)
    for split in ("planning", "execution", "all"):
        out[f"token_entropy/{split}"] = ent[split]
        out[f"perplexity/{split}"] = ppl[split]
        out[f"relative_perplexity/{split}"] = rel[split]
    return out
