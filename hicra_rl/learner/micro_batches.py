"""Token-budget micro-batch planning (pure Python; no torch, no DeepSpeed).

``learner.micro_batch_tokens`` > 0 forms micro-batches by padded tokens instead of a fixed number of
sequences (verl's ``use_dynamic_bsz`` / ``ppo_max_token_len_per_gpu``): short responses share a
micro-batch, long ones get few companions: the largest micro-batch (activation memory) is bounded
whatever the lengths, and a long-tailed batch needs few micro-batches with little padding
(``benchmarks/bench_micro_batches.py``).

A *unit* is what one micro-batch row holds: a single sequence (prompt + response), or with
``shared_prefix`` one prompt group packed into one row (the prompt once, then the group's responses:
``prompt + sum(responses)`` tokens). A micro-batch of k units of at most L tokens computes k x L
positions (right padding to its longest unit); that is what the budget bounds.

Planning: units sorted by length (stable), then filled greedily while
``(units in the micro-batch) x (its longest unit) <= budget``. A unit longer than the budget on its
own gets a micro-batch of its own (it cannot be cut: its forward needs the whole sequence).

Data-parallel ranks must run the same number of micro-batches (ZeRO's collectives run per
forward/backward). The learner all-reduces the MAX of the local counts and asks again with that
``target``: the micro-batch with the most padded tokens is split in two (its shorter half and its
longer half) until there are ``target``; a micro-batch of one packed group is split into two
sub-groups of its responses (each packed with the prompt: the same log-probs, the prompt computed twice).
Neither part of a split micro-batch is larger than it was, so the budget still holds.
"""
from __future__ import annotations

from collections.abc import Sequence


def plan_token_budget(lengths: Sequence[int], budget: int, target: int = 0, *,
                      prompt_lengths: Sequence[int] | None = None,
                      groups: Sequence[int] | None = None) -> list[list[int]]:
    """Row indices of each micro-batch under a padded-token ``budget`` (see the module docstring).

    ``lengths[i]``: row i's real tokens (prompt + response). Without ``groups`` a unit is one row.
    With ``groups`` (group id per row; rows of one group share their prompt of ``prompt_lengths[i]``
    tokens) a unit is one group packed into one row of ``prompt + sum(response lengths)`` tokens.
    ``target`` > 0: split micro-batches until there are at least ``target`` (raises if the rows cannot
    make that many). Every row appears in exactly one micro-batch; micro-batches are never empty.
    """
    n = len(lengths)
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    if n == 0:
        raise ValueError("no rows to plan")
    if target > n:
        raise ValueError(f"cannot make {target} micro-batches out of {n} rows")
    if groups is None:
        units = [[i] for i in range(n)]
    else:
        if prompt_lengths is None or len(groups) != n or len(prompt_lengths) != n:
            raise ValueError("groups needs a group id and a prompt length per row")
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        units = list(members.values())

    def unit_len(rows: list[int]) -> int:
        if len(rows) == 1:
            return int(lengths[rows[0]])
        p = int(prompt_lengths[rows[0]])
        return p + sum(int(lengths[r]) - p for r in rows)

    plan: list[list[list[int]]] = []  # micro-batch -> units -> rows
    current: list[list[int]] = []
    for unit in sorted(units, key=unit_len):  # stable: ties keep the rows' / groups' order
        if current and (len(current) + 1) * unit_len(unit) > budget:
            plan.append(current)
            current = []
        current.append(unit)
    plan.append(current)

    def cost(mb: list[list[int]]) -> int:
        return len(mb) * max(unit_len(u) for u in mb)

    while len(plan) < target:
        splittable = [i for i, mb in enumerate(plan) if len(mb) > 1 or len(mb[0]) > 1]
        i = max(splittable, key=lambda i: cost(plan[i]))  # first of the largest; n >= target: never empty
        mb = plan[i]
        if len(mb) > 1:
            h = len(mb) // 2
            plan[i:i + 1] = [mb[:h], mb[h:]]
        else:
            rows = mb[0]
            h = len(rows) // 2
            plan[i:i + 1] = [[rows[:h]], [rows[h:]]]
    return [[r for unit in mb for r in unit] for mb in plan]


def plan_fixed_size(lengths: Sequence[int], micro_batch_size: int, *, prompt_lengths: Sequence[int] | None = None,
                    groups: Sequence[int] | None = None) -> list[list[int]]:
    """Row indices of each micro-batch of ``micro_batch_size`` sequences (``micro_batch_tokens`` 0): rows
    sorted by length (stable) and cut every ``micro_batch_size``; with ``groups``, whole groups sorted by
    packed length, as many as fit in ``micro_batch_size`` responses (at least one group)."""
    n = len(lengths)
    if groups is None:
        order = sorted(range(n), key=lambda i: int(lengths[i]))
        return [order[s:s + micro_batch_size] for s in range(0, n, micro_batch_size)]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    packed_len = {g: int(prompt_lengths[rows[0]]) + sum(int(lengths[r]) - int(prompt_lengths[r]) for r in rows)
                  for g, rows in members.items()}
    plan, current = [], []
    for g in sorted(members, key=lambda g: packed_len[g]):
        if current and len(current) + len(members[g]) > micro_batch_size:
            plan.append(current)
            current = []
        current = current + members[g]
    plan.append(current)
    return plan


def padded_tokens(plan: list[list[int]], lengths: Sequence[int], *, prompt_lengths: Sequence[int] | None = None,
                  groups: Sequence[int] | None = None) -> int:
    """Positions the forward passes of ``plan`` compute: per micro-batch, units x its longest unit
    (units as in ``plan_token_budget``: rows, or with ``groups`` each group's rows packed into one)."""
    total = 0
    for rows in plan:
        if groups is None:
            total += len(rows) * max(int(lengths[r]) for r in rows)
            continue
        packed: dict[int, int] = {}
        for r in rows:
            p = int(prompt_lengths[r])
            packed[groups[r]] = packed.get(groups[r], p) + int(lengths[r]) - p
        total += len(packed) * max(packed.values())
    return total
