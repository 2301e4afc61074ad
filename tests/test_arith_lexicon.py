"""The shipped arith lexicon is what its documented commands produce (cold-start corpus -> hicra-sg mine)."""
import json

import pytest

from hicra_rl.config import TrainConfig, lexicon_path
from hicra_rl.strategic.lexicon import load_lexicon


def test_auto_lexicon_follows_the_data_group():
    cfg = TrainConfig()
    cfg.data.lexicon = "arith"
    assert lexicon_path(cfg).endswith("arith_lexicon.json")
    cfg.strategic.lexicon = "gsm8k"
    assert lexicon_path(cfg).endswith("default_lexicon.json")
    ngrams = load_lexicon(lexicon_path(TrainConfig())).ngrams  # data.lexicon default: the GSM8K one
    assert "the total number of" in ngrams


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
    assert sg_main(["mine", "--corpus", str(corpus), "--out", str(out), "--no-progress", "--top-frac", "0.75"]) == 0
    shipped = json.load(open(lexicon_path_of("arith")))
    mined = json.load(open(out))
    assert shipped["entries"] == mined["entries"]
    assert shipped["metadata"]["corpus"]["sha256"] == mined["metadata"]["corpus"]["sha256"]
    ngrams = {e["ngram"] for e in mined["entries"]}
    assert {"work from left to right", "add the positive terms first", "so the final answer is"} <= ngrams


def lexicon_path_of(name: str) -> str:
    cfg = TrainConfig()
    cfg.strategic.lexicon = name
    return lexicon_path(cfg)
