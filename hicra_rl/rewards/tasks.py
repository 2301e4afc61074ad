"""reasoning-gym procedural tasks: generate items, and score answers with the task's own ``score_answer``.

A task is named ``reasoning_gym:<name>`` in the verifier registry (e.g. ``reasoning_gym:chain_sum``).
The model's final answer is taken from its ``\\boxed{}`` (see :func:`hicra_rl.rewards.math.extract_answer`)
and handed to reasoning-gym's scorer, which may give partial credit (a score in [0, 1]).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import reasoning_gym
from reasoning_gym.factory import DATASETS

from hicra_rl.rewards.math import extract_answer

__all__ = ["TASK_PREFIX", "TaskItem", "generate_task_items", "score_task_answer", "task_name", "verify_task"]

TASK_PREFIX = "reasoning_gym:"


@dataclass(frozen=True)
class TaskItem:
    """One generated problem: its question, gold answer and reasoning-gym's metadata (kept for scoring)."""

    task: str       # "reasoning_gym:<name>"
    index: int
    question: str
    answer: str
    metadata: dict[str, Any]

    @property
    def entry(self) -> dict[str, Any]:
        """The dict reasoning-gym's ``score_answer(answer, entry)`` expects."""
        return {"question": self.question, "answer": self.answer, "metadata": self.metadata}


def task_name(task: str) -> str:
    """``"reasoning_gym:chain_sum"`` or ``"chain_sum"`` -> ``"chain_sum"``, checked against reasoning-gym."""
    name = task.removeprefix(TASK_PREFIX)
    if name not in DATASETS:
        raise ValueError(f"unknown reasoning-gym task {name!r}; known: {', '.join(sorted(DATASETS))}")
    return name


def generate_task_items(task: str, size: int, seed: int, config: Mapping[str, Any] | None = None) -> list[TaskItem]:
    """``size`` items of a reasoning-gym task, deterministic in (task, config, seed)."""
    name = task_name(task)
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **dict(config or {}))
    items = []
    for i in range(size):
        entry = dataset[i]
        if not isinstance(entry.get("answer"), str):
            raise TypeError(f"reasoning-gym task {name!r} item {i} has a non-string answer {entry.get('answer')!r}")
        items.append(TaskItem(TASK_PREFIX + name, i, entry["question"], entry["answer"], dict(entry["metadata"])))
    return items


@cache
def _scorer(name: str):
    """A dataset instance used only for its ``score_answer`` (scoring reads the entry, not the instance's items).
    Built with the task's default config; reasoning-gym's scorers depend on the entry only."""
    return reasoning_gym.create_dataset(name, size=1, seed=0)


def score_task_answer(task: str, answer: str | None, gold: str | Mapping[str, Any]) -> float:
    """reasoning-gym's own score of ``answer`` against ``gold``: the plain gold answer string, or the full
    entry (``{"answer", "metadata"}``, needed by tasks whose scorer reads the metadata); a JSON string of
    such an entry is accepted too."""
    if isinstance(gold, str) and gold.startswith("{") and '"answer"' in gold:
        gold = json.loads(gold)
    entry = {"answer": gold, "metadata": {}} if isinstance(gold, str) else dict(gold)
    if answer is None:
        return 0.0
    return float(_scorer(task_name(task)).score_answer(answer, entry))


def verify_task(response: str, gold: str | Mapping[str, Any], task: str, mode: str = "boxed") -> tuple[float, str | None]:
    """(score in [0, 1], extracted answer) of a response to a reasoning-gym item."""
    answer = extract_answer(response, mode)
    return score_task_answer(task, answer, gold), answer
