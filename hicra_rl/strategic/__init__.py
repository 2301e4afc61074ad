"""Strategic Grams (HICRA, arXiv 2509.03646): mining, lexicon files and the planning-token tagger.

No Ray / vLLM imports here; sentence-transformers is imported only when mining."""

from hicra_rl.strategic.lexicon import (
    Lexicon,
    LexiconEntry,
    LexiconError,
    default_lexicon_path,
    load_default_lexicon,
    load_lexicon,
)
from hicra_rl.strategic.mine import CorpusError, MiningConfig, load_corpus, mine_strategic_grams
from hicra_rl.strategic.tagger import PlanningTagger, StrategicGramMatcher, token_byte_table

__all__ = [
    "CorpusError",
    "Lexicon",
    "LexiconEntry",
    "LexiconError",
    "MiningConfig",
    "PlanningTagger",
    "StrategicGramMatcher",
    "default_lexicon_path",
    "load_corpus",
    "load_default_lexicon",
    "load_lexicon",
    "mine_strategic_grams",
    "token_byte_table",
]
