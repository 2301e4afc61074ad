"""Word normalisation shared by the Strategic-Gram miner and the planning-token tagger.

One definition of "word" and "sentence break" is used everywhere, so an n-gram mined from a
solution is found again by the tagger in any response that contains the same words:

* text is lower-cased (length-preserving, see :func:`lower_same_length`);
* a *word* is a run of letters/digits, possibly joined by an apostrophe (``let's``) or, between
  two digits, by ``.``/``,`` (``0.25``, ``3,000``): :data:`WORD_PATTERN`;
* everything else separates words; a separator containing a *sentence break*
  (:data:`BREAK_CHARS`: ``. ! ? ; : =`` and newlines) ends a segment, and n-grams never cross a
  segment (``"... 24 clips. Natalia sold ..."`` yields no n-gram ``clips natalia sold``);
* the canonical form of an n-gram is its words joined by single spaces, with ``’`` written ``'``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

#: Characters that end a segment (sentence); an n-gram never spans one.
BREAK_CHARS = ".!?;:=\n\r\u2026\u3002\uff01\uff1f"

#: Regex source of one word (letters and digits; ``_`` is a separator, like punctuation).
WORD_PATTERN = r"[^\W_]+(?:(?:['\u2019]|(?<=\d)[.,](?=\d))[^\W_]+)*"

_WORD_RE = re.compile(WORD_PATTERN)
_BREAK_RE = re.compile("[" + re.escape(BREAK_CHARS) + "]")

#: Most words an n-gram in a lexicon may have.
MAX_NGRAM_WORDS = 8


def lower_same_length(text: str) -> str:
    """``text.lower()``, except that characters whose lower case has another length (e.g. ``İ``)
    are kept as they are, so character offsets into the result are offsets into ``text``."""
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


def canonical_word(word: str) -> str:
    """The canonical spelling of one (already lower-cased) word."""
    return word.replace("\u2019", "'")


def segment_words(text: str) -> list[list[str]]:
    """The canonical words of ``text``, grouped into segments separated by sentence breaks."""
    segments: list[list[str]] = []
    current: list[str] = []
    prev_end = 0
    lowered = lower_same_length(text)
    for match in _WORD_RE.finditer(lowered):
        if current and _BREAK_RE.search(lowered, prev_end, match.start()):
            segments.append(current)
            current = []
        current.append(canonical_word(match.group()))
        prev_end = match.end()
    if current:
        segments.append(current)
    return segments


def iter_ngrams(text: str, n_min: int, n_max: int) -> Iterator[str]:
    """Every word n-gram (``n_min <= n <= n_max``) of ``text`` in canonical form, in text order,
    repeats included; n-grams do not cross sentence breaks."""
    for words in segment_words(text):
        for start in range(len(words)):
            for n in range(n_min, n_max + 1):
                if start + n > len(words):
                    break
                yield " ".join(words[start : start + n])


def normalise_ngram(ngram: str) -> str:
    """Canonical form of an n-gram given by a user: lower-cased words joined by single spaces.

    Raises ``ValueError`` when the string has no word, more than :data:`MAX_NGRAM_WORDS` words,
    or a sentence break between two words (such an n-gram could never match)."""
    segments = segment_words(ngram)
    if not segments:
        raise ValueError(f"n-gram {ngram!r} contains no word")
    if len(segments) > 1:
        raise ValueError(f"n-gram {ngram!r} spans a sentence break ({BREAK_CHARS!r}) and could never match")
    words = segments[0]
    if len(words) > MAX_NGRAM_WORDS:
        raise ValueError(f"n-gram {ngram!r} has {len(words)} words; at most {MAX_NGRAM_WORDS} allowed")
    return " ".join(words)
