"""Planning-token tagger: which response tokens belong to a Strategic-Gram occurrence.

HICRA (arXiv 2509.03646) treats a token as a *planning token* when it lies inside an SG
occurrence and amplifies its advantage (A' = A + alpha*|A|). Here a token is planning when any of
its bytes overlaps an SG occurrence in the decoded response, so a token that spans an SG boundary
(" total." in "... in total.") or carries half of a multi-byte character of an SG word counts.

Matching follows the miner's normalisation (:mod:`hicra_rl.strategic.text`): case-insensitive,
whole words only ("them" never matches "the"), any run of non-word characters without a sentence
break between two words.

Speed: every token's bytes are precomputed once; a batch of responses is joined into one byte
string (separated by a newline, which is a sentence break), decoded once, scanned once with a
trie-shaped regex, and the character spans are mapped back to tokens with ``np.searchsorted``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hicra_rl.strategic.lexicon import Lexicon, load_lexicon
from hicra_rl.strategic.text import BREAK_CHARS, WORD_PATTERN, lower_same_length, normalise_ngram

_RESPONSE_SEPARATOR = b"\n"  # a sentence break: no SG occurrence can cross two responses
_NOT_WORD_BEFORE = r"(?<![^\W_].)(?<![^\W_]['\u2019].)"  # placed after the first character
_NOT_NUMBER_BEFORE = r"(?<!\d[.,].)"
_SEPARATOR = r"(?:[^\w" + re.escape(BREAK_CHARS) + r"]|_)+"
_WORD_RE = re.compile(WORD_PATTERN)


@dataclass
class _TrieNode:
    terminal: bool = False
    children: dict[str, _TrieNode] = field(default_factory=dict)


def _word_literal(word: str) -> str:
    return "".join("['\u2019]" if c == "'" else re.escape(c) for c in word)


def _word_end(word: str) -> str:
    """Assert that a word ends here (so "the" does not match inside "them", "3" inside "3.5")."""
    end = r"(?![^\W_])(?!['\u2019][^\W_])"
    return end + r"(?![.,]\d)" if word[-1].isdigit() else end


def _subtree(node: _TrieNode) -> str:
    if not node.children:
        return ""
    alternatives = "|".join(
        _word_literal(w) + _word_end(w) + _subtree(child) for w, child in sorted(node.children.items())
    )
    tail = f"{_SEPARATOR}(?:{alternatives})"
    return f"(?:{tail})?" if node.terminal else tail


def compile_ngram_regex(ngrams: Iterable[str]) -> re.Pattern[str]:
    """One regex matching, at a word start of lower-cased text, the longest n-gram starting there.

    The n-grams (canonical, see :func:`normalise_ngram`) are arranged as a word trie so that the
    alternation is factorised; the word-start check comes after the first literal character so
    that ``re`` can skip positions whose character starts no n-gram."""
    root = _TrieNode()
    for ngram in ngrams:
        node = root
        for word in ngram.split(" "):
            node = node.children.setdefault(word, _TrieNode())
        node.terminal = True
    by_first_char: dict[str, list[str]] = {}
    for word, child in sorted(root.children.items()):
        by_first_char.setdefault(word[0], []).append(
            _word_literal(word[1:]) + _word_end(word) + _subtree(child)
        )
    branches = []
    for char, rests in sorted(by_first_char.items()):
        start = _word_literal(char) + _NOT_WORD_BEFORE + (_NOT_NUMBER_BEFORE if char.isdigit() else "")
        branches.append(start + "(?:" + "|".join(rests) + ")")
    return re.compile("|".join(branches))


class StrategicGramMatcher:
    """Finds Strategic-Gram occurrences in text (case-insensitive, whole words)."""

    def __init__(self, ngrams: Iterable[str]):
        self.ngrams = frozenset(normalise_ngram(g) for g in ngrams)
        if not self.ngrams:
            raise ValueError("StrategicGramMatcher needs at least one n-gram")
        self._search = compile_ngram_regex(self.ngrams).search

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the longest SG occurrence at every word where one starts.

        Their union is exactly the set of characters covered by SG occurrences; spans starting at
        different words may overlap."""
        lowered = lower_same_length(text)
        search = self._search
        out = []
        match = search(lowered)
        while match is not None:
            start, end = match.span()
            out.append((start, end))
            match = search(lowered, start + 1)
        return out

    def occurrences(self, text: str) -> list[tuple[int, int, str]]:
        """Every SG occurrence as ``(char_start, char_end, ngram)``, sorted by position; nested ones
        that start at the same word (e.g. "the total number" in "the total number of") included."""
        out = []
        for start, end in self.spans(text):
            words = list(_WORD_RE.finditer(lower_same_length(text), start, end))
            for n in range(1, len(words) + 1):
                ngram = " ".join(m.group().replace("\u2019", "'") for m in words[:n])
                if ngram in self.ngrams:
                    out.append((start, words[n - 1].end(), ngram))
        return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def token_byte_table(tokenizer) -> list[bytes]:
    """The bytes each token id contributes to the decoded text (special tokens contribute none),
    so that ``b"".join(table[i] for i in ids).decode()`` equals
    ``tokenizer.decode(ids, skip_special_tokens=True)``.

    Supports Hugging Face fast tokenizers with a byte-level BPE decoder (GPT-2, SmolLM, Llama 3,
    Qwen) or a SentencePiece-style ``Metaspace``/``Replace("▁")`` + ``ByteFallback`` decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"{type(tokenizer).__name__} is not a Hugging Face fast tokenizer (no backend_tokenizer)"
        )
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    decoder_types = {d.get("type") for d in decoder.get("decoders", [])} | {decoder.get("type")}
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    table: list[bytes]
    if "ByteLevel" in decoder_types:
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        table = [bytes(byte_of[c] for c in tok) if tok is not None else b"" for tok in tokens]
    elif "Metaspace" in decoder_types or ("Replace" in decoder_types and "ByteFallback" in decoder_types):
        byte_fallback = re.compile(r"<0x([0-9A-Fa-f]{2})>")
        table = []
        for tok in tokens:
            hexbyte = byte_fallback.fullmatch(tok or "")
            table.append(
                bytes([int(hexbyte.group(1), 16)]) if hexbyte else (tok or "").replace("\u2581", " ").encode()
            )
    else:
        raise NotImplementedError(
            f"token_byte_table: unsupported decoder {sorted(t for t in decoder_types if t)}; "
            "use PlanningTagger(..., token_bytes=...) or tag_text_offsets"
        )
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id < size:
            table[token_id] = b"" if added.special else added.content.encode()
    return table


def _char_to_byte_offsets(text: str) -> np.ndarray:
    """``out[k]`` = UTF-8 byte offset of character ``k`` of ``text`` (length ``len(text) + 1``);
    lone surrogates from ``surrogateescape`` decoding count as the single byte they stand for."""
    code = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    nbytes = 1 + (code >= 0x80).astype(np.int64) + (code >= 0x800) + (code >= 0x10000)
    nbytes[(code >= 0xD800) & (code <= 0xDFFF)] = 1
    out = np.zeros(len(code) + 1, dtype=np.int64)
    np.cumsum(nbytes, out=out[1:])
    return out


class PlanningTagger:
    """Marks planning tokens: tokens overlapping a Strategic-Gram occurrence (HICRA's planning mask)."""

    def __init__(
        self, lexicon: Lexicon | Iterable[str], tokenizer=None, *, token_bytes: Sequence[bytes] | None = None
    ):
        if (tokenizer is None) == (token_bytes is None):
            raise ValueError("PlanningTagger needs exactly one of tokenizer or token_bytes")
        if isinstance(lexicon, str | os.PathLike):
            lexicon = load_lexicon(lexicon)
        ngrams = lexicon.ngrams if isinstance(lexicon, Lexicon) else list(lexicon)
        self.matcher = StrategicGramMatcher(ngrams)
        table = list(token_bytes) if token_bytes is not None else token_byte_table(tokenizer)
        self._token_bytes = table
        self._token_len = np.fromiter(map(len, table), dtype=np.int64, count=len(table))

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    def find_occurrences(self, text: str) -> list[tuple[int, int, str]]:
        """SG occurrences in ``text`` as ``(char_start, char_end, ngram)`` (see
        :meth:`StrategicGramMatcher.occurrences`)."""
        return self.matcher.occurrences(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text the tagger matches on (``tokenizer.decode(ids, skip_special_tokens=True)``,
        with invalid UTF-8 kept as lone surrogates so offsets stay exact)."""
        return b"".join([self._token_bytes[i] for i in self._checked([token_ids])[0].tolist()]).decode(
            "utf-8", "surrogateescape"
        )

    def tag(self, token_ids: Sequence[int]) -> np.ndarray:
        """Boolean planning mask, one entry per token id."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return np.zeros(0, dtype=bool)
        if ids.min() < 0 or ids.max() >= len(self._token_bytes):
            self._checked([token_ids])  # raises with the position
        data = b"".join(map(self._token_bytes.__getitem__, ids.tolist()))
        lens = self._token_len[ids]
        ends = np.cumsum(lens)
        mask = self._mask_from_spans(data, ends - lens, ends)
        mask &= lens > 0
        return mask

    def tag_batch(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Planning masks for a batch of responses (one pass over all of them)."""
        flat, sizes = self._checked(batch)
        if flat.size == 0:
            return [np.zeros(int(n), dtype=bool) for n in sizes]
        pieces = list(map(self._token_bytes.__getitem__, flat.tolist()))
        bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        data = _RESPONSE_SEPARATOR.join([b"".join(pieces[a:b]) for a, b in itertools.pairwise(bounds)])
        lens = self._token_len[flat]
        ends = np.cumsum(lens) + np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        mask = self._mask_from_spans(data, ends - lens, ends)
        mask &= lens > 0
        return np.split(mask, np.cumsum(sizes)[:-1])

    def tag_responses(
        self, batch: Sequence[Sequence[int]]
    ) -> tuple[list[np.ndarray], list[str], list[list[tuple[int, int, str]]]]:
        """Planning masks, the decoded texts and the SG occurrences in them, all from the same token ids
        (so the mask the loss uses and the occurrences the metrics count cannot disagree, e.g. when a
        sampler's text differs from its tokens around stop strings)."""
        masks = self.tag_batch(batch)
        texts = [self.decode(ids) for ids in batch]
        return masks, texts, [self.matcher.occurrences(t) for t in texts]

    def tag_text_offsets(self, text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
        """Planning mask for tokens given by character ``(start, end)`` offsets into ``text`` (e.g.
        a tokenizer's ``offset_mapping``): a token is planning when one of its characters lies
        inside an SG occurrence."""
        bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        bad = (bounds[:, 0] < 0) | (bounds[:, 0] > bounds[:, 1]) | (bounds[:, 1] > len(text))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"token {i}: offsets {tuple(bounds[i].tolist())} are not a range of a text of length {len(text)}"
            )
        covered = np.zeros(len(text) + 1, dtype=np.int64)
        for start, end in self.matcher.spans(text):
            covered[start] += 1
            covered[end] -= 1
        prefix = np.concatenate([[0], np.cumsum(np.cumsum(covered)[:-1] > 0)])
        return prefix[bounds[:, 1]] - prefix[bounds[:, 0]] > 0

    def _checked(self, batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        sizes = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        flat = np.fromiter(itertools.chain.from_iterable(batch), dtype=np.int64, count=int(sizes.sum()))
        if flat.size and (flat.min() < 0 or flat.max() >= len(self._token_bytes)):
            bad = int(np.flatnonzero((flat < 0) | (flat >= len(self._token_bytes)))[0])
            response = int(np.searchsorted(np.cumsum(sizes), bad, side="right"))
            position = bad - int(np.cumsum(sizes)[response] - sizes[response])
            raise ValueError(
                f"response {response}, position {position}: token id {int(flat[bad])} "
                f"outside the vocabulary [0, {len(self._token_bytes)})"
            )
        return flat, sizes

    def _mask_from_spans(self, data: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Tokens (byte ranges ``[starts, ends)`` into ``data``) overlapping an SG occurrence."""
        text = data.decode("utf-8", "surrogateescape")
        spans = self.matcher.spans(text)
        mask = np.zeros(len(starts), dtype=bool)
        if not spans:
            return mask
        span_bounds = np.asarray(spans, dtype=np.int64)
        if len(text) != len(data):  # non-ASCII: character offsets -> byte offsets
            span_bounds = _char_to_byte_offsets(text)[span_bounds]
        first = np.searchsorted(ends, span_bounds[:, 0], side="right")
        last = np.searchsorted(starts, span_bounds[:, 1], side="left")
        delta = np.bincount(first, minlength=len(starts) + 1) - np.bincount(last, minlength=len(starts) + 1)
        return np.cumsum(delta[:-1]) > 0


__all__ = [
    "PlanningTagger",
    "StrategicGramMatcher",
    "compile_ngram_regex",
    "token_byte_table",
]
