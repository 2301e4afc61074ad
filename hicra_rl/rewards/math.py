"""Final-answer extraction, math-verify equivalence, and DAPO-style reward shaping (pure functions).

Model output is only ever parsed (regexes, brace matching, math-verify's LaTeX parser): never passed
to ``eval``/``exec``.  math-verify's own ``signal.alarm`` timeouts are disabled here (they raise outside
the main thread, and cannot interrupt sympy's C-level big-integer arithmetic anyway); wall-clock bounds
are the job of :mod:`hicra_rl.rewards.pool`, which runs these functions in a killable process.  The public
:func:`verify` uses such a pool by default (``timeout_s=10``): a module-level one, created on first use and
closed at interpreter exit.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
from math_verify import verify as _mv_verify

__all__ = [
    "ANSWER_MODES",
    "RewardShapingConfig",
    "extract_answer",
    "gsm8k_gold",
    "overlong_penalty",
    "shape_reward",
    "verify",
]

ANSWER_MODES = ("boxed", "strict_boxed", "gsm8k", "last_number", "boxed_or_last_number")

log = logging.getLogger(__name__)
# math-verify warns once that its timeout is off; the pool bounds time instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_BOX_COMMANDS = re.compile(r"\\(boxed|fbox)(?![A-Za-z])")
_GSM8K_ANSWER = re.compile(r"####\s*([^\n]*)")
# a number such as -1,234.5 or .5 or 3/4 (a plain fraction is kept whole)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?")
_PLAIN_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+")

_MATH_DELIMITER = re.compile(r"(?<!\\)\$")  # an unescaped $ (``\$32`` is a dollar sign, not math mode)
_MV_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _braced(text: str, open_pos: int) -> tuple[str, int] | None:
    """Content of the ``{...}`` group opening at ``open_pos`` (escaped ``\\{``/``\\}`` don't count)."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (``\{``, ``\}``, ``\\``)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i], i + 1
        i += 1
    return None  # unbalanced: the response was cut off inside the box


def _last_boxed(text: str, strict: bool) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (and, unless strict, ``\\fbox{}`` / ``\\boxed 5``)."""
    found: str | None = None
    for match in _BOX_COMMANDS.finditer(text):
        if strict and match.group(1) != "boxed":
            continue
        pos = match.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            group = _braced(text, pos)
            if group is not None:
                found = group[0]
        elif not strict and match.end() < len(text) and text[match.end()] == " ":
            # ``\boxed 5``: TeX takes the next token
            token = re.match(r"[^\s$\\]+", text[pos:])
            if token:
                found = token.group(0)
    if found is None:
        return None
    found = found.strip()
    return found or None


def _last_number(text: str) -> str | None:
    numbers = _PLAIN_NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(response: str, mode: str = "boxed") -> str | None:
    """The final answer written in ``response``, or None when it has none in the requested form.

    Modes:
      - ``boxed``: last complete ``\\boxed{...}`` with balanced braces, also ``\\fbox{...}`` and ``\\boxed 5``.
      - ``strict_boxed``: last ``\\boxed{...}`` only (the paper's evaluation).
      - ``gsm8k``: the text after the last ``####``.
      - ``last_number``: the last number in the text (commas of thousands removed).
      - ``boxed_or_last_number``: ``boxed``, falling back to ``last_number`` (opt-in, lenient).
    """
    if mode == "boxed":
        return _last_boxed(response, strict=False)
    if mode == "strict_boxed":
        return _last_boxed(response, strict=True)
    if mode == "gsm8k":
        hits = _GSM8K_ANSWER.findall(response)
        answer = hits[-1].strip() if hits else ""
        return answer or None
    if mode == "last_number":
        return _last_number(response)
    if mode == "boxed_or_last_number":
        boxed = _last_boxed(response, strict=False)
        return boxed if boxed is not None else _last_number(response)
    raise ValueError(f"unknown answer mode {mode!r}; expected one of {ANSWER_MODES}")


def gsm8k_gold(solution: str) -> str:
    """GSM8K's gold answer: the text after ``####`` with thousands separators removed ("1,080" -> "1080")."""
    if "####" not in solution:
        raise ValueError(f"GSM8K solution has no '#### <answer>' line: {solution[-80:]!r}")
    answer = solution.rsplit("####", 1)[1].strip()
    if not answer:
        raise ValueError(f"GSM8K solution has an empty '####' answer: {solution[-80:]!r}")
    if _NUMBER.fullmatch(answer):
        answer = answer.replace(",", "")
    return answer


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    """math-verify parse of a gold answer (MATH's ``answer`` field is LaTeX without ``$``); cached
    because each gold is checked against G samples of its group."""
    text = gold if ("\\boxed" in gold or _MATH_DELIMITER.search(gold)) else f"${gold}$"
    return tuple(parse(text, extraction_config=_MV_CONFIG, parsing_timeout=None))


def _parse_answer(answer: str) -> list:
    answer = answer.replace("°", "^{\\circ}")  # a Unicode degree sign, as LaTeX
    return parse(f"\\boxed{{{answer}}}", extraction_config=_MV_CONFIG, parsing_timeout=None)


def answers_equivalent(answer: str, gold: str) -> bool:
    """math-verify equivalence of an extracted answer and a gold answer (both LaTeX-ish strings)."""
    gold_parsed = list(_parse_gold(gold.strip()))
    if not gold_parsed:  # math-verify found nothing to parse: fall back to exact text (spaces ignored)
        return "".join(answer.split()) == "".join(gold.split())
    return bool(_mv_verify(gold_parsed, _parse_answer(answer), timeout_seconds=None))


def verify(response: str, gold: str, mode: str = "boxed", *, timeout_s: float | None = 10.0) -> bool:
    """True when the final answer extracted from ``response`` equals ``gold`` mathematically.

    Equivalence is math-verify's: fractions/decimals, radicals, intervals, tuples, degrees, ``\\text{}``
    units and text answers.

    ``timeout_s`` bounds the equivalence check in wall-clock seconds (default 10): it runs in a worker
    process of a module-level :class:`hicra_rl.rewards.pool.TimeBoundedVerifier` (one worker and a spare,
    started on the first call, which costs a few seconds once; reused afterwards; closed at interpreter
    exit), which is killed when it overruns; the answer then counts as wrong (False) and the spare takes
    over.  A hostile answer such as
    ``\\boxed{9^{9^{9^{9^{9}}}}}`` would otherwise make sympy compute for ever, and neither a signal
    handler nor a thread can interrupt it.  A verifier error or a worker that dies (e.g. at its memory
    limit) also gives False.  Calls from several threads share the one worker and take turns (a call may
    wait for another's check before its own bound starts).  ``timeout_s=None`` checks in this process
    with no bound (fast, no worker process; for trusted answers only).  Answer extraction is linear-time
    and always runs here, so an unknown ``mode`` raises ValueError on either path.
    """
    answer = extract_answer(response, mode)
    if answer is None:
        return False
    if timeout_s is None:
        return answers_equivalent(answer, gold)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
    return _verify_bounded(response, gold, mode, float(timeout_s))


# ---------------------------------------------------------------- the bounded path of verify()

_BOUNDED_LOCK = threading.Lock()
_bounded_pool = None        # the TimeBoundedVerifier of verify(); created lazily under _BOUNDED_LOCK
_atexit_registered = False


def _reset_after_fork() -> None:
    """In a forked child: forget the parent's pool (its pipes and workers are the parent's) and lock."""
    global _BOUNDED_LOCK, _bounded_pool
    _BOUNDED_LOCK = threading.Lock()
    _bounded_pool = None


os.register_at_fork(after_in_child=_reset_after_fork)


def _close_bounded_pool() -> None:
    """Stop the worker process of verify()'s pool, if this process made one (registered with atexit; a
    forked child never holds its parent's pool: ``_reset_after_fork``)."""
    global _bounded_pool
    pool, _bounded_pool = _bounded_pool, None
    if pool is not None:
        pool.close()


def _verify_bounded(response: str, gold: str, mode: str, timeout_s: float) -> bool:
    global _bounded_pool, _atexit_registered
    with _BOUNDED_LOCK:
        if _bounded_pool is None:
            # imported here: hicra_rl.rewards.pool imports this module
            from hicra_rl.rewards.pool import TimeBoundedVerifier

            _bounded_pool = TimeBoundedVerifier(time_limit_s=timeout_s, num_workers=1, answer_mode=mode,
                                                spare_worker=True, import_main=False)
            if not _atexit_registered:
                # registered after multiprocessing's own exit hook, so it runs before it (atexit is LIFO)
                atexit.register(_close_bounded_pool)
                _atexit_registered = True
        pool = _bounded_pool
        # the pool is private to verify() and used under the lock: set this call's bound and mode
        pool.time_limit_s = timeout_s
        pool.answer_mode = mode
        try:
            result = pool.score_batch([(response, gold, "math")])[0]
        except BaseException:
            # e.g. KeyboardInterrupt mid-check: the worker may still owe an answer; start afresh next time
            _close_bounded_pool()
            raise
    if result.timed_out:
        log.warning("verify: answer %.60r not checked within %.3g s: counted as wrong", result.extracted, timeout_s)
    elif result.error is not None:
        log.warning("verify: the check failed (%s): counted as wrong", result.error)
    return result.correct


# ---------------------------------------------------------------- reward shaping (DAPO, off by default)


@dataclass(frozen=True)
class RewardShapingConfig:
    """Outcome reward R(y) and optional DAPO shaping terms.

    ``overlong_penalty``: DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13) with
    L_max = ``max_response_tokens`` and L_cache = ``overlong_buffer_tokens``.
    ``format_bonus`` is added when the response holds an extractable final answer (``\\boxed{}``),
    ``format_penalty`` (>= 0) subtracted when it holds none.
    """

    correct_reward: float = 1.0
    incorrect_reward: float = 0.0
    overlong_penalty: bool = False
    max_response_tokens: int = 0
    overlong_buffer_tokens: int = 0
    overlong_penalty_factor: float = 1.0
    format_bonus: float = 0.0
    format_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.format_penalty < 0:
            raise ValueError(f"format_penalty is subtracted and must be >= 0, got {self.format_penalty}")
        if self.overlong_penalty:
            if self.max_response_tokens <= 0:
                raise ValueError("overlong_penalty needs max_response_tokens > 0")
            if not 0 < self.overlong_buffer_tokens <= self.max_response_tokens:
                raise ValueError(
                    "overlong_penalty needs 0 < overlong_buffer_tokens <= max_response_tokens, got "
                    f"{self.overlong_buffer_tokens} and {self.max_response_tokens}"
                )


def overlong_penalty(n_tokens: int, max_tokens: int, buffer_tokens: int) -> float:
    """DAPO Eq. 13: 0 up to L_max - L_cache, then linear down to -1 at L_max, and -1 beyond."""
    start = max_tokens - buffer_tokens
    if n_tokens <= start:
        return 0.0
    if n_tokens <= max_tokens:
        return (start - n_tokens) / buffer_tokens
    return -1.0


def shape_reward(
    correct: bool | float,
    n_tokens: int,
    finished: bool,
    cfg: RewardShapingConfig,
    has_answer: bool = True,
) -> float:
    """Scalar reward of one response.

    ``correct`` is a bool, or a score in [0, 1] (reasoning-gym's partial credit), interpolated between
    ``incorrect_reward`` and ``correct_reward``.  ``finished`` is False for a response cut at the length
    limit; DAPO's penalty then applies through ``n_tokens`` (a cut response has n_tokens = L_max).
    """
    score = float(correct)
    reward = cfg.incorrect_reward + score * (cfg.correct_reward - cfg.incorrect_reward)
    if cfg.overlong_penalty:
        length = n_tokens if finished else max(n_tokens, cfg.max_response_tokens)
        reward += cfg.overlong_penalty_factor * overlong_penalty(
            length, cfg.max_response_tokens, cfg.overlong_buffer_tokens
        )
    reward += cfg.format_bonus if has_answer else -cfg.format_penalty
    return reward
