"""benchmarks/bench_learner.py builds its batches from a run's dumped rollouts as the driver builds them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_learner.py")


def _write(folder: Path, step: int, rows: list[dict]) -> None:
    (folder / f"step-{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rollout_batches_rebuild_the_drivers_batch(bench, tmp_path):
    _write(tmp_path, 2, [{"prompt_ids": [7, 8], "response_ids": [1, 2, 3], "token_advantages": [0.5, 0.6, 0.5]},
                         {"prompt_ids": [7, 8], "response_ids": [4], "token_advantages": [-0.5]}])
    _write(tmp_path, 10, [{"prompt_ids": [9], "response_ids": [5, 6], "token_advantages": [1.0, 1.0]}])
    first, second = bench.rollout_batches(str(tmp_path), pad_id=0)   # steps in numeric order: 2, then 10
    # rows [prompt | response], right-padded to the longest (5 tokens); response_mask marks the responses
    assert first["input_ids"].tolist() == [[7, 8, 1, 2, 3], [7, 8, 4, 0, 0]]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert first["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]
    # token advantages in the response layout [B, longest response], zero past each response
    assert torch.equal(first["advantages"], torch.tensor([[0.5, 0.6, 0.5], [-0.5, 0.0, 0.0]]))
    assert first["old_log_probs"] is None
    assert second["input_ids"].tolist() == [[9, 5, 6]]


def test_rollout_batches_name_the_file_row_and_missing_field(bench, tmp_path):
    _write(tmp_path, 1, [{"prompt_ids": [7], "response_ids": [1], "token_advantages": [0.1]},
                         {"response_ids": [1], "token_advantages": [0.1]}])
    with pytest.raises(ValueError, match=r"step-1\.jsonl: row 2 has no field 'prompt_ids'"):
        bench.rollout_batches(str(tmp_path), pad_id=0)
    with pytest.raises(FileNotFoundError, match="dump_rollouts"):
        bench.rollout_batches(str(tmp_path / "empty"), pad_id=0)
