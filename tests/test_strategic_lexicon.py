"""Lexicon files: validation errors name the file, entry and field; atomic save; the shipped lexicon."""

from __future__ import annotations

import json
import os

import pytest

from hicra_rl.strategic.lexicon import (
    Lexicon,
    LexiconEntry,
    LexiconError,
    default_lexicon_path,
    load_default_lexicon,
    load_lexicon,
)
from hicra_rl.strategic.mine import PAPER_EXAMPLE_SGS


def write(tmp_path, data, name="lex.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def entry(ngram, cluster=0, **extra):
    return {"ngram": ngram, "cluster": cluster, **extra}


def test_roundtrip_normalises_ngrams_and_keeps_fields(tmp_path):
    path = write(
        tmp_path,
        {
            "metadata": {"note": "hand-made"},
            "entries": [
                entry("Let’s  try, a different approach", 3, cluster_df=7, df=5, source="paper-example"),
                entry("IN TOTAL", 1),
            ],
        },
    )
    lexicon = load_lexicon(path)
    assert lexicon.ngrams == ["let's try a different approach", "in total"]
    assert lexicon.entries[0] == LexiconEntry("let's try a different approach", 3, 7, 5, "paper-example")
    assert lexicon.entries[1] == LexiconEntry("in total", 1, None, None, "mined")
    assert lexicon.cluster_of == {"let's try a different approach": 3, "in total": 1}
    saved = lexicon.save(tmp_path / "sub" / "copy.json")
    again = load_lexicon(saved)
    assert again == Lexicon(lexicon.entries, {"note": "hand-made"})
    assert again.metadata == {"note": "hand-made"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"entries": [', r"lex\.json: invalid JSON at line 1, column 14"),
        ("[1, 2]", r"lex\.json: top level must be a JSON object, got list"),
        ({"metadata": {}}, r"lex\.json: missing field 'entries'"),
        ({"entries": []}, r"lex\.json: lexicon is empty"),
        ({"entries": {"ngram": "a b c"}}, r"field 'entries' must be a list, got dict"),
        ({"entries": ["in total"]}, r"entry 0: must be an object with fields 'ngram' and 'cluster'"),
        ({"entries": [{"ngram": "in total"}]}, r"entry 0: missing field 'cluster'"),
        ({"entries": [entry("in total"), entry(5)]}, r"entry 1: field 'ngram' must be a string, got int"),
        ({"entries": [entry("a b c", "3")]}, r"entry 0: field 'cluster' must be an integer, got '3'"),
        ({"entries": [entry("a b c", True)]}, r"entry 0: field 'cluster' must be an integer, got True"),
        ({"entries": [entry("a b c", cluster_df=-1)]}, r"entry 0: field 'cluster_df' must be a non-negative"),
        (
            {"entries": [entry("a b c", df=2.5)]},
            r"entry 0: field 'df' must be a non-negative integer, got 2.5",
        ),
        ({"entries": [entry("a b c", source=1)]}, r"entry 0: field 'source' must be a string"),
        ({"entries": [entry("a b c", weight=1)]}, r"entry 0: unknown field\(s\) \['weight'\]"),
        ({"entries": [entry("?!")]}, r"entry 0: field 'ngram': n-gram '\?!' contains no word"),
        ({"entries": [entry(" ".join("abcdefghi"))]}, r"entry 0: field 'ngram': .* has 9 words; at most 8"),
        ({"entries": [entry("in total. then")]}, r"entry 0: field 'ngram': .* spans a sentence break"),
        (
            {"entries": [entry("in total"), entry("In  Total")]},
            r"entry 1: duplicate n-gram 'in total' \(also entry 0\)",
        ),
        ({"format": "other/2", "entries": [entry("a b")]}, r"field 'format' is 'other/2'"),
        ({"metadata": [], "entries": [entry("a b")]}, r"field 'metadata' must be an object"),
    ],
)
def test_validation_errors_name_file_entry_and_field(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(LexiconError, match=message) as err:
        load_lexicon(path)
    assert str(path) in str(err.value)


def test_eight_words_is_the_limit_and_one_word_is_allowed(tmp_path):
    path = write(tmp_path, {"entries": [entry(" ".join("abcdefgh")), entry("wait", 1)]})
    assert load_lexicon(path).ngrams == ["a b c d e f g h", "wait"]


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(LexiconError, match="lexicon file not found"):
        load_lexicon(tmp_path / "nope.json")
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"entries": [{"ngram": "caf\xe9", "cluster": 0}]}'.encode("latin-1"))
    with pytest.raises(LexiconError, match="latin1.json: not UTF-8"):
        load_lexicon(bad)


def test_constructor_rejects_non_canonical_and_empty():
    with pytest.raises(LexiconError, match="empty"):
        Lexicon(())
    with pytest.raises(LexiconError, match="not canonical"):
        Lexicon((LexiconEntry("In Total", 0),))


def test_save_is_atomic_and_replaces_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "lex.json"
    first = Lexicon.from_ngrams(["in total"])
    first.save(path)
    second = Lexicon.from_ngrams(["how many apples", "in total"])

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        second.save(path)
    assert load_lexicon(path) == first  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["lex.json"]  # no temporary file left
    monkeypatch.undo()
    second.save(path)
    assert load_lexicon(path).ngrams == ["how many apples", "in total"]
    assert [p.name for p in tmp_path.iterdir()] == ["lex.json"]


def test_default_lexicon_is_consistent():
    path = default_lexicon_path()
    assert path.name == "default_lexicon.json" and path.is_file()
    lexicon = load_default_lexicon()
    meta = lexicon.metadata
    mined = [e for e in lexicon.entries if e.source == "mined"]
    assert meta["counts"]["entries"] == len(mined)
    assert meta["config"]["top_frac"] == 0.2 and meta["config"]["n_min"] == 3 and meta["config"]["n_max"] == 5
    # top 20% of clusters by Cluster-DF, renumbered 0.. by decreasing Cluster-DF
    clusters = sorted({e.cluster for e in mined})
    assert clusters == list(range(meta["counts"]["kept_clusters"]))
    assert meta["counts"]["kept_clusters"] == -(-meta["counts"]["clusters"] * 2 // 10)
    cdf = {e.cluster: e.cluster_df for e in mined}
    assert all(e.cluster_df == cdf[e.cluster] for e in mined)
    assert [cdf[c] for c in clusters] == sorted(cdf.values(), reverse=True)
    assert all(e.df <= e.cluster_df and e.df >= meta["config"]["min_df"] for e in mined)
    assert all(3 <= len(e.ngram.split()) <= 5 for e in mined)
    # the paper's examples are present, marked as such, in their own clusters
    curated = {e.ngram: e for e in lexicon.entries if e.source == "paper-example"}
    assert set(curated) == set(PAPER_EXAMPLE_SGS)
    assert min(e.cluster for e in curated.values()) > max(clusters)
