"""The driver's and metrics actor's own logic, without Ray."""
import json
import math

import pytest
import torch

from hicra_rl.driver import console_line, prompt_indices, response_layout_mask
from hicra_rl.evaluation import split_evenly, summarise
from hicra_rl.metrics.perplexity import RelativePerplexity
from hicra_rl.metrics.step import following_ngram, maximal_occurrences, step_metrics
from hicra_rl.runlog import MetricsSink, read_metrics


def test_prompt_indices_are_a_pure_function_of_the_step():
    per_epoch = [i for s in range(5) for i in prompt_indices(s, 10, 2, seed=3, shuffle=True)]
    assert sorted(per_epoch) == list(range(10))  # one epoch visits each prompt once
    assert prompt_indices(7, 10, 2, 3, True) == prompt_indices(7, 10, 2, 3, True)
    assert prompt_indices(0, 10, 3, 0, shuffle=False) == [0, 1, 2]
    assert prompt_indices(3, 10, 3, 0, shuffle=False) == [9, 0, 1]  # wraps into epoch 2


def test_split_evenly():
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1, 2], 5) == [[1], [2]]


def test_response_layout_mask():
    assert response_layout_mask([1, 3], 3).tolist() == [[1, 0, 0], [1, 1, 1]]


def test_maximal_occurrences_and_following_ngram():
    occ = [(0, 19, "the total number of"), (0, 16, "the total number"), (30, 40, "so in total")]
    assert maximal_occurrences(occ) == [(0, 19, "the total number of"), (30, 40, "so in total")]
    assert following_ngram("so in total we get 5 apples", 11) == "we get 5"


def test_step_metrics_hand_computed():
    # 2 prompts x 2 samples; prompt 0 solved once, prompt 1 never
    planning = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    entropy = torch.tensor([[2.0, 1.0], [3.0, 9.0], [2.0, 2.0], [1.0, 1.0]])
    logp = -entropy
    m = step_metrics(
        rewards=[1.0, 0.0, 0.0, 0.0], correct=[True, False, False, False], group_ids=[0, 0, 1, 1],
        response_lengths=[2, 1, 2, 2], finish_reasons=["stop", "length", "stop", "stop"],
        sg_occurrences=[[(0, 5, "a b c")], [], [(0, 5, "a b c"), (6, 9, "d e f")], [(0, 3, "d e f")]],
        response_texts=["a b c x y", "", "a b c d e f z", "d e f w"],
        planning_mask=planning, response_mask=valid, token_entropy=entropy, token_log_probs=logp,
        rel_ppl=RelativePerplexity(), pass_k=2,
    )
    assert m["reward/accuracy"] == 0.25
    assert m["reward/pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["reward/pass@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["reward/solve_none_frac"] == 0.5
    assert m["response/truncated_frac"] == 0.25
    # SG counts: "a b c" x2, "d e f" x2 -> ln 2
    assert m["strategic/semantic_entropy"] == pytest.approx(math.log(2))
    assert m["strategic/distinct_sgs"] == 2
    # planning tokens: (0,0), (2,0), (2,1) -> entropies 2, 2, 2 ; execution: 1, 3, 1, 1
    assert m["token_entropy/planning"] == pytest.approx(2.0)
    assert m["token_entropy/execution"] == pytest.approx(6.0 / 4)
    assert m["strategic/planning_token_frac"] == pytest.approx(3 / 7)
    assert m["perplexity/planning"] == pytest.approx(math.exp(2.0))
    assert m["relative_perplexity/planning"] == 1.0
    # following n-grams: "a b c" -> "x y" and "d e f z"; "d e f" -> "z" and "w": H(E|S) = ln 2
    assert m["strategic/conditional_entropy"] == pytest.approx(math.log(2))


def test_summarise_eval_rows():
    rows = [
        {"correct": [True, False], "lengths": [3, 5], "answered": [True, True], "subject": "Algebra", "level": 1},
        {"correct": [False, False], "lengths": [4, 4], "answered": [False, True], "subject": "Geometry", "level": 1},
    ]
    m = summarise(rows, k=2)
    assert m["eval/pass@1"] == pytest.approx(0.25)
    assert m["eval/pass@2"] == pytest.approx(0.5)
    assert m["eval/response_length"] == 4.0
    assert m["eval/boxed_frac"] == 0.75
    assert m["eval/pass@1/subject=Algebra"] == 0.5
    assert m["eval/pass@1/level=1"] == pytest.approx(0.25)


def test_metrics_sink_truncates_on_resume(tmp_path):
    sink = MetricsSink(str(tmp_path), use_wandb=False, wandb_mode="offline", project="p", run_name=None, config={})
    for step in (1, 2, 3):
        sink.log(step, {"x": float(step), "bad": float("nan")})
    sink.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "x"')  # a torn line of a killed run
    sink = MetricsSink(str(tmp_path), use_wandb=False, wandb_mode="offline", project="p", run_name=None, config={},
                       resume_step=2)
    sink.log(3, {"x": 30.0})
    sink.close()
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["x"] == 30.0 and rows[0]["bad"] is None
    json.dumps(rows)


def test_console_line_handles_missing_and_nan():
    line = console_line(3, {"reward/mean": 0.5, "token_entropy/planning": float("nan")})
    assert line.startswith("step 3: reward 0.500") and "nan" in line


def test_metrics_worker_without_ray(tmp_path):
    from hicra_rl.actors import MetricsWorker

    worker = MetricsWorker(str(tmp_path), {"wandb": False, "wandb_mode": "offline", "project": "p", "run_name": None},
                           {}, resume_step=0, rel_ppl_state={"baseline": {"all": math.exp(1.0)}})
    rollout = dict(
        rewards=[1.0, 0.0], correct=[True, False], group_ids=[0, 0], response_lengths=[1, 1],
        finish_reasons=["stop", "stop"], sg_occurrences=[[], []], response_texts=["a", "b"],
        planning_mask=torch.zeros(2, 1, dtype=torch.bool), response_mask=torch.ones(2, 1),
        token_entropy=torch.ones(2, 1), token_log_probs=torch.full((2, 1), -2.0), pass_k=2,
    )
    m = worker.log_step(1, rollout, {"actor/pg_loss": 0.5})
    # the restored step-0 baseline exp(1) makes relative perplexity exp(2) / exp(1)
    assert m["relative_perplexity/all"] == pytest.approx(math.e)
    assert m["actor/pg_loss"] == 0.5 and m["reward/pass@2"] == 1.0
    worker.close()
    assert read_metrics(str(tmp_path))[0]["step"] == 1


def test_data_setup_errors_name_the_key(tmp_path):
    from hicra_rl.config import DataConfig
    from hicra_rl.data.setup import load_problem_set

    with pytest.raises(ValueError, match="data.source 'csv'"):
        load_problem_set(DataConfig(source="csv"), 0)
    with pytest.raises(ValueError, match="data.path is required"):
        load_problem_set(DataConfig(source="file", path=None), 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 2: field 'problem'"):
        load_problem_set(DataConfig(name="bad", source="file", path=str(bad)), 0)
    ok = load_problem_set(DataConfig(name="bad", source="file", path=str(bad), on_bad_row="skip"), 0)
    assert len(ok) == 1 and ok.n_skipped == 1
    gsm = load_problem_set(DataConfig(name="gsm8k", source="gsm8k", split="test", size=5), 0)
    assert len(gsm) == 5 and gsm[0]["answer"] == "18"  # Janet's ducks
