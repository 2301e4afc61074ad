"""Per-strategy share and accuracy (hicra_rl.metrics.strategies), by hand."""
import math

import pytest

from hicra_rl.metrics.strategies import classify_strategy, strategy_metrics, strategy_table

STRATS = {"left_to_right": "work from left to right", "direct": "add it all up in one step"}
L2R = "Let's work from left to right.\n1 + 2 = 3\n3 + 4 = 7\nSo the final answer is \\boxed{7}."
DIRECT = "Let's add it all up in one step.\n1 + 2 + 4 = 7\nSo the final answer is \\boxed{7}."


def test_classify_first_announcement_wins_case_insensitive():
    assert classify_strategy(L2R, STRATS) == "left_to_right"
    assert classify_strategy(DIRECT.upper(), STRATS) == "direct"
    assert classify_strategy("I will ADD IT ALL UP IN ONE STEP, no, work from left to right", STRATS) == "direct"
    assert classify_strategy("1 + 2 + 4 = 7", STRATS) == "none"


def test_step_metrics_by_hand():
    # group 0: L2R ok, L2R ok, DIRECT wrong, DIRECT ok  -> mixed, accuracy 3/4
    # group 1: L2R wrong, L2R ok, L2R ok, L2R ok        -> one strategy, not mixed
    # group 2: none wrong, DIRECT wrong, DIRECT wrong, L2R ok -> mixed (3 strategies incl. none), accuracy 1/4
    texts = [L2R, L2R, DIRECT, DIRECT, L2R, L2R, L2R, L2R, "7", DIRECT, DIRECT, L2R]
    correct = [1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1]
    groups = [0] * 4 + [1] * 4 + [2] * 4
    m = strategy_metrics(texts, correct, groups, STRATS)
    assert m["strategy/share=left_to_right"] == pytest.approx(7 / 12)
    assert m["strategy/share=direct"] == pytest.approx(4 / 12)
    assert m["strategy/share=none"] == pytest.approx(1 / 12)
    assert m["strategy/accuracy=left_to_right"] == pytest.approx(6 / 7)
    assert m["strategy/accuracy=direct"] == pytest.approx(1 / 4)
    assert m["strategy/accuracy=none"] == 0.0
    assert m["strategy/mixed_group_frac"] == pytest.approx(2 / 3)
    assert m["strategy/mixed_group_accuracy"] == pytest.approx(4 / 8)


def test_step_metrics_without_mixed_groups_or_a_strategy():
    m = strategy_metrics([L2R, L2R], [True, False], [0, 0], STRATS)
    assert m["strategy/share=direct"] == 0.0 and math.isnan(m["strategy/accuracy=direct"])
    assert m["strategy/mixed_group_frac"] == 0.0 and math.isnan(m["strategy/mixed_group_accuracy"])
    with pytest.raises(ValueError, match="2 texts, 1 correct flags"):
        strategy_metrics([L2R, L2R], [True], [0, 0], STRATS)


def test_strategy_table_from_eval_rows():
    rows = [{"responses": [L2R, DIRECT, DIRECT], "correct": [True, False, True]},
            {"responses": [L2R, L2R, "no idea"], "correct": [True, False, False]}]
    table = {r["strategy"]: r for r in strategy_table(rows, STRATS)}
    assert table["left_to_right"] == {"strategy": "left_to_right", "responses": 3, "share": 0.5, "correct": 2,
                                      "accuracy": pytest.approx(2 / 3), "problems": 2}
    assert table["direct"]["accuracy"] == 0.5 and table["direct"]["problems"] == 1
    assert table["none"]["responses"] == 1 and table["none"]["accuracy"] == 0.0
    # 'none' is listed only when some response announced no strategy
    assert "none" not in {r["strategy"] for r in strategy_table(rows[:1], STRATS)}
