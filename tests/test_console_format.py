"""No negative zero in the console or the tables: ``fmt_float``, the per-step console line, hicra-eval's and
hicra-report's tables, and the entropies that produced ``-0.0`` (a one-outcome distribution)."""
import math

import pytest

from hicra_rl.driver import console_line
from hicra_rl.evaluation import markdown_table
from hicra_rl.fmt import fmt_float
from hicra_rl.metrics.entropy import conditional_entropy, semantic_entropy, shannon_entropy


@pytest.mark.parametrize("value, spec, text", [
    (-0.0, ".3f", "0.000"), (-1e-9, ".3f", "0.000"), (-0.0004, ".3f", "0.000"), (-0.0005001, ".3f", "-0.001"),
    (-1e-9, "+.4f", "+0.0000"), (-0.0, ".0f", "0"), (-2.5, ".1f", "-2.5"), (0.25, ".3f", "0.250"),
    (-1e-9, ".2e", "-1.00e-09"), (-0.0, ".2e", "0.00e+00"), (-math.inf, ".3f", "-inf"), (math.nan, ".3f", "nan"),
])
def test_fmt_float_prints_no_negative_zero(value, spec, text):
    assert fmt_float(value, spec) == text


def test_console_line_has_no_negative_zero():
    line = console_line(2, {"strategic/semantic_entropy": -0.0, "reward/mean": -1e-12, "actor/pg_loss": -3e-7,
                            "token_entropy/planning": 0.5})
    assert "-0.0" not in line
    assert "sem_H 0.000" in line and "reward 0.000" in line and "pg 0.0000" in line and "plan/exec 0.500/" in line


def test_tables_have_no_negative_zero():
    from hicra_rl.report import fmt, fmt_ci, fmt_num

    assert "-0.0" not in markdown_table({"eval/pass@1": -0.0}, "m", "d", 4, 0.6)
    assert fmt(-1e-9) == "0.0000" and fmt(-1e-9, signed=True) == "+0.0000" and fmt_num(-0.0, 3) == "0.000"
    assert fmt_ci([-1e-6, 0.25]) == "[+0.0000, +0.2500]"


def test_entropy_of_one_outcome_is_positive_zero():
    for h in (shannon_entropy([5]), semantic_entropy([["first"], ["first"]]), conditional_entropy([(1, 2), (1, 2)])):
        assert h == 0.0 and math.copysign(1.0, h) == 1.0
    assert shannon_entropy([1, 1]) == pytest.approx(math.log(2))
