"""Problem sets for training and evaluation, as HuggingFace ``datasets.Dataset`` with one schema.

Every set has the columns ``id, problem, answer, task, subject, level, gold_entry``:
``task`` names the verifier (see :mod:`hicra_rl.rewards.pool`), ``gold_entry`` is a JSON string of the
reasoning-gym entry for procedural tasks ("" otherwise).

Sources: a JSONL file (read line by line so an error names the exact line), a Parquet file, a
``save_to_disk`` directory, a hub dataset (needs network), or a reasoning-gym task.  A field mapping
(dotted paths such as ``reward_model.ground_truth`` or ``prompt.0.content`` reach nested fields) turns
any of them into the common schema.  A bad row raises :class:`BadRowError` naming file, row and field;
with ``on_bad_row="skip"`` it is counted, logged and returned in ``ProblemSet.skipped`` instead.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets

from hicra_rl.errors import BadInputError, InputNotFoundError
from hicra_rl.rewards.math import gsm8k_gold

__all__ = [
    "BUILTIN_SPECS",
    "BadRow",
    "BadRowError",
    "DatasetSpec",
    "FieldMap",
    "ProblemSet",
    "builtin_spec",
    "default_data_root",
    "load_problems",
    "reasoning_gym_problems",
    "task_record",
]

log = logging.getLogger(__name__)

COLUMNS = ("id", "problem", "answer", "task", "subject", "level", "gold_entry")
_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "task": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "level": datasets.Value("int64"),
        "gold_entry": datasets.Value("string"),
    }
)

# DAPO-Math-17k wraps each problem in an instruction asking for "Answer: $Answer"; our prompt asks for
# \boxed{} instead, so the wrapper is removed (exact strings of the published dataset).
_DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
_DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


class BadRowError(BadInputError):
    """A row that cannot become a problem: names the file, the row (1-based) and the field."""

    def __init__(self, source: str, row: int, field_name: str, reason: str):
        self.source, self.row, self.field, self.reason = source, row, field_name, reason
        super().__init__(f"{source}: row {row}: field {field_name!r}: {reason}")


@dataclass(frozen=True)
class BadRow:
    source: str
    row: int        # 1-based (the line number in a JSONL file)
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: row {self.row}: field {self.field!r}: {self.reason}"


@dataclass(frozen=True)
class FieldMap:
    """Where the common fields live in a source row (dotted paths reach nested fields / list items)."""

    problem: str = "problem"
    answer: str = "answer"
    id: str | None = None        # None: "<name>-<row>"
    subject: str | None = None
    level: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Where a problem set comes from and how its rows map to the common schema.

    ``answer_format``: "plain", or "gsm8k" (the gold is the text after ``####``, thousands separators removed).
    ``problem_format``: "plain", or "dapo" (strip DAPO-Math-17k's instruction wrapper).
    ``cast_answer``: accept numeric answers and turn them into strings (otherwise a non-string answer is bad).
    """

    name: str
    path: str | None = None
    hub: str | None = None
    split: str = "train"
    fields: FieldMap = field(default_factory=FieldMap)
    answer_format: str = "plain"
    problem_format: str = "plain"
    task: str = "math"
    cast_answer: bool = False
    limit: int | None = None
    on_bad_row: str = "error"

    def __post_init__(self) -> None:
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        if self.answer_format not in ("plain", "gsm8k"):
            raise ValueError(f"answer_format must be 'plain' or 'gsm8k', got {self.answer_format!r}")
        if self.problem_format not in ("plain", "dapo"):
            raise ValueError(f"problem_format must be 'plain' or 'dapo', got {self.problem_format!r}")
        if (self.path is None) == (self.hub is None):
            raise ValueError(f"dataset {self.name!r}: give exactly one of path and hub")


@dataclass
class ProblemSet:
    """A loaded set: ``rows`` (a ``datasets.Dataset`` with :data:`COLUMNS`), the rows skipped as bad and
    the ids removed as overlapping the training set."""

    name: str
    source: str
    rows: datasets.Dataset
    skipped: list[BadRow] = field(default_factory=list)
    overlap_removed: list[str] = field(default_factory=list)  # ids dropped as seen in training (heldout.drop_seen)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def default_data_root() -> Path:
    """``$HICRA_DATA_ROOT``, else ``../shared/data`` next to the repository."""
    env = os.environ.get("HICRA_DATA_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


BUILTIN_SPECS = ("gsm8k_train", "gsm8k_test", "math500", "dapo_math_17k", "deepscaler")


def builtin_spec(name: str, path: str | None = None, data_root: str | Path | None = None, **overrides) -> DatasetSpec:
    """Spec of a known set.  GSM8K and MATH-500 read ``data_root`` (default :func:`default_data_root`);
    DAPO-Math-17k and DeepScaleR need ``path`` to a local Parquet/JSONL copy (or ``hub=`` with network).
    ``overrides`` are further :class:`DatasetSpec` fields (``limit``, ``on_bad_row``, ...)."""
    root = Path(data_root) if data_root is not None else default_data_root()
    if name in ("gsm8k_train", "gsm8k_test"):
        split = name.split("_")[1]
        kwargs = {"path": str(root / "gsm8k" / f"{split}.jsonl"), "split": split,
                  "fields": FieldMap(problem="question", answer="answer"), "answer_format": "gsm8k", "task": "gsm8k"}
    elif name == "math500":
        kwargs = {"path": str(root / "math500" / "test.jsonl"), "split": "test",
                  "fields": FieldMap(problem="problem", answer="answer", id="unique_id", subject="subject",
                                     level="level")}
    elif name == "dapo_math_17k":
        kwargs = {"path": None, "problem_format": "dapo",
                  "fields": FieldMap(problem="prompt.0.content", answer="reward_model.ground_truth", id="extra_info.index")}
    elif name == "deepscaler":
        kwargs = {"path": None, "fields": FieldMap(problem="problem", answer="answer")}
    else:
        raise BadInputError(f"unknown built-in dataset {name!r}; known: {BUILTIN_SPECS}")
    if path is not None:
        kwargs["path"] = str(path)
    if overrides.get("hub"):
        kwargs["path"] = None
    kwargs.update(overrides)
    if kwargs.get("path") is None and not kwargs.get("hub"):
        raise BadInputError(f"built-in dataset {name!r} needs path= to a local copy (or hub= with network)")
    return DatasetSpec(name=name, **kwargs)


# ---------------------------------------------------------------- reading sources


class _RowError(Exception):
    """A line of a JSONL file that is no row (bad UTF-8, bad JSON): becomes a bad row naming that line."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line; a line that is not UTF-8 or not JSON gives
    (line number, :class:`_RowError`).  A ``.json`` file holding one JSON array is read as its items."""
    with open(path, "rb") as f:
        data = f.read()
    if path.suffix == ".json" and data.lstrip()[:1] == b"[":
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise BadInputError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        return list(enumerate(items, start=1))
    out: list[tuple[int, Any]] = []
    for line_no, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.append((line_no, _RowError("<utf-8>", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                                      f"{exc.start + 1})")))
            continue
        if not line.strip():
            continue
        try:
            out.append((line_no, json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((line_no, _RowError("<json>", f"not valid JSON at column {exc.colno}: {exc.msg}")))
    return out


def _read_source(spec: DatasetSpec) -> tuple[str, list[tuple[int, Any]]]:
    if spec.hub is not None:
        try:
            ds = datasets.load_dataset(spec.hub, split=spec.split)
        except Exception as exc:
            raise RuntimeError(f"could not load hub dataset {spec.hub!r} (split {spec.split!r}); it needs network "
                               f"or a local copy given as path: {exc}") from exc
        return f"hub:{spec.hub}[{spec.split}]", list(enumerate(ds, start=1))
    path = Path(spec.path)
    if not path.exists():
        raise InputNotFoundError(f"dataset {spec.name!r}: {path} does not exist")
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:  # a folder save_to_disk did not write
            raise BadInputError(f"dataset {spec.name!r}: {path} is a directory but not a save_to_disk dataset ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise BadInputError(f"{path}: no split {spec.split!r}; splits: {list(ds)}")
            ds = ds[spec.split]
        return str(path), list(enumerate(ds, start=1))
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".json"):
        return str(path), _read_jsonl(path)
    if suffix == ".parquet":
        if path.stat().st_size == 0:
            raise BadInputError(f"dataset {spec.name!r}: {path} is empty (0 bytes), not a Parquet file")
        with tempfile.TemporaryDirectory(prefix="hicra-parquet-") as cache_dir:  # leave no cache behind
            try:
                ds = datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir, keep_in_memory=True)
            except Exception as exc:  # pyarrow's ArrowInvalid and friends do not name the file
                raise BadInputError(f"dataset {spec.name!r}: {path} is not a readable Parquet file: "
                                 f"{type(exc).__name__}: {exc}") from None
            return str(path), list(enumerate(ds, start=1))
    raise BadInputError(f"dataset {spec.name!r}: {path} is not .jsonl, .json, .parquet or a save_to_disk directory")


_MISSING = object()


def _get(row: Any, dotted: str) -> Any:
    value = row
    for part in dotted.split("."):
        if isinstance(value, Mapping):
            value = value.get(part, _MISSING)
        elif isinstance(value, (list, tuple)) and part.isdigit():
            value = value[int(part)] if int(part) < len(value) else _MISSING
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _level(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", str(value))
    if not match:
        raise TypeError
    return int(match.group(1))


def _convert_row(spec: DatasetSpec, row: Any, row_no: int) -> dict[str, Any] | tuple[str, str]:
    """The row in the common schema, or (field, reason) when it is bad."""
    if isinstance(row, _RowError):
        return row.field, row.reason
    if not isinstance(row, Mapping):
        return "<row>", f"expected an object, got {type(row).__name__}"
    fm = spec.fields
    problem = _get(row, fm.problem)
    if problem is _MISSING or problem is None:
        return fm.problem, "missing"
    if not isinstance(problem, str):
        return fm.problem, f"expected a string, got {type(problem).__name__}"
    if spec.problem_format == "dapo":
        problem = problem.removeprefix(_DAPO_PREFIX).removesuffix(_DAPO_SUFFIX)
    if not problem.strip():
        return fm.problem, "empty problem"
    answer = _get(row, fm.answer)
    if answer is _MISSING or answer is None:
        return fm.answer, "missing"
    if spec.cast_answer and isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        return fm.answer, f"expected a string, got {type(answer).__name__} {answer!r}"
    if spec.answer_format == "gsm8k":
        try:
            answer = gsm8k_gold(answer)
        except ValueError as exc:
            return fm.answer, str(exc)
    if not answer.strip():
        return fm.answer, "empty answer"
    if fm.id is not None:
        row_id = _get(row, fm.id)
        if row_id is _MISSING or row_id is None or (isinstance(row_id, str) and not row_id.strip()):
            return fm.id, "missing"
        row_id = str(row_id)
    else:
        row_id = f"{spec.name}-{row_no}"
    subject = None
    if fm.subject is not None:
        subject = _get(row, fm.subject)
        if subject is _MISSING or not isinstance(subject, str):
            return fm.subject, "missing" if subject is _MISSING else f"expected a string, got {subject!r}"
    level = None
    if fm.level is not None:
        raw_level = _get(row, fm.level)
        if raw_level is _MISSING:
            return fm.level, "missing"
        try:
            level = _level(raw_level)
        except TypeError:
            return fm.level, f"expected an integer or 'Level <n>', got {raw_level!r}"
    return {"id": row_id, "problem": problem, "answer": answer.strip(), "task": spec.task,
            "subject": subject, "level": level, "gold_entry": ""}


def _finish(name: str, source: str, records: list[dict], skipped: list[BadRow]) -> ProblemSet:
    if skipped:
        shown = "; ".join(str(b) for b in skipped[:5])
        log.warning("%s: skipped %d bad row(s) of %d: %s%s", source, len(skipped), len(records) + len(skipped),
                    shown, " ..." if len(skipped) > 5 else "")
    if not records:
        if not skipped:
            raise BadInputError(f"{source}: no rows (the source is empty or has only blank lines)")
        raise BadInputError(f"{source}: no usable rows (all {len(skipped)} skipped as bad, first: {skipped[0]})")
    columns = {c: [r[c] for r in records] for c in COLUMNS}
    return ProblemSet(name, source, datasets.Dataset.from_dict(columns, features=_FEATURES), skipped)


def load_problems(spec: DatasetSpec | str, **overrides) -> ProblemSet:
    """Load, validate and normalise a problem set (a spec or a built-in name, see :func:`builtin_spec`)."""
    if isinstance(spec, str):
        spec = builtin_spec(spec, **overrides)
    elif overrides:
        spec = replace(spec, **overrides)
    source, rows = _read_source(spec)
    if spec.limit is not None:
        rows = rows[: spec.limit]
    records: list[dict] = []
    skipped: list[BadRow] = []
    seen_ids: dict[str, int] = {}
    for row_no, row in rows:
        converted = _convert_row(spec, row, row_no)
        if isinstance(converted, dict) and converted["id"] in seen_ids:
            converted = (spec.fields.id or "id", f"duplicate id {converted['id']!r} (first at row {seen_ids[converted['id']]})")
        if isinstance(converted, tuple):
            bad = BadRow(source, row_no, *converted)
            if spec.on_bad_row == "error":
                raise BadRowError(bad.source, bad.row, bad.field, bad.reason)
            skipped.append(bad)
            continue
        seen_ids[converted["id"]] = row_no
        records.append(converted)
    return _finish(spec.name, source, records, skipped)


def reasoning_gym_problems(task: str, size: int, seed: int, config: Mapping[str, Any] | None = None) -> ProblemSet:
    """A reasoning-gym task as a problem set (item seeds ``seed .. seed + size - 1``, no role: sets of nearby
    seeds share items; :func:`hicra_rl.data.heldout.heldout_task_problems` draws held-out sets);
    ``gold_entry`` keeps each item's metadata for its scorer."""
    from hicra_rl.rewards.tasks import generate_task_items

    items = generate_task_items(task, size, seed, config)
    name = items[0].task
    records = [task_record(item, f"{name}-s{seed}-{item.index}") for item in items]
    return _finish(name, f"{name}(size={size}, seed={seed}, config={dict(config or {})})", records, [])


def task_record(item, row_id: str) -> dict[str, Any]:
    """A reasoning-gym :class:`~hicra_rl.rewards.tasks.TaskItem` as a row of the common schema."""
    try:
        entry = json.dumps({"answer": item.answer, "metadata": item.metadata})
    except TypeError as exc:
        raise ValueError(f"{item.task} item {item.index}: metadata is not JSON-serialisable: {exc}") from exc
    return {"id": row_id, "problem": item.question, "answer": item.answer, "task": item.task,
            "subject": None, "level": None, "gold_entry": entry}
