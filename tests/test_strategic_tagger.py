"""Planning-token tagger: hand-computed masks, the real SmolLM2 tokenizer, and property tests
against a naive word-level reference that uses the miner's n-gram extraction."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hicra_rl.strategic.lexicon import Lexicon
from hicra_rl.strategic.tagger import PlanningTagger, StrategicGramMatcher, token_byte_table
from hicra_rl.strategic.text import BREAK_CHARS, WORD_PATTERN, iter_ngrams, lower_same_length

# ---------------------------------------------------------------- toy vocabulary, hand-computed


TOY_VOCAB = [
    b"The",  # 0
    b" total",  # 1
    b" number",  # 2
    b" of",  # 3
    b" apples",  # 4
    b" them",  # 5
    b" the",  # 6
    b"In",  # 7
    b" TOTAL.",  # 8  merged: SG end + sentence break
    b"caf",  # 9
    b"\xc3",  # 10 first byte of "é" (U+00E9)
    b"\xa9",  # 11 second byte of "é"
    b" au",  # 12
    b" lait",  # 13
    b"",  # 14 a special token (decodes to nothing)
    b"l t",  # 15 spans a word boundary
    b"a",  # 16
    b"\xa9 au",  # 17 second byte of "é" merged with the next word
]


def toy_tagger(ngrams):
    return PlanningTagger(ngrams, token_bytes=TOY_VOCAB)


def test_whole_sg_tokens_are_planning_and_others_not():
    tagger = toy_tagger(["the total number of"])
    # "The total number of apples"
    assert tagger.tag([0, 1, 2, 3, 4]).tolist() == [True, True, True, True, False]


def test_no_match_across_word_boundary_them_is_not_the():
    tagger = toy_tagger(["the total"])
    # " them total" ("them" is not "the"), then " the total"
    assert tagger.tag([5, 1, 6, 1]).tolist() == [False, False, True, True]


def test_case_insensitive_and_merged_token_at_sg_end_is_planning():
    tagger = toy_tagger(["in total"])
    # "In TOTAL." : the last token carries the SG end and the period
    assert tagger.tag([7, 8]).tolist() == [True, True]
    assert tagger.decode([7, 8]) == "In TOTAL."


def test_token_spanning_word_boundary_into_sg_is_planning():
    tagger = toy_tagger(["l t"])  # one-letter words: "totall t total" -> "l t" is not at word start
    assert tagger.tag([1, 15, 1]).tolist() == [False, False, False]
    # "a" + "l t" + " total" = "al t total"; "t total" matches, so "l t" (partly inside) is planning
    tagger = toy_tagger(["t total"])
    assert tagger.tag([16, 15, 1]).tolist() == [False, True, True]


def test_multibyte_character_split_over_tokens():
    tagger = toy_tagger(["café au lait"])
    # "caf" + 0xC3 + 0xA9 + " au" + " lait" = "café au lait"
    assert tagger.decode([9, 10, 11, 12, 13]) == "café au lait"
    assert tagger.tag([9, 10, 11, 12, 13]).all()
    # the second byte merged with " au": still exact
    assert tagger.tag([9, 10, 17, 13, 4]).tolist() == [True, True, True, True, False]
    # "cafe" is not "café"
    assert toy_tagger(["caf au lait"]).tag([9, 10, 11, 12, 13]).tolist() == [False] * 5


def test_special_token_is_never_planning_and_invalid_utf8_does_not_break_offsets():
    tagger = toy_tagger(["café au lait", "the total number"])
    # a lone 0xC3 (truncated "é") before an SG: offsets after it stay exact
    assert tagger.tag([10, 0, 1, 2, 14]).tolist() == [False, True, True, True, False]


def test_batch_equals_single_and_empty_responses():
    tagger = toy_tagger(["the total number of", "in total"])
    batch = [[0, 1, 2, 3, 4], [], [7, 8], [5, 1], [14]]
    masks = tagger.tag_batch(batch)
    assert [m.tolist() for m in masks] == [
        [True, True, True, True, False],
        [],
        [True, True],
        [False, False],
        [False],
    ]
    # two responses never join into one SG: "... of" | "apples" would not matter, but "In" | " TOTAL."
    assert [m.tolist() for m in tagger.tag_batch([[7], [8]])] == [[False], [False]]


def test_token_id_out_of_range_is_a_clear_error():
    tagger = toy_tagger(["in total"])
    with pytest.raises(
        ValueError, match=r"response 1, position 2: token id 99 outside the vocabulary \[0, 18\)"
    ):
        tagger.tag_batch([[0], [1, 2, 99]])


def test_find_occurrences_hand_computed():
    matcher = StrategicGramMatcher(
        ["the total number", "the total number of", "total number of apples", "in total"]
    )
    text = "The total number of apples is them. In total, them the"
    assert matcher.occurrences(text) == [
        (0, 16, "the total number"),
        (0, 19, "the total number of"),
        (4, 26, "total number of apples"),
        (36, 44, "in total"),
    ]


def test_occurrences_respect_sentence_breaks_apostrophes_and_numbers():
    matcher = StrategicGramMatcher(["let's try a different approach", "how many", "costs 3", "total cost"])
    assert matcher.occurrences("LET’S  try, a  different approach!") == [
        (0, 33, "let's try a different approach")
    ]
    assert matcher.occurrences("how. many") == []  # a sentence break in between
    assert matcher.occurrences("how\nmany") == []
    assert matcher.occurrences("it costs 3.5 now") == []  # "3.5" is one word
    assert matcher.occurrences("it costs 3, then") == [(3, 10, "costs 3")]
    assert StrategicGramMatcher(["3.5 apples"]).occurrences("3.3.5 apples, 3.5 apples") == [
        (14, 24, "3.5 apples")
    ]
    assert matcher.occurrences("it costs 3,000") == []
    assert matcher.occurrences("the total_cost") == [(4, 14, "total cost")]  # "_" separates words
    assert matcher.occurrences("subtotal cost") == []


def test_tag_text_offsets_hand_computed():
    tagger = toy_tagger(["in total"])
    text = "Yes in total."
    #         Yes | " i" | "n tot" | "al." | ""
    offsets = [(0, 3), (3, 5), (5, 10), (10, 13), (13, 13)]
    assert tagger.tag_text_offsets(text, offsets).tolist() == [False, True, True, True, False]
    with pytest.raises(
        ValueError, match=r"token 1: offsets \(3, 14\) are not a range of a text of length 13"
    ):
        tagger.tag_text_offsets(text, [(0, 3), (3, 14)])


def test_tagger_accepts_a_lexicon_path(tmp_path):
    path = Lexicon.from_ngrams(["the total number of"]).save(tmp_path / "lex.json")
    tagger = PlanningTagger(path, token_bytes=TOY_VOCAB)
    assert tagger.tag([0, 1, 2, 3, 4]).tolist() == [True, True, True, True, False]
    assert PlanningTagger(str(path), token_bytes=TOY_VOCAB).matcher.ngrams == {"the total number of"}


# ---------------------------------------------------------------- real SmolLM2 tokenizer


def test_token_byte_table_decodes_like_the_tokenizer(smollm2_tokenizer):
    table = token_byte_table(smollm2_tokenizer)
    assert len(table) == len(smollm2_tokenizer)
    texts = [
        "Natalia sold 48/2 = 24 clips in May.\nSo in total she sold 72.",
        "Let’s try a différent approach — 日本語 😀 naïve CAFÉ\t x_y 3,000.5",
    ]
    for text in texts:
        ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids).decode() == smollm2_tokenizer.decode(ids) == text
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert table[im_end] == b""


def test_real_tokenizer_leading_space_token_overlapping_sg_start_is_planning(smollm2_tokenizer):
    tagger = PlanningTagger(["let's try a different approach"], smollm2_tokenizer)
    ids = smollm2_tokenizer("So let's try a different approach. Then 5.", add_special_tokens=False)[
        "input_ids"
    ]
    tokens = smollm2_tokenizer.convert_ids_to_tokens(ids)
    assert tokens == [
        "So",
        "Ġlet",
        "'s",
        "Ġtry",
        "Ġa",
        "Ġdifferent",
        "Ġapproach",
        ".",
        "ĠThen",
        "Ġ",
        "5",
        ".",
    ]
    # "Ġlet" = " let" starts one character before the SG: partial overlap -> planning
    assert tagger.tag(ids).tolist() == [False] + [True] * 6 + [False] * 5


def test_real_tokenizer_multibyte_sg(smollm2_tokenizer):
    tagger = PlanningTagger(["très 日本語 milk"], smollm2_tokenizer)
    ids = smollm2_tokenizer("Un très 日本語 milk 😀", add_special_tokens=False)["input_ids"]
    tokens = smollm2_tokenizer.convert_ids_to_tokens(ids)
    # byte-level pieces: "è" is 2 bytes in one token; 日 = " " + 3 bytes over 3 tokens; 語 = 3 tokens
    assert tokens == ["Un", "Ġtr", "Ã¨s", "Ġæ", "Ĺ", "¥", "æľ¬", "è", "ª", "ŀ", "Ġmilk", "ĠðŁĺ", "Ģ"]
    assert tagger.tag(ids).tolist() == [False] + [True] * 10 + [False, False]
    # a response cut inside 語 (invalid UTF-8 at the end): "très 日本" + 2 bytes is no SG
    assert not tagger.tag(ids[:9]).any()
    assert PlanningTagger(["un très"], smollm2_tokenizer).tag(ids[:9]).tolist() == [True] * 3 + [False] * 6


# ---------------------------------------------------------------- property tests

PROPERTY_LEXICON = [
    "the total number of",
    "the total",
    "total number",
    "in total",
    "let's try a different approach",
    "a different",
    "café au lait",
    "costs 3",
    "3.5 apples",
    "them",
    "日本語",
]
WORDS = [
    "the", "The", "THE", "total", "Total", "number", "of", "in", "In", "let's", "Let’s", "try", "a", "A",
    "different", "approach", "café", "CAFÉ", "au", "lait", "costs", "3", "3.5", "3,000", "apples",
    "them", "totals", "thé", "cafés", "x", "日本語", "日本", "İ", "naïve",
]  # fmt: skip
SEPARATORS = [
    " ",
    " ",
    " ",
    "  ",
    ", ",
    ". ",
    ".",
    ",",
    "\n",
    "-",
    "'",
    "’",
    "_",
    " (",
    ") ",
    "$",
    " = ",
    "😀",
    "\t",
    "",
]

texts = st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), max_size=40).map(
    lambda pairs: "".join(w + s for w, s in pairs)
)


def reference_covered_chars(text: str, ngrams: set[str]) -> np.ndarray:
    """Naive reference: every run of 1..8 consecutive words of one segment that is an SG."""
    lowered = lower_same_length(text)
    words = [(m.start(), m.end(), m.group().replace("’", "'")) for m in re.finditer(WORD_PATTERN, lowered)]
    covered = np.zeros(len(text), dtype=bool)
    for i in range(len(words)):
        for j in range(i, min(i + 8, len(words))):
            if j > i and any(c in BREAK_CHARS for c in lowered[words[j - 1][1] : words[j][0]]):
                break
            if " ".join(w for _, _, w in words[i : j + 1]) in ngrams:
                covered[words[i][0] : words[j][1]] = True
    return covered


@pytest.fixture(scope="module")
def property_tagger(smollm2_tokenizer):
    return PlanningTagger(Lexicon.from_ngrams(PROPERTY_LEXICON), smollm2_tokenizer)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_property_token_ids_equal_text_offsets_and_naive_reference(text, smollm2_tokenizer, property_tagger):
    enc = smollm2_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert property_tagger.decode(ids) == text
    by_ids = property_tagger.tag(ids)
    by_offsets = property_tagger.tag_text_offsets(text, offsets)
    np.testing.assert_array_equal(by_ids, by_offsets)
    covered = reference_covered_chars(text, set(property_tagger.matcher.ngrams))
    expected = [bool(covered[s:e].any()) for s, e in offsets]
    assert by_ids.tolist() == expected


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_property_occurrences_are_the_miners_ngrams(text):
    """find_occurrences reports exactly the lexicon n-grams the miner would extract from the text."""
    matcher = StrategicGramMatcher(PROPERTY_LEXICON)
    found = matcher.occurrences(text)
    assert {g for _, _, g in found} == set(iter_ngrams(text, 1, 8)) & matcher.ngrams
    for start, end, ngram in found:
        assert (
            " ".join(re.findall(WORD_PATTERN, lower_same_length(text[start:end]))).replace("’", "'") == ngram
        )


number_texts = st.lists(
    st.tuples(
        st.sampled_from(["3", "3.5", "5", "costs", "apples", "a", "x"]),
        st.sampled_from([".", ",", " ", "", "'"]),
    ),
    max_size=12,
).map(lambda pairs: "".join(w + s for w, s in pairs))


@settings(max_examples=300, deadline=None)
@given(text=number_texts)
def test_property_number_boundaries_follow_the_miners_words(text):
    """Decimal points and thousands separators join digits into one word for matcher and miner alike."""
    matcher = StrategicGramMatcher(["costs 3", "3.5 apples", "5 apples", "3 costs", "a'x", "3 5"])
    covered = reference_covered_chars(text, set(matcher.ngrams))
    spans = np.zeros(len(text), dtype=bool)
    for start, end, _ in matcher.occurrences(text):
        spans[start:end] = True
    np.testing.assert_array_equal(spans, covered)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(texts, max_size=6))
def test_property_batch_equals_single(batch, smollm2_tokenizer, property_tagger):
    ids = [smollm2_tokenizer(t, add_special_tokens=False)["input_ids"] for t in batch]
    masks = property_tagger.tag_batch(ids)
    assert len(masks) == len(ids)
    for one, mask in zip(ids, masks):
        np.testing.assert_array_equal(property_tagger.tag(one), mask)
