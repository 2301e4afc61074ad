"""Atomic checkpoints of the policy learner: exact resume, HF export, crash safety, retention."""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from learner_fixtures import free_port, random_rows

from hicra_rl.config import LearnerConfig
from hicra_rl.learner import checkpoint as ckpt
from hicra_rl.learner.engine import PolicyBatch, PolicyLearner
from hicra_rl.learner.sequences import build_sequences

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def tiny_model(tiny_llama):
    with open(os.path.join(tiny_llama, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64}, f)  # stands for the tokenizer files to copy
    return tiny_llama


@pytest.fixture(scope="module")
def port():
    return free_port()


def fake_checkpoint(run_dir, name, manifest=True, step=None):
    path = run_dir / name
    path.mkdir(parents=True)
    if manifest:
        (path / ckpt.MANIFEST).write_text(json.dumps({"format": 1, "step": step, "world_size": 1, "zero_stage": 2}))
    return path


# ---------------------------------------------------------------------------- file-system rules
def test_find_latest_complete_ignores_incomplete_and_sorts_numerically(tmp_path):
    assert ckpt.find_latest_complete(tmp_path / "missing") is None
    fake_checkpoint(tmp_path, "step-5", step=5)
    fake_checkpoint(tmp_path, "step-20", step=20)
    fake_checkpoint(tmp_path, "step-30", manifest=False)        # interrupted before its manifest
    fake_checkpoint(tmp_path, ".tmp-step-40", step=40)          # interrupted before the rename
    fake_checkpoint(tmp_path, "step-41.bak", step=41)           # not a step folder
    assert ckpt.find_latest_complete(tmp_path) == tmp_path / "step-20"  # lexicographic order would say 5
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [5, 20]


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 10, 11):
        fake_checkpoint(tmp_path, f"step-{step}", step=step)
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert deleted == [tmp_path / "step-1", tmp_path / "step-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10", "step-11"]
    assert ckpt.prune_checkpoints(tmp_path, keep_last=5) == []


def test_bad_manifest_names_file_and_field(tmp_path):
    path = tmp_path / "step-1"
    path.mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint.json"):
        ckpt.read_manifest(path)
    (path / ckpt.MANIFEST).write_text(json.dumps({"format": 1, "step": 1, "world_size": 1}))
    with pytest.raises(ValueError, match=r"step-1/checkpoint.json: missing field 'zero_stage'"):
        ckpt.read_manifest(path)


# ---------------------------------------------------------------------------- with a learner
def make_batches(n: int):
    out = []
    for k in range(n):
        prompts, responses = random_rows(100 + k, [3, 5, 2, 4], [4, 2, 6, 3])
        ids, am, rm = build_sequences(prompts, responses, pad_id=0)
        adv = torch.randn(4, 6, generator=torch.Generator().manual_seed(200 + k))
        out.append((ids, am, rm, adv))
    return out


def train(learner, batches):
    """RL-style steps: old log-probs from the current policy, then an update."""
    stats = []
    for ids, am, rm, adv in batches:
        lp, _ = learner.compute_log_probs(ids, am, rm, width=adv.shape[1])
        stats.append(learner.update(PolicyBatch(ids, am, rm, lp - 0.1 * adv.sign(), adv)))
    return stats


def rng_draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


@pytest.mark.parametrize("stage", [2, 3])
def test_save_load_resumes_exactly(tiny_model, port, tmp_path, stage):
    """2 steps, save, load into a fresh learner, 2 more == 4 straight steps (losses, lr, weights)."""
    def config():
        return LearnerConfig(zero_stage=stage, lr=1e-2, weight_decay=0.1, micro_batch_size=2,
                             scheduler="cosine", warmup_steps=1, min_lr_ratio=0.1)

    batches = make_batches(4)
    straight = PolicyLearner(config(), model_path=tiny_model, total_steps=4, master_port=port)
    straight_stats = train(straight, batches)
    straight_weights = straight.full_state_dict()
    assert len({s["actor/lr"] for s in straight_stats}) == 4  # the schedule state matters

    first = PolicyLearner(config(), model_path=tiny_model, total_steps=4, master_port=port)
    first_stats = train(first, batches[:2])
    saved_weights = first.full_state_dict()
    path = ckpt.save_checkpoint(first, tmp_path, step=2, extra={"data_position": 8, "step": 2})
    expected_draws = rng_draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # scramble: load must restore

    resumed = PolicyLearner(config(), model_path=tiny_model, total_steps=4, master_port=port)
    assert ckpt.load_checkpoint(resumed, path) == {"data_position": 8, "step": 2}
    got_draws = rng_draws()
    assert got_draws[:2] == expected_draws[:2] and torch.equal(got_draws[2], expected_draws[2])
    assert resumed.global_steps == 2
    resumed_stats = train(resumed, batches[2:])

    for got, want in zip(first_stats + resumed_stats, straight_stats):
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/lr", "actor/clipfrac", "actor/entropy"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    resumed_weights = resumed.full_state_dict()
    for name, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, atol=1e-6, rtol=0, msg=name)

    # the HF folder is the policy at step 2, loadable as is, with the tokenizer files
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path / "hf").state_dict()
    assert set(hf) == set(saved_weights)
    for name, value in saved_weights.items():
        assert torch.equal(hf[name], value), name
    assert json.loads((path / "hf" / "tokenizer_config.json").read_text()) == {"model_max_length": 64}
    manifest = ckpt.read_manifest(path)
    assert (manifest["step"], manifest["global_steps"], manifest["zero_stage"]) == (2, 2, stage)
    assert (tmp_path / ckpt.LATEST).read_text().strip() == "step-2"


def test_interrupted_save_never_wins_and_retention(tiny_model, port, tmp_path, monkeypatch):
    learner = PolicyLearner(LearnerConfig(zero_stage=0, lr=1e-2), model_path=tiny_model, master_port=port)
    batches = make_batches(2)
    train(learner, batches[:1])
    ckpt.save_checkpoint(learner, tmp_path, step=1, extra={"pos": 1})

    real_replace = os.replace

    def crash_on_publish(src, dst):
        if os.path.basename(dst) == "step-2":
            raise OSError("simulated crash while publishing step-2")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_publish)
    train(learner, batches[1:])
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_checkpoint(learner, tmp_path, step=2, extra={"pos": 2})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert (tmp_path / ".tmp-step-2").is_dir()
    assert ckpt.find_latest_complete(tmp_path) == tmp_path / "step-1"
    assert (tmp_path / ckpt.LATEST).read_text().strip() == "step-1"

    # a retry of the same step replaces the leftover; keep_last prunes the older one
    ckpt.save_checkpoint(learner, tmp_path, step=2, extra={"pos": 2}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-2"]
    assert ckpt.find_latest_complete(tmp_path) == tmp_path / "step-2"
    # re-saving an existing step swaps it whole
    ckpt.save_checkpoint(learner, tmp_path, step=2, extra={"pos": 3}, keep_last=1)
    assert json.loads((tmp_path / "step-2" / "extra.json").read_text()) == {"pos": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-2"]

    with pytest.raises(TypeError):
        ckpt.save_checkpoint(learner, tmp_path, step=3, extra={"bad": object()})
    assert not (tmp_path / ".tmp-step-3").exists()

    # a checkpoint from another world size / stage is refused with the file and field named
    manifest = tmp_path / "step-2" / ckpt.MANIFEST
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "world_size": 2}))
    fresh = PolicyLearner(LearnerConfig(zero_stage=0), model_path=tiny_model, master_port=port)
    with pytest.raises(ValueError, match=r"checkpoint.json: field 'world_size' is 2, this learner has 1"):
        ckpt.load_checkpoint(fresh, tmp_path / "step-2")
    shutil.rmtree(tmp_path / "step-2")
