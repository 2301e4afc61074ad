"""docs/metrics.md documents every key step_metrics logs, the per-strategy ones included."""
import re
from pathlib import Path

import torch

from hicra_rl.metrics.perplexity import RelativePerplexity
from hicra_rl.metrics.step import step_metrics

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def documented_keys() -> set[str]:
    """Keys written as `group/name` in docs/metrics.md (the pattern tests/test_launch.py uses)."""
    return set(re.findall(r"`([a-z_]+/[^`\s]+)`", DOCS.read_text(encoding="utf-8")))


def as_documented(key: str) -> str:
    """A logged key in its documented form: numbers in keys become their placeholder."""
    key = re.sub(r"pass@\d+$", "pass@G", key)
    key = re.sub(r"^strategy/(share|accuracy)=\w+$", r"strategy/\1=<name>", key)
    return re.sub(r"^strategy/cluster=\d+$", "strategy/cluster=<id>", key)


def test_every_step_metric_is_documented():
    m = step_metrics(
        rewards=[1.0, 0.0], correct=[True, False], group_ids=[0, 0], response_lengths=[1, 1],
        finish_reasons=["stop", "stop"], sg_occurrences=[[(0, 5, "a b c")], []], response_texts=["a b c", "x"],
        planning_mask=torch.zeros(2, 1, dtype=torch.bool), response_mask=torch.ones(2, 1),
        token_entropy=torch.ones(2, 1), token_log_probs=-torch.ones(2, 1), rel_ppl=RelativePerplexity(),
        pass_k=2, gram_clusters={"a b c": 0, "d e f": 1}, strategies={"abc": "a b c", "xyz": "x y z"},
    )
    assert {"strategy/cluster=0", "strategy/cluster=1", "strategy/share=abc", "strategy/mixed_group_frac"} <= set(m)
    undocumented = {as_documented(k) for k in m} - documented_keys()
    assert undocumented == set(), f"undocumented metrics: {sorted(undocumented)}"
