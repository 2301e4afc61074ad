"""The pure parts of benchmarks/law_on_model.py, against values computed by hand."""
import subprocess
import sys

import numpy as np
import pytest

from hicra_rl.law import hicra_over_grpo_push
from tests.benchmark_scripts import load_benchmark

law = load_benchmark("law_on_model.py")


def test_law_is_one_plus_alpha_times_one_minus_two_pbar():
    assert hicra_over_grpo_push(1.0, 0.25) == pytest.approx(1.5)
    assert hicra_over_grpo_push(0.2, 0.25) == pytest.approx(1.1)
    assert hicra_over_grpo_push(1.0, 0.8) == pytest.approx(0.4)
    assert hicra_over_grpo_push(0.2, 0.5) == pytest.approx(1.0)
    # elementwise, per prompt
    assert hicra_over_grpo_push(1.0, np.array([0.0, 1.0])).tolist() == pytest.approx([2.0, 0.0])


def test_law_module_does_not_import_torch():
    # hicra-report uses the law and starts without torch
    out = subprocess.run([sys.executable, "-c", "import sys, hicra_rl.law, hicra_rl.report; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_split_halves_makes_two_groups_of_each_prompt_in_order():
    # prompt 7's responses come first, then prompt 3's, interleaved in the dump as written
    half_group, prompt = law.split_halves([7, 7, 3, 7, 3, 3, 7, 3])
    # np.unique orders prompts: 3 -> 0, 7 -> 1; the first two of each prompt are half 0
    assert prompt.tolist() == [1, 1, 0, 1, 0, 0, 1, 0]
    assert half_group.tolist() == [2, 2, 0, 3, 0, 1, 3, 1]
    with pytest.raises(SystemExit, match="even group size"):
        law.split_halves([0, 0, 0, 1, 1, 1])
    with pytest.raises(SystemExit, match="even group size"):
        law.split_halves([0, 0, 1, 1, 1, 1])


def test_independent_law_weights_each_groups_push_by_the_other_halfs_success_rate():
    push = np.array([2.0, 1.0, 4.0, 0.0])
    pbar_other = np.array([0.25, 0.5, 0.75, 0.0])
    # α = 1: 1 + (1 - 2p') = 1.5, 1.0, 0.5, 2.0 -> terms 3.0, 1.0, 2.0, 0.0; law = 6 / 7
    terms = law.independent_law_terms(1.0, push, pbar_other)
    assert terms.tolist() == pytest.approx([3.0, 1.0, 2.0, 0.0])
    assert terms.sum() / push.sum() == pytest.approx(6.0 / 7.0)
    assert law.independent_law_terms(0.0, push, pbar_other).tolist() == push.tolist()


def test_group_pushes_sum_advantage_times_derivative_per_group():
    adv = np.array([[1.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    c = np.array([[0.1, 0.2, 9.0], [0.3, 7.0, 0.0], [1.0, 2.0, 3.0]])
    groups = np.array([0, 0, 1])
    # group 0: 1*0.1 + 2*0.2 + 0*9 + (-1)*0.3 + 0*7 = 0.2; group 1: 0.5*(1+2+3) = 3.0; group 2 empty
    assert law.group_pushes(adv, c, groups, 3) == pytest.approx([0.2, 3.0, 0.0])


def test_bootstrap_ratio_is_the_ratio_of_sums_and_collapses_when_every_group_agrees():
    num, den = np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0])
    assert law.bootstrap_ratio(num, den) == pytest.approx((2.0, 2.0, 2.0))
    num = np.array([1.0, 3.0, 2.0, 10.0])
    den = np.array([1.0, 1.0, 1.0, 1.0])
    ratio, lo, hi = law.bootstrap_ratio(num, den, draws=2000)
    assert ratio == pytest.approx(16.0 / 4.0)
    assert 1.0 <= lo < ratio < hi <= 10.0


def test_announcement_mask_marks_the_tokens_of_the_first_announced_phrase():
    strategies = {"left_to_right": "work from left to right", "direct": "add it all up in one step"}
    text = "Let's work from left to right.\n1 + 2 = 3"
    # tokens: "Let's" [0,5) " work" [5,10) " from left" [10,20) " to right" [20,29) "." [29,30) "\n1 + 2 = 3"
    spans = [(0, 5), (5, 10), (10, 20), (20, 29), (29, 30), (30, len(text))]
    assert law.announcement_mask(text, spans, strategies).tolist() == [False, True, True, True, False, False]
    # the first of two phrases counts; none: all False
    text2 = "Let's add it all up in one step. Or work from left to right."
    spans2 = [(0, 5), (5, 31), (31, len(text2))]
    assert law.announcement_mask(text2, spans2, strategies).tolist() == [False, True, False]
    assert not law.announcement_mask("12 + 3 = 15", [(0, 11)], strategies).any()
