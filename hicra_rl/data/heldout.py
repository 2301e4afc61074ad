"""Held-out data by construction: which role a data set plays, and no problem text shared across roles.

Roles: ``"train"`` (RL training), ``"cold_start"`` (the SFT warm-up, ``hicra-sft``) and ``"eval"``
(periodic evaluation in ``hicra-train`` and ``hicra-eval``).

reasoning-gym builds item ``i`` of a dataset with seed ``s`` from ``Random(s + i)``, so sets drawn with
nearby seeds share items.  Two guarantees replace "eval seed = train seed + 1":

1. Item seeds.  The item-seed space ``[0, 2**32)`` (numpy-legal) is cut into one block of ``2**30`` per
   role; within its role's block a run seed ``0 <= seed < MAX_SEED`` owns the slot
   ``[block + seed * SEED_SLOT, block + (seed + 1) * SEED_SLOT)``.  Candidates are drawn only from that
   slot, so no item seed is ever used by two roles, whatever the seeds and sizes.
2. Problem text.  Small tasks repeat problems under different item seeds (2000 items of the default
   arithmetic task hold 1666 distinct texts; a 64-item set drawn from another seed block shares ~19 of them).
   So every problem is assigned to one role by a hash of its key (the normalised text; the whitespace-free
   expression for arithmetic tasks, so rewordings of one sum stay together): train gets half the problem
   space, cold start and eval a quarter each.  A role keeps only its own problems, hence two sets of
   different roles never share a text, for any task, seed or size.

Published data (GSM8K, MATH-500, ...) relies on its published train/test split; :func:`check_split`
refuses to train on a test split or evaluate on a train split, and :func:`drop_seen` removes (counting
and logging them) problems whose normalised text appears in a reference (training) set.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

import datasets

from hicra_rl.data.datasets import ProblemSet, _finish, task_record
from hicra_rl.errors import BadInputError

__all__ = [
    "MAX_SEED",
    "MAX_SIZE",
    "ROLES",
    "ROLE_BLOCK",
    "SEED_SLOT",
    "check_split",
    "drop_seen",
    "heldout_task_problems",
    "item_seed_slot",
    "normalize_problem",
    "problem_key",
    "problem_texts",
    "role_of_key",
    "shared_texts",
]

log = logging.getLogger(__name__)

ROLES = ("train", "cold_start", "eval")
ROLE_BLOCK = 2**30                   # item seeds per role (the 4th block of 2**32 is unused)
SEED_SLOT = 2**18                    # item seeds per (role, run seed): candidates for one set
MAX_SEED = ROLE_BLOCK // SEED_SLOT   # run seeds 0 .. 4095
MAX_SIZE = SEED_SLOT // 8            # items per set; a quarter-share role needs ~4x candidates, 2x margin
_BUCKETS = ("train", "train", "cold_start", "eval")   # hash buckets -> role (train gets half)
_EXPRESSION_TASKS = frozenset({"basic_arithmetic", "chain_sum"})   # metadata["expression"] is the problem

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-",
                         "\u2212": "-"})
_END_PUNCT = ".,;:!?\"'` " + "\u2026"


def normalize_problem(text: str) -> str:
    """Key for comparing problem texts: NFKC, casefold, plain quotes/dashes, whitespace collapsed and
    dropped next to punctuation/operators, sentence punctuation stripped at both ends."""
    s = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r" ?([^\w ]) ?", r"\1", s)
    return s.strip(_END_PUNCT)


def problem_key(question: str, task: str = "", metadata: Mapping[str, Any] | None = None) -> str:
    """What decides a problem's role: the whitespace-free expression for arithmetic tasks, else the
    normalised text."""
    if task.removeprefix("reasoning_gym:") in _EXPRESSION_TASKS and metadata and metadata.get("expression"):
        return "expr:" + re.sub(r"\s+", "", str(metadata["expression"]))
    return normalize_problem(question)


def role_of_key(key: str) -> str:
    """The role owning a problem key (a fixed hash partition: train 1/2, cold_start 1/4, eval 1/4)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"hicra-heldout").digest()
    return _BUCKETS[int.from_bytes(digest, "big") % len(_BUCKETS)]


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"data role must be one of {ROLES}, got {role!r}")


def item_seed_slot(role: str, seed: int) -> range:
    """The reasoning-gym item seeds a ``role`` set of run ``seed`` may use (disjoint across roles)."""
    _check_role(role)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
        raise BadInputError(f"seed {seed!r} is out of range for reasoning-gym data: held-out item-seed blocks "
                         f"allow 0 <= seed < {MAX_SEED}")
    start = ROLES.index(role) * ROLE_BLOCK + seed * SEED_SLOT
    return range(start, start + SEED_SLOT)


def heldout_task_problems(task: str, size: int, seed: int, role: str,
                          config: Mapping[str, Any] | None = None) -> ProblemSet:
    """``size`` reasoning-gym items for ``role``: drawn from the role's item-seed slot, keeping only the
    problems the hash partition gives to ``role``.  Ids are ``<task>-<role>-s<seed>-<i>``, item seed
    ``slot.start + i``."""
    from hicra_rl.rewards.tasks import generate_task_items

    slot = item_seed_slot(role, seed)
    if not isinstance(size, int) or not 0 < size <= MAX_SIZE:
        raise BadInputError(f"size {size!r} is out of range for held-out reasoning-gym data: 1..{MAX_SIZE}")
    share = _BUCKETS.count(role) / len(_BUCKETS)
    records: list[dict] = []
    used = 0
    name = task
    while len(records) < size:
        if used >= len(slot):
            raise BadInputError(f"{task}: only {len(records)} of {size} {role} problems among {len(slot)} candidates "
                             "(the task's problem space is too small for a held-out set of this size)")
        chunk = min(len(slot) - used, max(64, math.ceil((size - len(records)) / share * 1.25)))
        for item in generate_task_items(task, chunk, slot.start + used, config):
            name = item.task
            if role_of_key(problem_key(item.question, item.task, item.metadata)) != role:
                continue
            records.append(task_record(item, f"{name}-{role}-s{seed}-{used + item.index}"))
            if len(records) == size:
                break
        used += chunk
    source = (f"{name}(role={role}, seed={seed}, size={size}, item seeds {slot.start}+, "
              f"config={dict(config or {})})")
    return _finish(name, source, records, [])


def check_split(role: str, split: str, what: str) -> None:
    """Refuse to train (or cold-start) on a test split and to evaluate on a train split."""
    _check_role(role)
    if role == "eval" and split == "train":
        raise BadInputError(f"{what}: role 'eval' on split 'train' would evaluate on training data "
                         "(use a test split, e.g. split=test)")
    if role != "eval" and split == "test":
        raise BadInputError(f"{what}: role {role!r} on split 'test' would train on evaluation data "
                         "(use a train split)")


def problem_texts(problems: ProblemSet | Iterable[str] | Iterable[Mapping[str, Any]]) -> set[str]:
    """Normalised texts of a problem set, rows (``{"problem": ...}``) or plain strings."""
    rows = problems.rows if isinstance(problems, ProblemSet) else problems
    if isinstance(rows, datasets.Dataset):
        rows = list(rows["problem"])
    return {normalize_problem(r if isinstance(r, str) else r["problem"]) for r in rows}


def shared_texts(a, b) -> set[str]:
    """Normalised problem texts found in both ``a`` and ``b`` (anything :func:`problem_texts` takes)."""
    return problem_texts(a) & problem_texts(b)


def drop_seen(problems: ProblemSet, reference, what: str = "") -> ProblemSet:
    """``problems`` without the rows whose normalised text is in ``reference`` (e.g. the training set).
    The count is logged and the removed ids are kept in ``overlap_removed``; never silent."""
    seen = problem_texts(reference)
    texts, ids = list(problems.rows["problem"]), list(problems.rows["id"])
    keep = [i for i, t in enumerate(texts) if normalize_problem(t) not in seen]
    removed = [ids[i] for i in sorted(set(range(len(texts))) - set(keep))]
    if not removed:
        log.info("%s: 0 of %d problems appear in the training set", what or problems.name, len(texts))
        return problems
    log.warning("%s: removed %d of %d problems whose text appears in the training set (first: %s)",
                what or problems.name, len(removed), len(texts), ", ".join(removed[:5]))
    if len(keep) == 0:
        raise BadInputError(f"{what or problems.name}: all {len(texts)} problems appear in the training set")
    return ProblemSet(problems.name, problems.source, problems.rows.select(keep), list(problems.skipped),
                      list(problems.overlap_removed) + removed)
