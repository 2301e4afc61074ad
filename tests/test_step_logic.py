"""The driver's and metrics actor's own logic, without Ray."""
import json
import math

import pytest
import torch

from hicra_rl.batch import response_layout_mask
from hicra_rl.driver import console_line, prompt_indices
from hicra_rl.evaluation import summarise
from hicra_rl.fleet import split_evenly
from hicra_rl.metrics.perplexity import RelativePerplexity
from hicra_rl.metrics.step import following_ngram, maximal_occurrences, step_metrics, strategy_usage
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
    assert response_layout_mask(torch.tensor([1, 3]), 3).tolist() == [[1, 0, 0], [1, 1, 1]]


def test_maximal_occurrences_and_following_ngram():
    occ = [(0, 19, "the total number of"), (0, 16, "the total number"), (30, 40, "so in total")]
    assert maximal_occurrences(occ) == [(0, 19, "the total number of"), (30, 40, "so in total")]
    assert following_ngram("so in total we get 5 apples", 11) == "we get 5"


def test_partly_overlapping_occurrences_merge_into_one():
    # "so the final answer is boxed": "so the final answer is" [0, 22) and "final answer is boxed" [7, 28)
    # overlap without nesting; the old rule kept both (2 occurrences), now they are one, spanning [0, 28),
    # labelled by the longer gram (22 > 21 characters); "answer is boxed" [13, 28) joins the same run
    text = "so the final answer is boxed{3}"
    occ = [(13, 28, "answer is boxed"), (0, 22, "so the final answer is"), (7, 28, "final answer is boxed")]
    assert [text[s:e] for s, e, _ in occ] == ["answer is boxed", "so the final answer is", "final answer is boxed"]
    assert maximal_occurrences(occ) == [(0, 28, "so the final answer is")]
    # equal lengths: the earliest start wins, whatever the input order
    assert maximal_occurrences([(5, 15, "b b b"), (0, 10, "a a a")]) == [(0, 15, "a a a")]
    # transitive: [0, 5) and [8, 20) do not overlap, but both overlap [4, 9)
    assert maximal_occurrences([(0, 5, "x"), (4, 9, "y y"), (8, 20, "z z z")]) == [(0, 20, "z z z")]
    # half-open spans: touching is not overlapping
    assert maximal_occurrences([(0, 5, "p"), (5, 9, "q")]) == [(0, 5, "p"), (5, 9, "q")]
    assert maximal_occurrences([]) == []


def test_strategy_usage_hand_computed():
    clusters = {"a b c": 0, "d e f": 1, "g h i": 1, "j k l": 2}
    occ = [
        [(0, 5, "d e f"), (6, 11, "g h i")],  # cluster 1 (twice: counts once)
        [(0, 5, "a b c"), (6, 11, "a b c")],  # cluster 0
        [],
        [(0, 5, "x y z")],  # not in the mapping: ignored
    ]
    assert strategy_usage(occ, clusters) == {
        "strategy/cluster=0": 1 / 4,
        "strategy/cluster=1": 1 / 4,
        "strategy/cluster=2": 0.0,
    }
    assert all(math.isnan(v) for v in strategy_usage([], clusters).values())


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
    assert not any(k.startswith("strategy/") for k in m)


def test_step_metrics_counts_an_overlapping_run_once_and_reports_strategy_usage():
    texts = ["so the final answer is boxed 3", "let's work from left to right. so the final answer is boxed 5"]
    final, boxed, work = "so the final answer is", "final answer is boxed", "let's work from"
    occ = [[(0, 22, final), (7, 28, boxed)], [(0, 15, work), (31, 53, final), (38, 59, boxed)]]
    assert [texts[1][s:e] for s, e, _ in occ[1]] == [work, final, boxed]
    n = len(texts)
    m = step_metrics(
        rewards=[1.0, 0.0], correct=[True, False], group_ids=[0, 0], response_lengths=[3, 3],
        finish_reasons=["stop", "stop"], sg_occurrences=occ, response_texts=texts,
        planning_mask=torch.zeros(n, 3, dtype=torch.bool), response_mask=torch.ones(n, 3),
        token_entropy=torch.ones(n, 3), token_log_probs=-torch.ones(n, 3), rel_ppl=RelativePerplexity(),
        pass_k=2, gram_clusters={final: 0, boxed: 0, work: 1, "add the positive": 2},
    )
    # merged: response 0 [final], response 1 [work, final] -> counts final 2, work 1 (the old rule
    # counted final 2, boxed 2, work 1: 5 occurrences, entropy of (2/5, 2/5, 1/5))
    assert m["strategic/sgs_per_response"] == pytest.approx(3 / 2)
    assert m["strategic/distinct_sgs"] == 2
    assert m["strategic/semantic_entropy"] == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    # after the merged run comes "3" (response 0) and "5" (response 1); after "let's work from": "left to right."
    assert m["strategic/conditional_entropy"] == pytest.approx(2 / 3 * math.log(2))
    assert m["strategy/cluster=0"] == 1.0
    assert m["strategy/cluster=1"] == 0.5
    assert m["strategy/cluster=2"] == 0.0


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


def test_checkpoint_due_every_save_every_and_always_at_the_end():
    from hicra_rl.driver import checkpoint_due

    assert [d for d in range(1, 11) if checkpoint_due(d, 10, 4)] == [4, 8, 10]
    assert [d for d in range(1, 11) if checkpoint_due(d, 10, 5)] == [5, 10]
    # save_every 0 ("only at the end", docs/operations.md): the finished run still gets its checkpoint
    assert [d for d in range(1, 11) if checkpoint_due(d, 10, 0)] == [10]
