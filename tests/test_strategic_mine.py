"""Strategic-Gram miner: n-gram extraction, Cluster-DF (hand-computed, real MiniLM), determinism,
corpus errors, the hicra-sg CLI, and (slow) the full GSM8K run that reproduces the shipped lexicon."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hicra_rl.strategic.cli import main as hicra_sg
from hicra_rl.strategic.lexicon import LexiconEntry, load_default_lexicon, load_lexicon
from hicra_rl.strategic.mine import (
    CorpusError,
    MiningConfig,
    clean_solution,
    cluster_document_frequency,
    embed_ngrams,
    is_arithmetic_ngram,
    load_corpus,
    mine_strategic_grams,
    select_candidates,
    solution_ngrams,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GSM8K_TRAIN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
needs_gsm8k = pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="../shared/data/gsm8k not present")

# A tiny corpus whose 5-grams are known by hand:
#   A "let's try a different approach"  in solutions {0, 1, 5}       (DF 3)
#   B "let us try another approach"     in solutions {2, 3, 5}       (DF 3)
#   C "the train leaves the station"    in solutions {3, 4}          (DF 2)
#   D "first find the total cost"       in solutions {6, 7}          (DF 2)
#   E "first compute the total price"   in solutions {6, 8, 9}       (DF 3)
# A~B and D~E are paraphrases, C is unrelated, so the clusters are {A, B}, {D, E}, {C} and
# Cluster-DF = |{0,1,2,3,5}| = 5, |{6,7,8,9}| = 4, |{3,4}| = 2 (solution 5 / 6 count once).
TINY_CORPUS = [
    "Let's try a different approach.",
    "Hmm. Let's try a different approach!",
    "Let us try another approach.",
    "Let us try another approach. The train leaves the station.",
    "The train leaves the station.",
    "Let's try a different approach; let us try another approach.",
    "First find the total cost. First compute the total price.",
    "First find the total cost.",
    "First compute the total price.",
    "first compute the total price",
]
A, B, C = "let's try a different approach", "let us try another approach", "the train leaves the station"
D, E = "first find the total cost", "first compute the total price"
TINY_CONFIG = MiningConfig(n_min=5, n_max=5, min_df=2, show_progress=False)


def test_clean_solution_and_ngrams_of_a_gsm8k_solution():
    answer = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    )
    assert clean_solution(answer) == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
    )
    # segments: [natalia sold 48 2] [24 clips in may] [natalia sold 48 24] [72 clips altogether in april and may]
    assert solution_ngrams(answer, MiningConfig()) == {
        "clips in may",
        "clips altogether in",
        "altogether in april",
        "in april and",
        "april and may",
        "clips altogether in april",
        "altogether in april and",
        "in april and may",
        "clips altogether in april and",
        "altogether in april and may",
    }
    with_numbers = solution_ngrams(answer, MiningConfig(drop_arithmetic=False))
    assert "natalia sold 48 2" in with_numbers and "24 clips in may" in with_numbers
    assert "2 24 clips" not in with_numbers  # "=" is a sentence break


def test_arithmetic_filter():
    assert is_arithmetic_ngram("0.2 x 50")
    assert is_arithmetic_ngram("so x is the")
    assert is_arithmetic_ngram("the 3rd day")
    assert not is_arithmetic_ngram("a total of")
    assert not is_arithmetic_ngram("so i need to")


def test_select_candidates_by_df_with_ties_alphabetical():
    df = Counter({"b b b": 5, "a a a": 5, "c c c": 9, "d d d": 1})
    assert select_candidates(df, min_df=2, max_candidates=None) == ["c c c", "a a a", "b b b"]
    assert select_candidates(df, min_df=2, max_candidates=2) == ["c c c", "a a a"]
    assert select_candidates(df, min_df=6, max_candidates=10) == ["c c c"]


def test_cluster_document_frequency_counts_distinct_solutions():
    postings = [[0, 1, 5], [2, 3, 5], [3, 4], [6, 7], [6, 8, 9]]
    labels = [7, 7, 1, 4, 4]
    assert cluster_document_frequency(postings, labels) == {7: 5, 1: 2, 4: 4}


def test_tiny_corpus_embeddings_are_as_the_hand_computation_assumes():
    emb = embed_ngrams([A, B, C, D, E], TINY_CONFIG)
    distance = 1 - emb @ emb.T
    threshold = TINY_CONFIG.distance_threshold
    assert distance[0, 1] < threshold and distance[3, 4] < threshold
    for i, j in [(0, 2), (1, 2), (0, 3), (0, 4), (1, 3), (1, 4), (2, 3), (2, 4)]:
        assert distance[i, j] > 2 * threshold, (i, j, distance[i, j])


@pytest.mark.parametrize(
    ("top_frac", "expected"),
    [
        # ceil(0.2 * 3 clusters) = 1 cluster kept
        (0.2, [LexiconEntry(B, 0, 5, 3), LexiconEntry(A, 0, 5, 3)]),
        # ceil(0.5 * 3) = 2
        (
            0.5,
            [
                LexiconEntry(B, 0, 5, 3),
                LexiconEntry(A, 0, 5, 3),
                LexiconEntry(E, 1, 4, 3),
                LexiconEntry(D, 1, 4, 2),
            ],
        ),
        (
            1.0,
            [
                LexiconEntry(B, 0, 5, 3),
                LexiconEntry(A, 0, 5, 3),
                LexiconEntry(E, 1, 4, 3),
                LexiconEntry(D, 1, 4, 2),
                LexiconEntry(C, 2, 2, 2),
            ],
        ),
    ],
)
def test_cluster_df_and_top_fraction_hand_computed(top_frac, expected):
    config = MiningConfig(n_min=5, n_max=5, min_df=2, top_frac=top_frac, show_progress=False)
    lexicon = mine_strategic_grams(TINY_CORPUS, config)
    assert list(lexicon.entries) == expected
    counts = lexicon.metadata["counts"]
    assert counts == {
        "solutions": 10,
        "distinct_ngrams": 5,  # A..E (see test_tiny_corpus_distinct_ngrams)
        "candidates": 5,
        "clusters": 3,
        "kept_clusters": len({e.cluster for e in expected}),
        "entries": len(expected),
    }


def test_tiny_corpus_distinct_ngrams():
    # every 5-gram of the corpus, counted by hand: the five phrases only (all phrases are exactly 5 words
    # and separated by sentence breaks)
    grams = Counter(g for text in TINY_CORPUS for g in solution_ngrams(text, TINY_CONFIG))
    assert grams == Counter({A: 3, B: 3, C: 2, D: 2, E: 3})


def test_select_candidates_max_df_bound_is_inclusive():
    df = Counter({"a a a": 10, "b b b": 3, "c c c": 2})
    assert select_candidates(df, min_df=2, max_candidates=None, max_df=3) == ["b b b", "c c c"]
    assert select_candidates(df, min_df=2, max_candidates=None, max_df=2.5) == ["c c c"]
    assert select_candidates(df, min_df=2, max_candidates=None) == ["a a a", "b b b", "c c c"]


@pytest.mark.parametrize("max_doc_frac", [0.0, -0.1, 1.5])
def test_max_doc_frac_must_be_a_fraction(max_doc_frac):
    with pytest.raises(ValueError, match="max_doc_frac"):
        MiningConfig(max_doc_frac=max_doc_frac)


# TINY_CORPUS with a fixed conclusion T (one 5-gram) in every solution: DF(T) = 10 of 10
T = "so the answer is clear"
TEMPLATED_CORPUS = [f"{text}\nSo the answer is clear." for text in TINY_CORPUS]


@pytest.mark.parametrize("max_doc_frac", [None, 1.0])
def test_a_gram_in_every_solution_is_kept_by_default(max_doc_frac):
    config = MiningConfig(n_min=5, n_max=5, min_df=2, top_frac=1.0, max_doc_frac=max_doc_frac, show_progress=False)
    lexicon = mine_strategic_grams(TEMPLATED_CORPUS, config)
    # T is its own cluster with Cluster-DF 10, so it ranks first; the rest is the tiny corpus' lexicon
    assert list(lexicon.entries) == [
        LexiconEntry(T, 0, 10, 10),
        LexiconEntry(B, 1, 5, 3),
        LexiconEntry(A, 1, 5, 3),
        LexiconEntry(E, 2, 4, 3),
        LexiconEntry(D, 2, 4, 2),
        LexiconEntry(C, 3, 2, 2),
    ]
    assert "dropped_near_universal" not in lexicon.metadata["counts"]
    assert "departs_from_paper" not in lexicon.metadata


def test_max_doc_frac_drops_a_gram_in_every_solution(tmp_path):
    corpus = tmp_path / "templated.jsonl"
    corpus.write_text("".join(json.dumps({"answer": t}) + "\n" for t in TEMPLATED_CORPUS), encoding="utf-8")
    out = tmp_path / "lex.json"
    argv = ["mine", "--corpus", str(corpus), "--out", str(out), "--ngram-min", "5", "--ngram-max", "5"]
    assert hicra_sg([*argv, "--min-df", "2", "--top-frac", "1.0", "--max-doc-frac", "0.9", "--no-progress"]) == 0
    lexicon = load_lexicon(out)
    # DF(T) = 10 > 0.9 * 10: dropped before clustering; A..E (DF <= 3) are mined as without T
    assert list(lexicon.entries) == [
        LexiconEntry(B, 0, 5, 3),
        LexiconEntry(A, 0, 5, 3),
        LexiconEntry(E, 1, 4, 3),
        LexiconEntry(D, 1, 4, 2),
        LexiconEntry(C, 2, 2, 2),
    ]
    meta = lexicon.metadata
    assert meta["counts"] == {
        "solutions": 10,
        "distinct_ngrams": 6,
        "candidates": 5,
        "clusters": 3,
        "kept_clusters": 3,
        "entries": 5,
        "dropped_near_universal": 1,
    }
    assert meta["config"]["max_doc_frac"] == 0.9
    assert "the paper keeps every n-gram" in meta["departs_from_paper"]
    # a limit no candidate passes is reported, not mined into an empty lexicon
    with pytest.raises(ValueError, match="raise max_doc_frac"):
        mine_strategic_grams(TEMPLATED_CORPUS, MiningConfig(n_min=5, n_max=5, min_df=2, max_doc_frac=0.1))


@needs_gsm8k
def test_mining_is_deterministic_for_a_seed(tmp_path):
    solutions = load_corpus(GSM8K_TRAIN)[:400]
    config = MiningConfig(min_df=3, max_candidates=300, seed=0, show_progress=False)
    first = mine_strategic_grams(solutions, config)
    second = mine_strategic_grams(solutions, config)
    assert first == second
    first.save(tmp_path / "a.json")
    second.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert len(first) >= 10
    assert not any(is_arithmetic_ngram(g) for g in first.ngrams)
    # Cluster-DF recomputed from scratch on the corpus
    per_doc = [solution_ngrams(s, config) for s in solutions]
    members: dict[int, set[str]] = {}
    for e in first.entries:
        members.setdefault(e.cluster, set()).add(e.ngram)
    for e in first.entries:
        assert e.df == sum(e.ngram in grams for grams in per_doc)
        assert e.cluster_df == sum(bool(grams & members[e.cluster]) for grams in per_doc)


def test_load_corpus_jsonl_and_text(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"answer": "one"}\n\n{"answer": "two", "x": 1}\n', encoding="utf-8")
    assert load_corpus(jsonl) == ["one", "two"]
    text = tmp_path / "c.txt"
    text.write_text("first line\nsame solution\n\n \n second solution \n", encoding="utf-8")
    assert load_corpus(text) == ["first line\nsame solution", "second solution"]
    assert load_corpus(jsonl, fmt="text") == ['{"answer": "one"}', '{"answer": "two", "x": 1}']


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"answer": "ok"}', '{"answer": "ok"', "{}"], r"c\.jsonl:2: invalid JSON"),
        (['{"answer": "ok"}', "[1]"], r"c\.jsonl:2: expected a JSON object, got list"),
        (
            ['{"answer": "ok"}', '{"question": "q"}'],
            r"c\.jsonl:2: field 'answer' missing \(fields: \['question'\]\)",
        ),
        (['{"answer": 3}'], r"c\.jsonl:1: field 'answer' must be a string, got int"),
        (["", "  "], r"c\.jsonl: no solutions found"),
    ],
)
def test_corpus_errors_name_file_line_and_field(tmp_path, lines, message):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        load_corpus(path)


def test_cli_mine_writes_a_lexicon_with_metadata(tmp_path, capsys):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"solution": t}) + "\n" for t in TINY_CORPUS), encoding="utf-8")
    out = tmp_path / "out" / "lex.json"
    argv = ["mine", "--corpus", str(corpus), "--out", str(out), "--text-field", "solution"]
    argv += ["--ngram-min", "5", "--ngram-max", "5", "--min-df", "2", "--top-frac", "0.5", "--no-progress"]
    assert hicra_sg([*argv, "--add-paper-sgs"]) == 0
    assert "wrote" in capsys.readouterr().out
    lexicon = load_lexicon(out)
    assert [e.ngram for e in lexicon.entries if e.source == "mined"] == [B, A, E, D]
    paper = {e.ngram: e for e in lexicon.entries if e.source == "paper-example"}
    # "let's try a different approach" was mined already; the two others occur in no solution
    assert set(paper) == {"we can use the fact that", "but the problem mentions that"}
    assert all(e.df == 0 and e.cluster_df == 0 and e.cluster >= 2 for e in paper.values())
    assert lexicon.metadata["corpus"]["path"] == str(corpus)
    assert lexicon.metadata["command"].startswith("hicra-sg mine --corpus")
    assert lexicon.metadata["config"]["top_frac"] == 0.5


def test_cli_reports_bad_corpus_line(tmp_path, capsys):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"answer": "a b c"}\n{"answer": \n', encoding="utf-8")
    assert (
        hicra_sg(["mine", "--corpus", str(corpus), "--out", str(tmp_path / "x.json"), "--no-progress"]) == 2
    )
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cli_find_and_show(tmp_path, capsys):
    assert hicra_sg(["find", "So first find the total number of eggs."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "3\t17\tcluster" in lines[0] and lines[0].endswith("'first find the'")
    assert hicra_sg(["show", "--clusters", "2"]) == 0
    out = capsys.readouterr().out
    assert "default_lexicon.json" in out and out.count("cluster ") == 2


@pytest.mark.slow
@needs_gsm8k
def test_gsm8k_mining_reproduces_the_shipped_lexicon(tmp_path):
    """The documented command rebuilds hicra_rl/resources/default_lexicon.json, well under 5 minutes."""
    out = tmp_path / "lex.json"
    started = time.perf_counter()
    code = hicra_sg(
        ["mine", "--corpus", str(GSM8K_TRAIN), "--out", str(out), "--add-paper-sgs", "--no-progress"]
    )
    elapsed = time.perf_counter() - started
    assert code == 0 and elapsed < 300
    shipped, rebuilt = load_default_lexicon(), load_lexicon(out)
    assert rebuilt.entries == shipped.entries
    assert rebuilt.metadata["counts"] == shipped.metadata["counts"]
    assert rebuilt.metadata["corpus"]["sha256"] == shipped.metadata["corpus"]["sha256"]
    ngrams = set(rebuilt.ngrams)
    assert {"the total number of", "so in total", "find how many"} <= ngrams
    assert not any(is_arithmetic_ngram(g) for g in ngrams)
    assert np.mean([len(g.split()) for g in ngrams]) > 3
