"""reasoning-gym procedural tasks: generate items, and score answers with the task's own ``score_answer``.

A task is named ``reasoning_gym:<name>`` in the verifier registry (e.g. ``reasoning_gym:chain_sum``).
The model's final answer is taken from its ``\\boxed{}`` (see :func:`hicra_rl.rewards.math.extract_answer`)
and handed to reasoning-gym's scorer, which may give partial credit (a score in [0, 1]).

Some reasoning-gym scorers evaluate the model's answer as Python: ``eval(answer)`` (string_insertion,
spiral_matrix, binary_matrix, n_queens: "is it a Python list?") or ``sympy.parse_expr(answer)``, which runs
``eval`` on it too (polynomial_multiplication, puzzle24, countdown, simple_integration,
intermediate_integration).  An answer such as ``__import__('os').system(...)`` would run.  On import this
module rebinds those modules' ``eval`` to :func:`ast.literal_eval` (Python literals only) and their
``parse_expr`` to :func:`safe_parse_expr` (arithmetic over allowlisted names only, no attributes, strings,
subscripts or dunders), so model output is parsed, never executed (``tests/test_security.py``).
"""
from __future__ import annotations

import ast
import importlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import reasoning_gym
from reasoning_gym.factory import DATASETS

from hicra_rl.rewards.math import extract_answer

__all__ = ["TASK_PREFIX", "TaskItem", "generate_task_items", "safe_parse_expr", "score_task_answer", "task_name",
           "verify_task"]

TASK_PREFIX = "reasoning_gym:"


# ---------------------------------------------------------------- reasoning-gym scorers never execute answers

# modules whose scorer calls ``eval`` on the model's answer (or on the entry's own answer: a literal too)
EVAL_MODULES = ("reasoning_gym.algorithmic.string_insertion", "reasoning_gym.algorithmic.spiral_matrix",
                "reasoning_gym.algorithmic.binary_matrix", "reasoning_gym.algorithmic.number_sorting",
                "reasoning_gym.games.n_queens")
# modules whose scorer calls sympy's ``parse_expr`` (Python ``eval`` underneath) on the model's answer
PARSE_EXPR_MODULES = ("reasoning_gym.algebra.polynomial_multiplication", "reasoning_gym.games.puzzle24",
                      "reasoning_gym.games.countdown", "reasoning_gym.algebra.simple_integration",
                      "reasoning_gym.algebra.intermediate_integration")
MAX_PARSED_CHARS = 2000
# names an arithmetic / polynomial / integral answer may use (single letters with digits are symbols)
_ALLOWED_NAMES = frozenset("""
    sin cos tan cot sec csc asin acos atan atan2 acot asec acsc sinh cosh tanh coth asinh acosh atanh
    exp log ln sqrt cbrt root pi E I oo Abs abs sign floor ceiling factorial binomial gamma erf Min Max min max
    Rational Integer Float
""".split())
_FORBIDDEN = re.compile(r"__|[\"'`\\\[\]{};:@!$&|~#?]|\blambda\b|\.\s*[A-Za-z_]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_SYMBOL = re.compile(r"[A-Za-z][0-9]*")


def _literal_eval(source, globals=None, locals=None):  # noqa: A002 -- stands in for the builtin eval
    """``eval`` for reasoning-gym's scorers: Python literals only (lists, tuples, strings, numbers)."""
    if not isinstance(source, str) or len(source) > 100_000:
        raise ValueError("only a Python literal of at most 100000 characters is evaluated")
    return ast.literal_eval(source)


def safe_parse_expr(s, local_dict=None, *args, **kwargs):
    """sympy's ``parse_expr`` on arithmetic only: refused (ValueError) unless ``s`` is at most 2000 characters
    of numbers, operators, parentheses and names that are single-letter symbols (``x``, ``y2``), keys of
    ``local_dict`` or math functions (sin, exp, log, sqrt, pi, ...); no attribute access, strings,
    subscripts, dunders or lambdas."""
    from sympy.parsing.sympy_parser import parse_expr

    if not isinstance(s, str) or len(s) > MAX_PARSED_CHARS:
        raise ValueError(f"expression refused: not a string of at most {MAX_PARSED_CHARS} characters")
    if _FORBIDDEN.search(s):
        raise ValueError(f"expression refused: {s[:80]!r} holds characters an arithmetic answer does not")
    allowed = _ALLOWED_NAMES | set(local_dict or ())
    bad = sorted({n for n in _IDENTIFIER.findall(s) if n not in allowed and not _SYMBOL.fullmatch(n)})
    if bad:
        raise ValueError(f"expression refused: unknown name(s) {bad[:5]}")
    return parse_expr(s, local_dict, *args, **kwargs)


class _SympyWithSafeParse:
    """The ``sympy`` module as a scorer sees it, with :func:`safe_parse_expr` as ``parse_expr``."""

    def __init__(self, module):
        self._module = module

    parse_expr = staticmethod(safe_parse_expr)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _harden_reasoning_gym() -> None:
    for name in EVAL_MODULES:
        importlib.import_module(name).eval = _literal_eval
    for name in PARSE_EXPR_MODULES:
        module = importlib.import_module(name)
        if "parse_expr" in vars(module):
            module.parse_expr = safe_parse_expr
        for alias in ("sympy", "sp"):
            if alias in vars(module) and not isinstance(vars(module)[alias], _SympyWithSafeParse):
                setattr(module, alias, _SympyWithSafeParse(vars(module)[alias]))


_harden_reasoning_gym()


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
