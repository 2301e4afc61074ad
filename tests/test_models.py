"""Model preparation: tiny test model, SmolLM2 GGUF dequantisation + cache, model-name resolution."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hicra_rl import models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# ---------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    a = models.build_tiny_model(root / "a", seed=0)
    b = models.build_tiny_model(root / "b", seed=0)
    c = models.build_tiny_model(root / "c", seed=1)
    return a, b, c


def test_tiny_model_is_deterministic_for_a_seed(tiny_dirs):
    a, b, c = (_load(p).state_dict() for p in tiny_dirs)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_tiny_model_has_smollm2_vocab_tied_embeddings_and_chat_template(tiny_dirs):
    from transformers import AutoTokenizer

    path = tiny_dirs[0]
    model = _load(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) == 49152
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    # SmolLM2's ChatML template, its special tokens and its default system prompt
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert model.config.eos_token_id == tok.eos_token_id == 2
    ids = tok("12 + 7 = 19", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    # random init with std 0.02 gives a near-uniform next-token distribution: log(1/49152) = -10.80
    mean_logprob = torch.log_softmax(logits, -1).mean().item()
    assert mean_logprob == pytest.approx(-10.80, abs=0.05)


def test_tiny_model_rejects_head_layout_that_does_not_divide(tmp_path):
    with pytest.raises(ValueError, match="hidden_size=64 must divide by num_heads=3"):
        models.build_tiny_model(tmp_path / "bad", num_heads=3)


# ---------------------------------------------------------------- atomic directory writes
def test_atomic_write_leaves_no_half_directory_when_the_writer_fails(tmp_path):
    final = tmp_path / "model"

    def write_then_fail(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        models.write_dir_atomically(final, write_then_fail)
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_stale_tmp_dirs_of_dead_runs_but_not_of_live_ones(tmp_path):
    final = tmp_path / "model"
    stale = tmp_path / f".model.tmp-{_dead_pid()}-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("half")
    live = tmp_path / f".model.tmp-{os.getpid()}-0000live"
    live.mkdir()

    def write(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"\x01\x02")

    models.write_dir_atomically(final, write)
    assert (final / "weights.bin").read_bytes() == b"\x01\x02"
    assert not stale.exists()
    assert live.exists()  # a concurrent writer's dir is left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model"]


def test_build_tiny_model_refuses_to_overwrite_a_foreign_directory(tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model folder"):
        models.build_tiny_model(foreign)
    assert (foreign / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- resolve_model
def test_resolve_model_local_directory_is_returned_as_is(tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


def test_resolve_model_local_directory_without_model_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a Hugging Face model folder: it lacks config.json"):
        models.resolve_model(str(tmp_path))


def test_resolve_model_missing_local_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        models.resolve_model(str(tmp_path / "nope"))


def test_resolve_model_hub_name_offline_says_it_needs_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty HF cache
    with pytest.raises(ValueError, match="needs network access"):
        models.resolve_model("some-org/some-model-that-is-not-cached")


def test_resolve_model_hub_name_online_is_passed_through(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---------------------------------------------------------------- SmolLM2 (dequantise the packaged GGUF)
@pytest.fixture
def smollm2_cache(tmp_path):
    """An empty cache root; the 517 MB model written there is deleted afterwards (pytest keeps tmp dirs)."""
    yield tmp_path
    shutil.rmtree(tmp_path / "models", ignore_errors=True)


@pytest.mark.slow
def test_prepare_smollm2_dequantises_once_then_reuses_the_cache(smollm2_cache, monkeypatch):
    tmp_path = smollm2_cache
    import gguf
    from gguf import GGUFReader

    monkeypatch.setenv("HICRA_CACHE", str(tmp_path))
    stale = tmp_path / "models" / f".{models.SMOLLM2_DIRNAME}.tmp-{_dead_pid()}-0badc0de"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")

    path = models.prepare_smollm2()
    assert path == str(tmp_path / "models" / models.SMOLLM2_DIRNAME)
    assert not stale.exists()
    weights = Path(path) / "model.safetensors"
    assert 500e6 < weights.stat().st_size < 560e6  # 134.5M fp32 params, lm_head tied (stored once)

    # a second call (also through the alias) reuses the folder without rewriting it
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert models.resolve_model("smollm2-135m-instruct") == path
    assert models.prepare_smollm2(tmp_path / "models") == path
    assert time.perf_counter() - t0 < 1.0
    assert weights.stat().st_mtime_ns == mtime

    model = _load(path)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # the embedding equals the GGUF tensor dequantised independently by the gguf package
    reader = GGUFReader(str(models.smollm2_gguf_path()))
    (emb,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    expected = torch.from_numpy(gguf.dequantize(emb.data, emb.tensor_type)).reshape(49152, 576)
    assert torch.equal(model.model.embed_tokens.weight.detach(), expected.float())

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
