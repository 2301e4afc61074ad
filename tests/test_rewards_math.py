"""Answer extraction, math-verify equivalence on real MATH-500 / GSM8K answers, and DAPO reward shaping."""
import json
from pathlib import Path

import pytest

from hicra_rl.rewards.math import (
    RewardShapingConfig,
    extract_answer,
    gsm8k_gold,
    overlong_penalty,
    shape_reward,
    verify,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def math500():
    return {row["unique_id"]: row for row in _jsonl(DATA / "math500" / "test.jsonl")}


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "response, mode, expected",
    [
        (r"so $\boxed{\frac{1}{2}}$.", "boxed", r"\frac{1}{2}"),
        (r"first \boxed{3} then \boxed{ 4 }", "boxed", "4"),                       # the last one, stripped
        (r"\boxed{\left(3,\frac{\pi}{2}\right)}", "boxed", r"\left(3,\frac{\pi}{2}\right)"),
        (r"set \boxed{\{1,2\}} done", "boxed", r"\{1,2\}"),                        # escaped braces don't nest
        (r"\boxed{5} and then \boxed{6", "boxed", "5"),                            # cut-off box: last complete one
        (r"\fbox{7}", "boxed", "7"),
        (r"\fbox{7}", "strict_boxed", None),
        (r"the answer is \boxed 8$.", "boxed", "8"),
        (r"the answer is \boxed 8$.", "strict_boxed", None),
        (r"\boxed{12} and \fbox{13}", "strict_boxed", "12"),
        (r"\boxed{}", "boxed", None),
        (r"\boxedx{3}", "boxed", None),                                            # another command
        ("no box, the answer is 42", "boxed", None),
        ("She makes 9 * 2 = $18.\n#### 18", "gsm8k", "18"),
        ("#### 1,080\n", "gsm8k", "1,080"),
        ("no marker 18", "gsm8k", None),
        ("we get 1,234 apples and 5.5 pears", "last_number", "5.5"),
        ("we get 1,234 apples", "last_number", "1234"),
        ("total: -3/4", "last_number", "-3/4"),
        ("no digits here", "last_number", None),
        (r"\boxed{9} although 10", "boxed_or_last_number", "9"),
        ("I think 10", "boxed_or_last_number", "10"),
    ],
)
def test_extract_answer(response, mode, expected):
    assert extract_answer(response, mode) == expected


def test_extract_answer_unknown_mode():
    with pytest.raises(ValueError, match="unknown answer mode 'latex'"):
        extract_answer(r"\boxed{1}", "latex")


def test_extract_answer_is_linear_on_a_huge_response():
    response = "x" * 200_000 + r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"
    assert extract_answer(response) == "{" * 5000 + "1" + "}" * 5000


def test_gsm8k_gold():
    assert gsm8k_gold("She sells 9 eggs.\n#### 18") == "18"
    assert gsm8k_gold("#### 1,080") == "1080"
    with pytest.raises(ValueError, match="no '#### <answer>' line"):
        gsm8k_gold("The answer is 18")


# ---------------------------------------------------------------- equivalence on real gold answers

# (MATH-500 unique_id, answers equal to the gold, answers different from it), worked out by hand
MATH500_CASES = [
    ("test/precalculus/807.json", [r"(3, \pi/2)", r"\left(3,\frac{\pi}{2}\right)"], [r"(3, \pi)", r"(\frac{\pi}{2}, 3)"]),
    ("test/algebra/1349.json", [r"\text{Evelyn}", "Evelyn"], [r"\text{Bob}"]),                 # \text{Evelyn}
    ("test/precalculus/927.json", ["90", r"90^{\circ}", "90°"], [r"45^\circ", "180"]),        # 90^\circ
    ("test/algebra/1519.json", [r"\frac{1}{\sqrt{3}}", r"\sqrt{3}/3", r"3^{-1/2}"], [r"\sqrt{3}"]),  # \frac{\sqrt{3}}{3}
    ("test/intermediate_algebra/558.json", [r"(3, 4]", r"\left(3,4\right]"], [r"[3,4]", r"(3,4)"]),  # (3,4]
    ("test/precalculus/819.json", [r"\text{(C)}", "(C)", "C"], [r"\text{(D)}"]),              # \text{(C)}
    ("test/prealgebra/1044.json", ["5.4", r"5.40\text{ cents}"], ["54"]),                     # 5.4 \text{ cents}
    ("test/prealgebra/1003.json", [r"\frac{270}{7}", r"38\frac{4}{7}"], [r"\frac{270}{8}", "38"]),
    ("test/intermediate_algebra/662.json", [r"1 \pm \sqrt{19}", r"1-\sqrt{19}, 1+\sqrt{19}"], [r"1+\sqrt{19}"]),
    ("test/algebra/101.json", [r"[-2,7]", r"x\in[-2,7]"], [r"(-2,7)"]),                       # x \in [-2,7]
    ("test/intermediate_algebra/1992.json", [r"(9,36)\cup(0,9)"], [r"(0,36)"]),              # (0,9) \cup (9,36)
]


@pytest.mark.parametrize("unique_id, equal, different", MATH500_CASES)
def test_verify_math500_equivalences(math500, unique_id, equal, different):
    gold = math500[unique_id]["answer"]
    for answer in equal:
        assert verify(rf"Therefore the answer is $\boxed{{{answer}}}$.", gold), (answer, gold)
    for answer in different:
        assert not verify(rf"Therefore the answer is $\boxed{{{answer}}}$.", gold), (answer, gold)


def test_every_math500_reference_solution_verifies(math500):
    """The dataset's own worked solutions end in \\boxed{answer}: all 500 must be accepted."""
    rejected = [uid for uid, row in math500.items() if not verify(row["solution"], row["answer"])]
    assert rejected == []


def test_verify_gsm8k_solutions():
    rows = _jsonl(DATA / "gsm8k" / "test.jsonl")[:100]
    for row in rows:
        gold = gsm8k_gold(row["answer"])
        assert verify(row["answer"], gold, mode="gsm8k")
        assert verify(rf"so she has \boxed{{{gold}}} left", gold)
        assert not verify(rf"so she has \boxed{{{int(gold) + 1}}} left", gold)


def test_verify_gsm8k_thousands_separator():
    rows = _jsonl(DATA / "gsm8k" / "test.jsonl")
    row = rows[146]  # line 147: "... #### 2,125"
    assert row["answer"].endswith("#### 2,125")
    gold = gsm8k_gold(row["answer"])
    assert gold == "2125"
    assert verify(r"\boxed{2,125}", gold) and verify(r"\boxed{2125}", gold) and verify(r"\boxed{\$2,125}", gold)
    assert not verify(r"\boxed{2,126}", gold)


def test_verify_without_answer_is_false():
    assert not verify("The answer is 18.", "18")  # boxed mode: no box, no credit
    assert verify("The answer is 18.", "18", mode="boxed_or_last_number")


# ---------------------------------------------------------------- reward shaping (DAPO Eq. 13)


def test_overlong_penalty_values():
    # L_max = 100, L_cache = 20: free up to 80, linear to -1 at 100, -1 beyond
    assert overlong_penalty(50, 100, 20) == 0.0
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == -0.5
    assert overlong_penalty(95, 100, 20) == -0.75
    assert overlong_penalty(100, 100, 20) == -1.0
    assert overlong_penalty(130, 100, 20) == -1.0


def test_shape_reward_defaults_are_plain_outcome_reward():
    cfg = RewardShapingConfig()
    assert shape_reward(True, 10_000, False, cfg) == 1.0
    assert shape_reward(False, 10, True, cfg, has_answer=False) == 0.0


def test_shape_reward_with_overlong_and_format_terms():
    cfg = RewardShapingConfig(
        correct_reward=1.0, incorrect_reward=-1.0, overlong_penalty=True, max_response_tokens=100,
        overlong_buffer_tokens=20, overlong_penalty_factor=0.5, format_bonus=0.1, format_penalty=0.3,
    )
    assert shape_reward(True, 50, True, cfg) == pytest.approx(1.1)             # 1 + 0.1
    assert shape_reward(True, 90, True, cfg) == pytest.approx(1.1 - 0.25)      # 0.5 * -0.5
    assert shape_reward(False, 90, True, cfg, has_answer=False) == pytest.approx(-1 - 0.25 - 0.3)
    assert shape_reward(False, 60, False, cfg, has_answer=False) == pytest.approx(-1 - 0.5 - 0.3)  # cut off
    assert shape_reward(0.5, 10, True, cfg) == pytest.approx(0.0 + 0.1)        # partial credit halfway


def test_shaping_config_is_validated():
    with pytest.raises(ValueError, match="max_response_tokens > 0"):
        RewardShapingConfig(overlong_penalty=True, overlong_buffer_tokens=10)
    with pytest.raises(ValueError, match="overlong_buffer_tokens <= max_response_tokens"):
        RewardShapingConfig(overlong_penalty=True, max_response_tokens=10, overlong_buffer_tokens=20)
    with pytest.raises(ValueError, match="format_penalty is subtracted"):
        RewardShapingConfig(format_penalty=-1.0)


# ---------------------------------------------------------------- verify()'s own wall-clock bound


def test_verify_bounds_a_hostile_power_tower():
    """sympy would compute 9^9^9^9^9 for ever (a SIGALRM cannot interrupt it): the default bounded path
    kills the worker at the limit and counts the answer as wrong."""
    import time

    verify(r"\boxed{1}", "1", timeout_s=2.0)  # start the module's worker process (a few seconds, once)
    start = time.monotonic()
    assert verify(r"\boxed{9^{9^{9^{9^{9}}}}}", "3", timeout_s=2.0) is False
    assert time.monotonic() - start < 2.0 + 5.0
    # the replacement worker answers the next call
    assert verify(r"so $\boxed{\frac{1}{2}}$", "0.5", timeout_s=2.0) is True


def test_verify_bounded_and_unbounded_paths_agree_on_normal_answers():
    for response, gold, mode in [(r"so $\boxed{\frac{14}{3}}$", r"\frac{14}{3}", "boxed"),
                                 (r"\boxed{4.6666666667}", r"\frac{14}{3}", "boxed"),
                                 ("#### 1,080", "1080", "gsm8k"),
                                 ("I think 10", "10", "boxed_or_last_number")]:
        assert verify(response, gold, mode) is True                    # default: bounded, in a worker
        assert verify(response, gold, mode, timeout_s=None) is True    # in-process, unbounded
    assert verify(r"\boxed{\frac{13}{3}}", r"\frac{14}{3}") is False
    assert verify(r"\boxed{\frac{13}{3}}", r"\frac{14}{3}", timeout_s=None) is False


def test_verify_rejects_a_bad_timeout_and_mode():
    with pytest.raises(ValueError, match="timeout_s must be > 0 or None"):
        verify(r"\boxed{1}", "1", timeout_s=0)
    with pytest.raises(ValueError, match="unknown answer mode 'latex'"):
        verify(r"\boxed{1}", "1", mode="latex")
