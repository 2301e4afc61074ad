"""The shipped arith lexicon is what its documented commands produce (cold-start corpus -> hicra-sg mine)."""
import json

import pytest

from hicra_rl.config import TrainConfig, lexicon_path
from hicra_rl.strategic.lexicon import load_lexicon
from hicra_rl.strategic.tagger import StrategicGramMatcher

# the cold start's two strategy announcements and its answer template (hicra_rl/sft.py, data=arith)
LEFT_TO_RIGHT = "Let's work from left to right."
POSITIVE_FIRST = "We can add the positive terms first and then subtract the rest."
ANSWER_TEMPLATE = "So the final answer is \\boxed{7}."


def test_auto_lexicon_follows_the_data_group():
    cfg = TrainConfig()
    cfg.data.lexicon = "arith"
    assert lexicon_path(cfg).endswith("arith_lexicon.json")
    cfg.strategic.lexicon = "gsm8k"
    assert lexicon_path(cfg).endswith("default_lexicon.json")
    ngrams = load_lexicon(lexicon_path(TrainConfig())).ngrams  # data.lexicon default: arith, the default data
    assert "work from left to right" in ngrams
    assert "the total number of" in load_lexicon(lexicon_path_of("gsm8k")).ngrams


def covered(matcher: StrategicGramMatcher, text: str) -> str:
    """The characters of ``text`` inside an SG occurrence, others replaced by "_"."""
    inside = {i for start, end in matcher.spans(text) for i in range(start, end)}
    return "".join(c if i in inside else "_" for i, c in enumerate(text))


def test_arith_lexicon_tags_the_strategy_choices_not_the_answer_template():
    lexicon = load_lexicon(lexicon_path_of("arith"))
    matcher = StrategicGramMatcher(lexicon.ngrams)
    # both announcements are planning tokens word for word; the template every solution ends with is not
    assert covered(matcher, LEFT_TO_RIGHT) == LEFT_TO_RIGHT[:-1] + "_"
    assert covered(matcher, POSITIVE_FIRST) == POSITIVE_FIRST[:-1] + "_"
    assert matcher.spans(ANSWER_TEMPLATE) == []
    assert not {"so the final answer is", "final answer is boxed", "the final answer"} & set(lexicon.ngrams)
    # the departure from the paper is recorded: n-grams in > 90% of the 2000 solutions were dropped
    meta = lexicon.metadata
    assert meta["config"]["max_doc_frac"] == 0.9 and "--max-doc-frac 0.9" in meta["command"]
    assert meta["counts"]["dropped_near_universal"] == 9 and "the paper keeps every n-gram" in meta["departs_from_paper"]
    assert max(e.df for e in lexicon.entries) <= 0.9 * meta["counts"]["solutions"]
    # the clusters split by strategy: 1506 "left to right" solutions, 494 "positive terms first" ones
    # (counted with grep -c on the corpus `hicra-sft corpus_out=...` writes)
    assert {e.cluster_df for e in lexicon.entries if "left" in e.ngram} == {1506}
    assert {e.cluster_df for e in lexicon.entries if "positive" in e.ngram} == {494}


def test_gsm8k_lexicon_stays_the_papers_method():
    meta = load_lexicon(lexicon_path_of("gsm8k")).metadata
    assert meta["config"].get("max_doc_frac") is None and "departs_from_paper" not in meta


@pytest.mark.slow
def test_shipped_arith_lexicon_is_reproducible(tmp_path):
    from omegaconf import OmegaConf

    from hicra_rl.models import load_smollm2_tokenizer
    from hicra_rl.sft import SFTConfig, write_corpus
    from hicra_rl.strategic.cli import main as sg_main

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SFTConfig),
                                              {"data": OmegaConf.load("conf/data/arith.yaml")}))
    corpus = tmp_path / "arith_corpus.jsonl"
    assert write_corpus(cfg, load_smollm2_tokenizer(), str(corpus)) == 2000
    out = tmp_path / "lex.json"
    argv = ["mine", "--corpus", str(corpus), "--out", str(out), "--no-progress", "--max-doc-frac", "0.9"]
    assert sg_main([*argv, "--top-frac", "0.75"]) == 0
    shipped = json.load(open(lexicon_path_of("arith")))
    mined = json.load(open(out))
    assert shipped["entries"] == mined["entries"]
    assert shipped["metadata"]["corpus"]["sha256"] == mined["metadata"]["corpus"]["sha256"]
    assert shipped["metadata"]["counts"] == mined["metadata"]["counts"]
    ngrams = {e["ngram"] for e in mined["entries"]}
    assert {"work from left to right", "add the positive terms first", "and then subtract the rest"} <= ngrams
    assert "so the final answer is" not in ngrams


def lexicon_path_of(name: str) -> str:
    cfg = TrainConfig()
    cfg.strategic.lexicon = name
    return lexicon_path(cfg)
