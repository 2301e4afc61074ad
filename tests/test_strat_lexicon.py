"""The strategy-choice testbed's shipped lexicon (hicra_rl/resources/strat_lexicon.json): both strategy
announcements, where the choice is made, are planning tokens word for word; nothing else is; and the file is
what its documented commands produce (make strategy-testbed: hicra-sft corpus_out=... -> hicra-sg mine)."""
import json

import pytest
from omegaconf import OmegaConf

from hicra_rl.config import TrainConfig, lexicon_path
from hicra_rl.sft import STRATEGY_ANNOUNCEMENTS, arithmetic_worked_solution
from hicra_rl.strategic.lexicon import load_lexicon
from hicra_rl.strategic.tagger import StrategicGramMatcher


def lexicon_path_of_strat() -> str:
    cfg = TrainConfig()
    cfg.strategic.lexicon = "strat"
    return lexicon_path(cfg)


def strat_lexicon():
    return load_lexicon(lexicon_path_of_strat())


def covered(matcher: StrategicGramMatcher, text: str) -> str:
    inside = {i for start, end in matcher.spans(text) for i in range(start, end)}
    return "".join(c if i in inside else "_" for i, c in enumerate(text))


@pytest.mark.parametrize("strategy", ["left_to_right", "direct"])
def test_both_announcements_and_nothing_else_are_planning(strategy):
    matcher = StrategicGramMatcher(strat_lexicon().ngrams)
    text = arithmetic_worked_solution("12 + 30 - 7 + 5", strategy)
    announcement = STRATEGY_ANNOUNCEMENTS[strategy]
    # the sentence up to its full stop is covered; every step line and the answer template are not
    expected = announcement[:-1] + "_" * (len(text) - len(announcement) + 1)
    assert covered(matcher, text) == expected


def test_lexicon_clusters_split_by_strategy_and_data_config_names_both():
    lexicon = strat_lexicon()
    # Cluster-DF = solutions announcing the strategy: 1001 direct, 999 left to right of the 2000
    # (grep -c "add it all up" / "left to right" on the corpus hicra-sft corpus_out=... writes)
    assert {e.cluster_df for e in lexicon.entries if "all" in e.ngram or "step" in e.ngram} == {1001}
    assert {e.cluster_df for e in lexicon.entries if "left" in e.ngram or "work" in e.ngram} == {999}
    assert lexicon.metadata["config"]["top_frac"] == 1.0 and "why_top_frac" in lexicon.metadata
    data = OmegaConf.load("conf/data/strat_mix.yaml")
    assert data.lexicon == "strat"
    for name, phrase in data.strategies.items():  # each tagging phrase is inside its announcement
        assert phrase in STRATEGY_ANNOUNCEMENTS[name].lower()


@pytest.mark.slow
def test_shipped_strat_lexicon_is_reproducible(tmp_path):
    from hicra_rl.models import load_smollm2_tokenizer
    from hicra_rl.sft import SFTConfig, write_corpus
    from hicra_rl.strategic.cli import main as sg_main

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SFTConfig),
                                              {"data": OmegaConf.load("conf/data/strat_mix.yaml"),
                                               "strategies": ["left_to_right", "direct"]}))
    corpus = tmp_path / "strat_corpus.jsonl"
    assert write_corpus(cfg, load_smollm2_tokenizer(), str(corpus)) == 2000
    out = tmp_path / "lex.json"
    assert sg_main(["mine", "--corpus", str(corpus), "--out", str(out), "--no-progress", "--max-doc-frac", "0.9",
                    "--top-frac", "1.0"]) == 0
    shipped, mined = json.load(open(lexicon_path_of_strat())), json.load(open(out))
    assert shipped["entries"] == mined["entries"]
    assert shipped["metadata"]["corpus"]["sha256"] == mined["metadata"]["corpus"]["sha256"]

