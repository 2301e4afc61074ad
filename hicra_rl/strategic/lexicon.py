"""The Strategic-Gram lexicon: a validated set of n-grams with their semantic cluster and Cluster-DF.

File format (JSON)::

    {"format": "hicra-sg-lexicon/1",
     "metadata": {...how it was made...},
     "entries": [{"ngram": "the total number of", "cluster": 0, "cluster_df": 812, "df": 640,
                  "source": "mined"}, ...]}

``ngram`` and ``cluster`` are required; ``cluster_df`` (distinct solutions of the mining corpus
containing any n-gram of the cluster), ``df`` (distinct solutions containing this n-gram) and
``source`` are optional. N-grams are stored in the canonical form of :mod:`hicra_rl.strategic.text`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hicra_rl.errors import BadInputError
from hicra_rl.iofiles import write_text_atomic
from hicra_rl.strategic.text import normalise_ngram

LEXICON_FORMAT = "hicra-sg-lexicon/1"


class LexiconError(BadInputError):
    """A lexicon file or object is malformed; the message names the file, entry and field."""


@dataclass(frozen=True)
class LexiconEntry:
    """One Strategic Gram."""

    ngram: str
    cluster: int
    cluster_df: int | None = None
    df: int | None = None
    source: str = "mined"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ngram": self.ngram, "cluster": self.cluster}
        if self.cluster_df is not None:
            out["cluster_df"] = self.cluster_df
        if self.df is not None:
            out["df"] = self.df
        out["source"] = self.source
        return out


@dataclass(frozen=True)
class Lexicon:
    """An immutable, non-empty set of Strategic Grams (canonical, unique n-grams)."""

    entries: tuple[LexiconEntry, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        if not self.entries:
            raise LexiconError("lexicon is empty: it needs at least one n-gram")
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.entries):
            try:
                canonical = normalise_ngram(entry.ngram)
            except ValueError as err:
                raise LexiconError(f"entry {i}: {err}") from None
            if canonical != entry.ngram:
                raise LexiconError(
                    f"entry {i}: n-gram {entry.ngram!r} is not canonical (expected {canonical!r})"
                )
            if entry.ngram in seen:
                raise LexiconError(
                    f"entry {i}: duplicate n-gram {entry.ngram!r} (also entry {seen[entry.ngram]})"
                )
            seen[entry.ngram] = i

    @classmethod
    def from_ngrams(cls, ngrams: list[str], source: str = "user", metadata: Mapping[str, Any] | None = None):
        """A lexicon where each (normalised) n-gram is its own cluster."""
        entries = [LexiconEntry(normalise_ngram(g), cluster=i, source=source) for i, g in enumerate(ngrams)]
        return cls(tuple(entries), dict(metadata or {}))

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ngrams(self) -> list[str]:
        return [e.ngram for e in self.entries]

    @property
    def cluster_of(self) -> dict[str, int]:
        """Map n-gram -> cluster id."""
        return {e.ngram: e.cluster for e in self.entries}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LEXICON_FORMAT,
            "metadata": dict(self.metadata),
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<lexicon>") -> Lexicon:
        """Validate a parsed lexicon; errors name ``origin``, the entry index and the field."""
        if not isinstance(data, dict):
            raise LexiconError(f"{origin}: top level must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format", LEXICON_FORMAT)
        if fmt != LEXICON_FORMAT:
            raise LexiconError(f"{origin}: field 'format' is {fmt!r}; expected {LEXICON_FORMAT!r}")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise LexiconError(f"{origin}: field 'metadata' must be an object, got {type(metadata).__name__}")
        if "entries" not in data:
            raise LexiconError(f"{origin}: missing field 'entries'")
        raw = data["entries"]
        if not isinstance(raw, list):
            raise LexiconError(f"{origin}: field 'entries' must be a list, got {type(raw).__name__}")
        if not raw:
            raise LexiconError(f"{origin}: lexicon is empty (field 'entries' has no n-gram)")
        entries = [_entry_from_dict(item, f"{origin}: entry {i}") for i, item in enumerate(raw)]
        try:
            return cls(tuple(entries), metadata)
        except LexiconError as err:
            raise LexiconError(f"{origin}: {err}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the lexicon as JSON atomically (temporary file in the same folder + ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        entries = ",\n".join("  " + json.dumps(e, ensure_ascii=False) for e in data["entries"])
        metadata = json.dumps(data["metadata"], indent=1, ensure_ascii=False).replace("\n", "\n ")
        text = f'{{\n "format": {json.dumps(data["format"])},\n "metadata": {metadata},\n "entries": [\n{entries}\n ]\n}}\n'
        return write_text_atomic(path, text)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_from_dict(item: Any, where: str) -> LexiconEntry:
    if not isinstance(item, dict):
        raise LexiconError(f"{where}: must be an object with fields 'ngram' and 'cluster', got {item!r}")
    for name in ("ngram", "cluster"):
        if name not in item:
            raise LexiconError(f"{where}: missing field {name!r}")
    unknown = set(item) - {"ngram", "cluster", "cluster_df", "df", "source"}
    if unknown:
        raise LexiconError(f"{where}: unknown field(s) {sorted(unknown)}")
    ngram = item["ngram"]
    if not isinstance(ngram, str):
        raise LexiconError(f"{where}: field 'ngram' must be a string, got {type(ngram).__name__}")
    try:
        canonical = normalise_ngram(ngram)
    except ValueError as err:
        raise LexiconError(f"{where}: field 'ngram': {err}") from None
    if not _is_int(item["cluster"]):
        raise LexiconError(f"{where}: field 'cluster' must be an integer, got {item['cluster']!r}")
    counts = {}
    for name in ("cluster_df", "df"):
        value = item.get(name)
        if value is not None and not (_is_int(value) and value >= 0):
            raise LexiconError(f"{where}: field {name!r} must be a non-negative integer, got {value!r}")
        counts[name] = value
    source = item.get("source", "mined")
    if not isinstance(source, str):
        raise LexiconError(f"{where}: field 'source' must be a string, got {type(source).__name__}")
    return LexiconEntry(canonical, item["cluster"], counts["cluster_df"], counts["df"], source)


def load_lexicon(path: str | os.PathLike) -> Lexicon:
    """Read and validate a lexicon JSON file (see the module docstring for the format)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LexiconError(f"{path}: lexicon file not found") from None
    except UnicodeDecodeError as err:
        raise LexiconError(f"{path}: not UTF-8 text ({err})") from None
    except OSError as err:  # a directory, no permission, ...
        raise LexiconError(f"{path}: cannot read the lexicon file ({err.strerror or err})") from None
    if not text.strip():
        raise LexiconError(f"{path}: lexicon file is empty (expected a JSON object with field 'entries')")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LexiconError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    return Lexicon.from_dict(data, origin=str(path))


def default_lexicon_path() -> Path:
    """Path of the lexicon shipped with the package (mined from GSM8K train; see its metadata)."""
    return Path(str(resources.files("hicra_rl").joinpath("resources", "default_lexicon.json")))


def load_default_lexicon() -> Lexicon:
    return load_lexicon(default_lexicon_path())
