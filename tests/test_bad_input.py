"""Bad input gives a clear error naming the file / key / row / field (or a counted, reported skip), never a
deep traceback or a silent skip: config, data files, lexicons, model folders, tokenizers without a chat
template, and hostile model output to the verifier.  The table of what was tried is docs/bad-input.md."""
import json
import logging
import os
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from hydra import compose, initialize_config_dir

from hicra_rl.config import CONF_DIR, ConfigError, DataConfig, register_configs, to_schema
from hicra_rl.data.datasets import BadRowError, DatasetSpec, load_problems
from hicra_rl.data.prompts import prompt_text
from hicra_rl.data.setup import load_problem_set, load_prompts
from hicra_rl.models import resolve_model
from hicra_rl.rewards.math import verify
from hicra_rl.rewards.pool import TimeBoundedVerifier
from hicra_rl.strategic.lexicon import LexiconError, load_lexicon

register_configs()

GOOD = '{"problem": "What is 1+1?", "answer": "2"}'


def _spec(path, **kw):
    return DatasetSpec(name="mine", path=str(path), **kw)


# ---------------------------------------------------------------- config (validated in hicra_rl/config.py)


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        yield


def _load(*overrides):
    return to_schema(compose(config_name="config", overrides=list(overrides)))


def test_config_unknown_key_names_it(hydra_conf):
    with pytest.raises(ConfigError, match=r"(?s)Key 'grup_size' not in 'RolloutConfig'.*full_key: rollout\.grup_size"):
        _load("+rollout.grup_size=4")
    with pytest.raises(ConfigError, match=r"Key 'foo' not in 'TrainConfig'"):
        _load("+foo=1")


@pytest.mark.parametrize("overrides, message", [
    (["algorithm=grpo", "algorithm.hicra_alpha=0.2"],
     "config error at 'algorithm.hicra_alpha': algorithm 'grpo' must have hicra_alpha 0 (got 0.2)"),
    (["trainer.eval_every=2"], "config error at 'trainer.eval_every': is 2 but no eval_data is configured"),
    (["trainer.eval_before_after=true"],
     "config error at 'trainer.eval_before_after': is true but no eval_data is configured"),
    (["rollout.max_new_tokens=4000"],   # 256 + 4000 > 2048
     "config error at 'model.max_model_len': 2048 is shorter than data.max_prompt_tokens (256) + "
     "rollout.max_new_tokens (4000)"),
    (["reward.overlong_penalty=true", "reward.overlong_buffer=1000"],
     "config error at 'reward.overlong_buffer': must be in (0, rollout.max_new_tokens=128]"),
    (["strategic.lexicon=/nonexistent/lex.json"],
     "config error at 'strategic.lexicon': lexicon file '/nonexistent/lex.json' does not exist"),
    (["data.on_bad_row=ignore"], "config error at 'data.on_bad_row': must be error or skip"),
    (["trainer.resume=/nonexistent/ckpt"], "config error at 'trainer.resume': '/nonexistent/ckpt' is neither"),
])
def test_config_contradictions_name_the_key(hydra_conf, overrides, message):
    with pytest.raises(ConfigError) as info:
        _load(*overrides)
    assert message in str(info.value)


@pytest.mark.parametrize("override, key", [
    ("reward.answer_mode=latex", "reward.answer_mode"),
    ("data.source=csv", "data.source"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("logging.wandb_mode=loud", "logging.wandb_mode"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens"),
    ("trainer.keep_last=0", "trainer.keep_last"),
])
def test_config_values_are_validated_at_start(hydra_conf, override, key):
    with pytest.raises(ConfigError, match=f"config error at '{key}'"):
        _load(override)


# ---------------------------------------------------------------- data files


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"dataset 'mine': {tmp_path / 'nope.jsonl'} does not exist"):
        load_problems(_spec(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_data_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}: no rows \\(the source is empty or has only blank lines\\)"):
        load_problems(_spec(path))


def test_line_that_is_not_utf8_is_a_bad_row(tmp_path, caplog):
    path = tmp_path / "latin1.jsonl"
    # line 2 is Latin-1: "caf\xe9" -- the byte 0xe9 is the 17th of the line
    path.write_bytes(GOOD.encode() + b'\n{"problem": "caf\xe9", "answer": "1"}\n' + GOOD.encode() + b"\n")
    with pytest.raises(BadRowError) as info:
        load_problems(_spec(path))
    assert str(info.value) == f"{path}: row 2: field '<utf-8>': not UTF-8 text (byte 0xe9 at column 17)"
    with caplog.at_level(logging.WARNING, logger="hicra_rl.data.datasets"):
        problems = load_problems(_spec(path, on_bad_row="skip"))
    assert len(problems) == 2 and [(b.row, b.field) for b in problems.skipped] == [(2, "<utf-8>")]
    assert "skipped 1 bad row(s) of 3" in caplog.text


def test_line_that_is_not_json_is_a_bad_row(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(GOOD + '\n{"problem": }\n')   # '}' is the 13th character, where a value was expected
    with pytest.raises(BadRowError) as info:
        load_problems(_spec(path))
    assert str(info.value) == f"{path}: row 2: field '<json>': not valid JSON at column 13: Expecting value"


def test_row_missing_a_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(GOOD + '\n{"problem": "What is 2+2?"}\n')
    with pytest.raises(BadRowError) as info:
        load_problems(_spec(path))
    assert str(info.value) == f"{path}: row 2: field 'answer': missing"


def test_every_row_bad_with_skip_names_the_first(tmp_path):
    path = tmp_path / "allbad.jsonl"
    path.write_text('{"problem": "a"}\n{"problem": "b"}\n')
    with pytest.raises(ValueError, match=rf"{path}: no usable rows \(all 2 skipped as bad, first: {path}: row 1: "
                                         r"field 'answer': missing\)"):
        load_problems(_spec(path, on_bad_row="skip"))


def test_json_array_file_is_read_and_its_bad_item_named(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([json.loads(GOOD), {"problem": "What is 3+3?", "answer": 6}], indent=1))
    with pytest.raises(BadRowError, match=rf"{path}: row 2: field 'answer': expected a string, got int 6"):
        load_problems(_spec(path))
    assert load_problems(_spec(path, cast_answer=True)).rows["answer"] == ["2", "6"]


def test_parquet_that_is_not_parquet(tmp_path):
    junk, empty = tmp_path / "junk.parquet", tmp_path / "empty.parquet"
    junk.write_text("not parquet at all")
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"dataset 'mine': {junk} is not a readable Parquet file: ArrowInvalid"):
        load_problems(_spec(junk))
    with pytest.raises(ValueError, match=rf"dataset 'mine': {empty} is empty \(0 bytes\), not a Parquet file"):
        load_problems(_spec(empty))


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(ValueError, match=f"dataset 'mine': {tmp_path} is a directory but not a save_to_disk dataset"):
        load_problems(_spec(tmp_path))


def test_data_config_unknown_field_map_key(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(GOOD + "\n")
    cfg = DataConfig(name="mine", source="jsonl", path=str(path), fields={"question": "q"})
    with pytest.raises(ValueError, match=r"data 'mine': data.fields has unknown key\(s\) \['question'\]; known: "
                                         "problem, answer, id, subject, level"):
        load_problem_set(cfg, seed=0, role="train")


def test_data_config_negative_size(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(GOOD + "\n")
    cfg = DataConfig(name="mine", source="jsonl", path=str(path), size=-5)
    with pytest.raises(ValueError, match=r"data 'mine': data.size must be >= 0 \(0: every row of the file\), got -5"):
        load_problem_set(cfg, seed=0, role="train")


def test_data_config_task_config_reasoning_gym_rejects():
    cfg = DataConfig(name="arith", task="basic_arithmetic", size=4, task_config={"min_terms": 0})
    with pytest.raises(ValueError, match=r"data 'arith': reasoning-gym task 'basic_arithmetic' rejected "
                                         r"data.task_config=\{'min_terms': 0\}: AssertionError: min_terms must be positive"):
        load_problem_set(cfg, seed=0, role="train")


def test_data_config_unknown_source_and_task():
    with pytest.raises(ValueError, match=r"data 'mine': data.source 'csv' is not one of reasoning_gym, gsm8k, math500, "
                                         r"dapo_math_17k, deepscaler, file \(or jsonl / parquet / disk\), hub"):
        load_problem_set(DataConfig(name="mine", source="csv", path="x.csv"), seed=0, role="train")
    with pytest.raises(ValueError, match="data 'arith': unknown reasoning-gym task 'no_such_task'; known: ab, acre"):
        load_problem_set(DataConfig(name="arith", task="no_such_task", size=4), seed=0, role="train")


def test_data_config_zero_prompt_tokens():
    cfg = DataConfig(name="arith", task="basic_arithmetic", size=4, max_prompt_tokens=0)
    with pytest.raises(ValueError, match="data 'arith': data.max_prompt_tokens must be > 0, got 0"):
        load_prompts(cfg, tokenizer=None, seed=0, role="train")


# ---------------------------------------------------------------- lexicons


@pytest.mark.parametrize("content, message", [
    ('{"entries": [', "invalid JSON at line 1, column 14: Expecting value"),
    ("", "lexicon file is empty (expected a JSON object with field 'entries')"),
    ("  \n", "lexicon file is empty (expected a JSON object with field 'entries')"),
    ('{"entries": []}', "lexicon is empty (field 'entries' has no n-gram)"),
    ('["the total number of"]', "top level must be a JSON object, got list"),
    ('{"ngrams": ["the total number of"]}', "missing field 'entries'"),
    ('{"entries": ["the total number of"]}',
     "entry 0: must be an object with fields 'ngram' and 'cluster', got 'the total number of'"),
    ('{"entries": [{"ngram": "the total number of"}]}', "entry 0: missing field 'cluster'"),
    ('{"format": "x/2", "entries": []}', "field 'format' is 'x/2'; expected 'hicra-sg-lexicon/1'"),
])
def test_bad_lexicon_files(tmp_path, content, message):
    path = tmp_path / "lex.json"
    path.write_text(content)
    with pytest.raises(LexiconError) as info:
        load_lexicon(path)
    assert str(info.value) == f"{path}: {message}"


def test_lexicon_path_that_is_a_directory(tmp_path):
    with pytest.raises(LexiconError, match=f"{tmp_path}: cannot read the lexicon file \\(Is a directory\\)"):
        load_lexicon(tmp_path)


# ---------------------------------------------------------------- model folders and tokenizers


def test_model_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model path '{tmp_path / 'nope'}' is not an existing directory"):
        resolve_model(str(tmp_path / "nope"))


def test_model_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(str(tmp_path))
    assert str(info.value) == (
        f"model directory '{tmp_path}' is not a Hugging Face model folder: it lacks config.json; weights "
        "(*.safetensors / *.bin); tokenizer files (one of tokenizer.json, tokenizer.model, vocab.json, "
        "tokenizer_config.json)")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="it lacks tokenizer files"):
        resolve_model(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_tokenizer_without_chat_template_names_the_model():
    tokenizer = SimpleNamespace(chat_template=None, name_or_path="/models/qwen2.5-7b-base")
    with pytest.raises(ValueError, match="tokenizer SimpleNamespace of '/models/qwen2.5-7b-base' has no chat template "
                                         r"\(its tokenizer_config.json has no 'chat_template'"):
        prompt_text(tokenizer, "What is 1+1?")


# ---------------------------------------------------------------- hostile model output to the verifier

LIMIT_S = 1.5
TOWER = r"\boxed{9^{9^{9^{9^{9}}}}}"
NESTED = r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"
MEGABYTE = r"\boxed{" + "1" * 1_000_000 + "}"


@pytest.fixture(scope="module")
def pool():
    with TimeBoundedVerifier(time_limit_s=LIMIT_S, num_workers=1) as v:
        yield v


def test_hostile_answers_through_the_pool_are_bounded(pool):
    items = [
        (TOWER, "3", "math"),                                   # sympy's power tower: timeout
        (r"\boxed{10^{10^{10}}}", "3", "math"),                 # 10^(10^10): timeout
        (NESTED, "1", "math"),                                  # 5000 nested braces
        (MEGABYTE, "1", "math"),                                # a 1 MB number
        ("\x00\x01 so " + r"\boxed{4}" + "\x00", "4", "math"),  # NUL / control bytes around the box
        ("\\boxed{4\x00}", "4", "math"),                        # a NUL inside the answer
        ("\\boxed{\x1b[31m5\x1b[0m}", "5", "math"),             # ANSI escapes inside the answer
        (r"\boxed{" + "{" * 5000 + "1", "1", "math"),           # unbalanced: no answer at all
        (r"fine: \boxed{7}", "7", "math"),                      # the pool goes on
    ]
    start = time.monotonic()
    results = pool.score_batch(items)
    elapsed = time.monotonic() - start
    assert [r.reward for r in results] == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert results[0].timed_out and results[1].timed_out and results[3].timed_out
    assert results[0].extracted == "9^{9^{9^{9^{9}}}}" and len(results[3].extracted) == 1_000_000
    assert results[7].extracted is None and not results[7].timed_out
    assert all(r.seconds < LIMIT_S + 2.0 for r in results)
    assert all(r.error is None for r in results)
    # four limits, plus killing the overrunning workers and starting spares (seconds on a loaded 2-core machine)
    assert elapsed < 4 * LIMIT_S + 20.0


@pytest.mark.parametrize("response, gold, expected", [
    (TOWER, "3", False),
    (MEGABYTE, "1", False),
    ("\x00\x01 so " + r"\boxed{4}" + "\x00", "4", True),
    ("\\boxed{\x1b[31m5\x1b[0m}", "5", False),
])
def test_hostile_answers_through_verify_are_bounded(response, gold, expected):
    verify(r"\boxed{1}", "1", timeout_s=LIMIT_S)  # start verify()'s worker outside the timed part
    start = time.monotonic()
    assert verify(response, gold, timeout_s=LIMIT_S) is expected
    assert time.monotonic() - start < LIMIT_S + 5.0
