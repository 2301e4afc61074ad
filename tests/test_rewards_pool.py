"""Time-bounded verification in killable worker processes, the verifier registry, reasoning-gym scoring."""
import json
import os
import threading
import time
from pathlib import Path

import pytest

from hicra_rl.rewards import pool
from hicra_rl.rewards.math import RewardShapingConfig
from hicra_rl.rewards.pool import TimeBoundedVerifier, get_verifier, register_verifier, score_item
from hicra_rl.rewards.tasks import generate_task_items, score_task_answer, task_name

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# module-level verifiers (workers import them by name)
def _crashing_verifier(response, gold, task, mode):
    os._exit(3)


def _raising_verifier(response, gold, task, mode):
    raise RuntimeError("verifier bug")


@pytest.fixture(scope="module")
def verifier():
    v = TimeBoundedVerifier(time_limit_s=2.0, num_workers=1)
    with v:
        yield v


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(")")[-1].split()[0] != "Z"


# ---------------------------------------------------------------- registry


def test_registry_resolves_task_names():
    assert get_verifier("math") is pool.verify_math
    assert get_verifier("gsm8k") is pool.verify_math
    assert get_verifier("reasoning_gym:chain_sum") is pool.verify_reasoning_gym
    with pytest.raises(KeyError, match="no verifier registered for task 'code'"):
        get_verifier("code")


def test_register_verifier_rejects_what_workers_cannot_import():
    with pytest.raises(ValueError, match="not a module-level function"):
        register_verifier("tmp", lambda r, g, t, m: (1.0, None))
    with pytest.raises(ValueError, match="part before ':'"):
        register_verifier("a:b", _raising_verifier)


# ---------------------------------------------------------------- reasoning-gym tasks


def test_generate_task_items_is_seeded_and_scored_by_reasoning_gym():
    items = generate_task_items("basic_arithmetic", size=3, seed=1)
    assert items == generate_task_items("reasoning_gym:basic_arithmetic", size=3, seed=1)
    assert items[0].question == "Calculate 5 - 3 - 6." and items[0].answer == "-4"  # 5 - 3 - 6 = -4
    assert items[0].task == "reasoning_gym:basic_arithmetic"
    assert score_task_answer("basic_arithmetic", "-4", "-4") == 1.0
    assert score_task_answer("basic_arithmetic", "-4 ", "-4") == pytest.approx(2 / 3)  # RG's partial credit
    assert score_task_answer("basic_arithmetic", "4", "-4") == 0.0
    assert score_task_answer("basic_arithmetic", None, "-4") == 0.0
    entry_json = json.dumps({"answer": "-4", "metadata": items[0].metadata})
    assert score_task_answer("basic_arithmetic", "-4", entry_json) == 1.0
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'no_such_task'"):
        task_name("reasoning_gym:no_such_task")


def test_products_and_chain_sum_items_are_scored_on_boxed_answers():
    for task, config in [("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
                         ("chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2})]:
        for item in generate_task_items(task, size=5, seed=3, config=config):
            expression = item.metadata["expression"]
            value = _evaluate_integer_expression(expression)
            assert item.answer == str(value)
            assert score_item(rf"{expression} = \boxed{{{value}}}", item.answer, item.task) == (1.0, str(value))
            assert score_item(rf"\boxed{{{value + 1}}}", item.answer, item.task)[0] == 0.0


def _evaluate_integer_expression(expression: str) -> int:
    """Evaluate 'a + b - c * d' style expressions of integers without eval."""
    tokens = expression.split()
    terms = [int(tokens[0])]
    ops = tokens[1::2]
    for op, number in zip(ops, map(int, tokens[2::2])):
        if op == "*":
            terms[-1] *= number
        elif op == "+":
            terms.append(number)
        elif op == "-":
            terms.append(-number)
        else:
            raise ValueError(op)
    return sum(terms)


# ---------------------------------------------------------------- the pool


def test_score_batch_mixed_tasks(verifier):
    items = [
        (r"so $\boxed{\frac{14}{3}}$", r"\frac{14}{3}", "math"),
        (r"so $\boxed{4.6666666667}$", r"\frac{14}{3}", "math"),
        (r"so $\boxed{\frac{13}{3}}$", r"\frac{14}{3}", "math"),
        ("no final answer here", "18", "gsm8k"),
        (r"\boxed{1,080}", "1080", "gsm8k"),
        (r"\boxed{-4}", "-4", "reasoning_gym:chain_sum"),
        (r"\boxed{-5}", "-4", "reasoning_gym:chain_sum"),
    ]
    results = verifier.score_batch(items)
    assert [r.correct for r in results] == [True, True, False, False, True, True, False]
    assert [r.reward for r in results] == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert [r.extracted for r in results] == [r"\frac{14}{3}", "4.6666666667", r"\frac{13}{3}", None, "1,080", "-4", "-5"]
    assert not any(r.timed_out for r in results)
    assert all(r.error is None and 0 <= r.seconds < 2.0 for r in results)


def test_pathological_answers_time_out_without_stalling_the_batch(verifier):
    before_timeouts, before_restarts = verifier.timeouts, verifier.restarts
    old_pids = verifier.worker_pids()
    items = [
        (r"easy: \boxed{2}", "2", "math"),
        (r"\boxed{9^{9^{9^{9}}}}", "1", "math"),                 # sympy builds a tower of powers
        (r"\boxed{" + "x" * 100_000 + "}", "1", "math"),        # a 100k-character answer
        (r"still fine: \boxed{\sqrt{2}}", "2^{1/2}", "math"),
    ]
    start = time.monotonic()
    results = verifier.score_batch(items)
    elapsed = time.monotonic() - start
    assert [r.timed_out for r in results] == [False, True, True, False]
    assert [r.reward for r in results] == [1.0, 0.0, 0.0, 1.0]
    assert results[1].extracted == "9^{9^{9^{9}}}" and len(results[2].extracted) == 100_000
    for r in results[1:3]:
        assert 2.0 <= r.seconds < 3.0
    assert elapsed < 2 * 2.0 + 3.0  # two limits plus slack for the restarts
    assert verifier.timeouts - before_timeouts == 2
    assert verifier.restarts - before_restarts == 2
    time.sleep(0.2)
    assert not _alive(old_pids[0])  # the overrunning worker was killed
    # the pool goes on
    assert verifier.score_batch([(r"\boxed{7}", "7", "math")])[0].correct


def test_a_dying_worker_and_a_raising_verifier_cost_one_item_each(verifier, monkeypatch):
    monkeypatch.setitem(pool._VERIFIERS, "crash", _crashing_verifier)
    monkeypatch.setitem(pool._VERIFIERS, "buggy", _raising_verifier)
    before = verifier.errors
    items = [(r"\boxed{1}", "1", "math"), ("x", "1", "crash"), (r"\boxed{3}", "3", "math"),
             ("x", "1", "buggy"), (r"\boxed{4}", "4", "math")]
    results = verifier.score_batch(items)
    assert [r.reward for r in results] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert results[1].error == "worker died (exit code 3)"
    assert results[3].error == "RuntimeError: verifier bug"
    assert not any(r.timed_out for r in results)
    assert verifier.errors - before == 2


def test_shaping_through_the_pool():
    shaping = RewardShapingConfig(incorrect_reward=-1.0, overlong_penalty=True, max_response_tokens=100,
                                  overlong_buffer_tokens=20, format_penalty=0.5)
    with TimeBoundedVerifier(time_limit_s=5.0, shaping=shaping, spare_worker=False) as v:
        items = [(r"\boxed{5}", "5", "math"), (r"\boxed{6}", "5", "math"), ("five", "5", "math")]
        results = v.score_batch(items, n_tokens=[90, 50, 100], finished=[True, True, False])
        assert [r.reward for r in results] == pytest.approx([1 - 0.5, -1.0, -1 - 1 - 0.5])
        with pytest.raises(ValueError, match="pass n_tokens"):
            v.score_batch(items)
        with pytest.raises(ValueError, match="n_tokens has 1 entries for 3 items"):
            v.score_batch(items, n_tokens=[1], finished=[True] * 3)


def test_works_from_a_non_main_thread(verifier):
    """math-verify's signal.alarm timeouts would raise here; ours are process-based."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=verifier.score_batch([(r"\boxed{0.5}", r"\frac12", "math")])))
    thread.start()
    thread.join(30)
    assert out["r"][0].correct


def test_throughput_on_easy_answers(verifier):
    items = [(rf"the answer is \boxed{{{i % 7}}}", str(i % 5), "math") for i in range(1000)]
    start = time.perf_counter()
    results = verifier.score_batch(items)
    rate = len(items) / (time.perf_counter() - start)
    assert [r.correct for r in results] == [i % 7 == i % 5 for i in range(1000)]
    assert rate > 200, f"{rate:.0f} items/s"


def test_close_stops_the_workers():
    v = TimeBoundedVerifier(time_limit_s=1.0, num_workers=2).start()
    pids = v.worker_pids()
    assert len(pids) == 3  # two workers and a spare
    assert [r.correct for r in v.score_batch([(r"\boxed{1}", "1", "math")] * 6)] == [True] * 6
    v.close()
    time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="closed"):
        v.score_batch([(r"\boxed{1}", "1", "math")])


def test_bad_items_are_rejected_before_any_work(verifier):
    with pytest.raises(KeyError, match="no verifier registered for task 'poetry'"):
        verifier.score_batch([(r"\boxed{1}", "1", "math"), ("x", "y", "poetry")])
    with pytest.raises(ValueError, match=r"item 0 must be \(response, gold, task\)"):
        verifier.score_batch([(r"\boxed{1}", "1")])
    assert verifier.score_batch([]) == []


def test_math500_gold_answers_accepted_and_swapped_answers_rejected(verifier):
    """The bench_verifier check: each gold boxed in a sentence verifies against itself (>= 99%), and
    against the gold of the next problem with a different answer it fails (>= 99%)."""
    with open(DATA / "math500" / "test.jsonl", encoding="utf-8") as f:
        answers = [json.loads(line)["answer"] for line in f if line.strip()]
    norm = ["".join(a.split()) for a in answers]
    other = []
    for i in range(len(answers)):
        j = (i + 1) % len(answers)
        while norm[j] == norm[i]:
            j = (j + 1) % len(answers)
        other.append(j)
    responses = [f"Putting it together, so the answer is \\boxed{{{a}}}." for a in answers]
    accepted = verifier.score_batch([(r, a, "math") for r, a in zip(responses, answers)])
    rejected = verifier.score_batch([(responses[i], answers[j], "math") for i, j in enumerate(other)])
    accept_rate = sum(r.correct for r in accepted) / len(answers)
    reject_rate = sum(not r.correct for r in rejected) / len(answers)
    assert accept_rate >= 0.99, [a for a, r in zip(answers, accepted) if not r.correct]
    assert reject_rate >= 0.99, [(answers[i], answers[j]) for (i, j), r in zip(enumerate(other), rejected) if r.correct]
    assert not any(r.timed_out for r in accepted + rejected)
