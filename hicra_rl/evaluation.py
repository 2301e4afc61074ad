"""Evaluation through the rollout workers: k samples per problem at the paper's T = 0.6, Pass@1
averaged over k, Pass@k, accuracy by subject / level, mean response length.  Used by periodic
evaluation in the training loop and by ``hicra-eval``."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from hicra_rl.metrics.passk import mean_pass_at_k


def split_evenly(items: list, n: int) -> list[list]:
    """Contiguous chunks of nearly equal size (the first ones one longer), never more than len(items)."""
    n = max(1, min(n, len(items)))
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


def summarise(rows: list[dict[str, Any]], k: int, prefix: str = "eval/") -> dict[str, float]:
    """``rows``: one per problem with ``correct`` (list of k bools), ``lengths``, optional subject/level."""
    correct = [r["correct"] for r in rows]
    out = {
        f"{prefix}pass@1": mean_pass_at_k(correct, 1),
        f"{prefix}pass@{k}": mean_pass_at_k(correct, k),
        f"{prefix}response_length": float(np.mean([x for r in rows for x in r["lengths"]])),
        f"{prefix}boxed_frac": float(np.mean([x for r in rows for x in r["answered"]])),
        f"{prefix}n_problems": float(len(rows)),
    }
    for key in ("subject", "level"):
        groups: dict[str, list] = defaultdict(list)
        for r in rows:
            if r.get(key) not in (None, ""):
                groups[str(r[key])].append(r["correct"])
        for name, rs in sorted(groups.items()):
            out[f"{prefix}pass@1/{key}={name}"] = mean_pass_at_k(rs, 1)
    return out


def evaluate(prompts: list, problems_meta: list[dict], *, generate, score, k: int, temperature: float,
             max_tokens: int, seed: int) -> tuple[dict[str, float], list[dict]]:
    """``generate(prompt_ids, n, temperature, max_tokens, seed) -> list[response dict]`` (prompt-major)
    and ``score(items, n_tokens, finished) -> list[result dict]`` are the caller's (Ray or local)."""
    responses = generate([p.token_ids for p in prompts], k, temperature, max_tokens, seed)
    if len(responses) != len(prompts) * k:
        raise RuntimeError(f"expected {len(prompts) * k} responses, got {len(responses)}")
    items = [(r["text"], prompts[i // k].gold_entry or prompts[i // k].answer, prompts[i // k].task)
             for i, r in enumerate(responses)]
    results = score(items, [len(r["token_ids"]) for r in responses],
                    [r["finish_reason"] == "stop" for r in responses])
    rows = []
    for j, p in enumerate(prompts):
        rs = results[j * k:(j + 1) * k]
        resp = responses[j * k:(j + 1) * k]
        meta = problems_meta[j] if j < len(problems_meta) else {}
        rows.append({
            "id": p.id, "answer": p.answer, "subject": meta.get("subject"), "level": meta.get("level"),
            "correct": [bool(x["correct"]) for x in rs],
            "extracted": [x["extracted"] for x in rs],
            "answered": [x["extracted"] is not None for x in rs],
            "lengths": [len(x["token_ids"]) for x in resp],
            "responses": [x["text"] for x in resp],
        })
    return summarise(rows, k), rows
