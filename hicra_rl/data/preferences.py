"""Preference pairs for reward-model training (``hicra-rm train``): JSONL rows ``{"prompt", "chosen", "rejected"}``.

``prompt`` is the text the policy saw (for pairs made by ``hicra-rm pairs``: the chat-templated prompt),
``chosen`` the preferred response and ``rejected`` the other one; the reward model reads ``prompt + response``
(:func:`hicra_rl.rewards.model.encode_pair`).  An optional ``id`` is kept for messages.  A bad row (not JSON,
not an object, a field missing, not a string, empty, or chosen identical to rejected) is a one-line
:class:`~hicra_rl.data.datasets.BadRowError` naming the file, the row (the 1-based line) and the field, as the
problem loaders give.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hicra_rl.data.datasets import BadRowError, _read_jsonl, _RowError
from hicra_rl.errors import BadInputError, InputNotFoundError

PAIR_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    row: int          # 1-based line of the file
    id: str
    prompt: str
    chosen: str
    rejected: str


def _bad_field(row: object) -> tuple[str, str] | None:
    """(field, reason) of the first problem of a row, or None when it is a good pair."""
    if isinstance(row, _RowError):
        return row.field, row.reason
    if not isinstance(row, Mapping):
        return "<row>", f"expected an object with {', '.join(PAIR_FIELDS)}, got {type(row).__name__}"
    for name in PAIR_FIELDS:
        if name not in row or row[name] is None:
            return name, "missing"
        if not isinstance(row[name], str):
            return name, f"expected a string, got {type(row[name]).__name__}"
        if not row[name].strip():
            return name, "empty"
    if row["chosen"] == row["rejected"]:
        return "rejected", "identical to chosen (a pair needs two different responses)"
    return None


def load_preference_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Every row of a JSONL file of preference pairs, checked (see the module docstring)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise InputNotFoundError(f"preference pairs file {str(path)!r} does not exist")
    pairs = []
    for row_no, row in _read_jsonl(p):
        bad = _bad_field(row)
        if bad is not None:
            raise BadRowError(str(p), row_no, *bad)
        pairs.append(PreferencePair(row_no, str(row.get("id", f"{p.stem}-{row_no}")), row["prompt"], row["chosen"],
                                    row["rejected"]))
    if not pairs:
        raise BadInputError(f"{p}: no preference pairs (the file is empty or has only blank lines)")
    return pairs


__all__ = ["PAIR_FIELDS", "PreferencePair", "load_preference_pairs"]
