import random

import pytest

from hicra_rl.rewards.math import verify
from hicra_rl.sft import (
    arithmetic_worked_solution,
    gsm8k_worked_solution,
    length_bucketed_batches,
    parse_additive_expression,
    solution_for,
)


def test_parse_additive_expression():
    assert parse_additive_expression("5 - 33 - 65") == [5, -33, -65]
    assert parse_additive_expression("12+7") == [12, 7]
    for bad in ("5 * 3", "5 -", "", "- 5", "import os"):
        with pytest.raises(ValueError):
            parse_additive_expression(bad)


def test_worked_solutions_hand_written():
    assert arithmetic_worked_solution("5 - 33 - 65", "left_to_right") == (
        "Let's work from left to right.\n5 - 33 = -28\n-28 - 65 = -93\nSo the final answer is \\boxed{-93}."
    )
    assert arithmetic_worked_solution("5 - 33 + 65 - 1", "group_signs") == (
        "We can add the positive terms first and then subtract the rest.\nAdded: 5 + 65 = 70\n"
        "Subtracted: 33 + 1 = 34\n70 - 34 = 36\nSo the final answer is \\boxed{36}."
    )
    assert arithmetic_worked_solution("6 + 6 + 7", "group_signs") == (
        "We can add the positive terms first and then subtract the rest.\nAdded: 6 + 6 + 7 = 19\n"
        "So the final answer is \\boxed{19}."
    )
    # two terms: one step whatever the strategy
    assert arithmetic_worked_solution("4 - 1", "group_signs").endswith("4 - 1 = 3\nSo the final answer is \\boxed{3}.")


def test_direct_strategy_is_one_line():
    assert arithmetic_worked_solution("5 - 33 + 65 - 1", "direct") == (
        "Let's add it all up in one step.\n5 - 33 + 65 - 1 = 36\nSo the final answer is \\boxed{36}."
    )
    # two terms keep the direct announcement (the testbed's choice is the announcement, not the execution)
    assert arithmetic_worked_solution("4 - 1", "direct") == (
        "Let's add it all up in one step.\n4 - 1 = 3\nSo the final answer is \\boxed{3}."
    )
    with pytest.raises(ValueError, match="unknown strategy 'guess'"):
        arithmetic_worked_solution("4 - 1", "guess")


def test_solution_for_draws_the_configured_strategies_independently_of_the_problem():
    from hicra_rl.sft import STRATEGY_ANNOUNCEMENTS

    row = {"id": "r", "gold_entry": '{"metadata": {"expression": "12 + 30 - 7"}}'}
    rng = random.Random(0)
    firsts = [solution_for(row, "arithmetic", rng, ("left_to_right", "direct")).split("\n")[0] for _ in range(400)]
    counts = {name: firsts.count(STRATEGY_ANNOUNCEMENTS[name]) for name in ("left_to_right", "direct")}
    assert sum(counts.values()) == 400 and 160 <= counts["direct"] <= 240  # binomial(400, 1/2): mean 200, sd 10


def test_worked_solution_is_accepted_by_the_verifier():
    rng = random.Random(0)
    for _ in range(50):
        terms = [rng.randint(0, 99) for _ in range(rng.randint(2, 4))]
        expr = " ".join([str(terms[0])] + [f"{rng.choice('+-')} {t}" for t in terms[1:]])
        gold = sum(parse_additive_expression(expr))
        for strategy in ("left_to_right", "group_signs", "direct"):
            assert verify(arithmetic_worked_solution(expr, strategy), str(gold)), (expr, strategy)


def test_gsm8k_worked_solution_real_row():
    import json

    row = json.loads(open("../shared/data/gsm8k/train.jsonl").readline())
    text = gsm8k_worked_solution(row["answer"])
    assert "<<" not in text and "####" not in text
    assert text.endswith("So the final answer is \\boxed{72}.")  # Natalia's clips: 48 + 24
    assert verify(text, "72")


def test_solution_for_field_and_errors():
    rng = random.Random(0)
    assert solution_for({"id": "a", "sol": "x \\boxed{1}"}, "sol", rng) == "x \\boxed{1}"
    with pytest.raises(ValueError, match="field 'sol'"):
        solution_for({"id": "a", "sol": ""}, "sol", rng)
    with pytest.raises(ValueError, match="no arithmetic expression"):
        solution_for({"id": "a", "gold_entry": ""}, "arithmetic", rng)


def test_length_bucketing_covers_and_groups():
    examples = [([0] * n, [0]) for n in [5, 1, 9, 3, 7, 2, 8, 4]]
    batches = length_bucketed_batches(examples, batch_size=2, bucket_factor=4, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    for b in batches:  # sorted within windows of 8: neighbours in length
        lens = sorted(len(examples[i][0]) for i in b)
        assert lens[1] - lens[0] <= 2


def test_gsm8k_examples_pair_each_problem_with_its_own_solution():
    from omegaconf import OmegaConf

    from hicra_rl.models import load_smollm2_tokenizer
    from hicra_rl.sft import SFTConfig, build_examples

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SFTConfig), {
        "solutions": "gsm8k", "data": {"name": "gsm8k", "source": "gsm8k", "split": "train", "size": 3,
                                       "max_prompt_tokens": 512}}))
    tok = load_smollm2_tokenizer()
    examples = build_examples(cfg, tok)
    texts = [tok.decode(r, skip_special_tokens=True) for _, r in examples]
    # GSM8K train rows 1-3: Natalia's clips (72), Weng's babysitting (10), Betty's wallet (5)
    assert [t.rsplit("\\boxed{", 1)[1] for t in texts] == ["72}.", "10}.", "5}."]
    assert "Natalia" in tok.decode(examples[0][0]) and "Weng" in tok.decode(examples[1][0])


def test_rendezvous_port_is_free_per_process_unless_a_launcher_set_it(monkeypatch):
    """Two single-process hicra-sft runs on one machine once both took port 29511 (EADDRINUSE)."""
    import socket

    from hicra_rl.errors import BadInputError
    from hicra_rl.sft import rendezvous_port

    monkeypatch.delenv("MASTER_PORT", raising=False)
    with socket.socket() as busy:  # a port in use is never handed out
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = rendezvous_port(1)
        assert port != busy.getsockname()[1] and 1024 <= port <= 65535
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # and it is free
    monkeypatch.setenv("MASTER_PORT", "29777")
    assert rendezvous_port(4) == 29777
    monkeypatch.delenv("MASTER_PORT")
    import pytest

    with pytest.raises(BadInputError, match="WORLD_SIZE is 2 but MASTER_PORT is not set"):
        rendezvous_port(2)
