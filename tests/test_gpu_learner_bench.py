"""benchmarks/gpu_learner.py: the FLOP / MFU arithmetic, the 1B config's size, the missing-DeepSpeed message,
and the CPU smoke run end to end (a subprocess, ~15 s)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_learner.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("gpu_learner.py")


def test_train_flops_by_hand(bench):
    # 6 * 1000 * 10 = 60000; attention 12 * 2 layers * 4 * (3^2 + 7^2) = 96 * 58 = 5568
    assert bench.train_flops(1000, 10, 2, 4, [3, 7]) == 65568.0
    assert bench.train_flops(1000, 10, 2, 4, []) == 60000.0
    # 64 sequences of 1024 tokens, SmolLM2-135M: 6 * 134515008 * 65536 + 12 * 30 * 576 * 64 * 1024^2
    assert bench.train_flops(134515008, 65536, 30, 576, [1024] * 64) == 52893453385728 + 13915694039040


def test_mfu_and_peak_lookup(bench):
    assert bench.mfu(494.5, 989.0) == pytest.approx(0.5)
    assert bench.mfu(10.0, None) is None
    assert bench.peak_tflops_for("NVIDIA H200") == 989.0
    assert bench.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops_for("NVIDIA L40S") == 362.0
    assert bench.peak_tflops_for("NVIDIA L4") == 121.0
    assert bench.peak_tflops_for("NVIDIA A10G") == 125.0
    assert bench.peak_tflops_for("Tesla T4") is None
    assert bench.peak_tflops_for(None) is None
    assert bench.peak_tflops_for(None, override=50.0) == 50.0
    assert bench.peak_tflops_for("NVIDIA H200", override=700.0) == 700.0


def test_model_sizes(bench):
    one_b = bench.llama_config("llama-1b")
    n = bench.count_params(one_b)  # meta device: no weights
    # by hand: 49152*2048 + 16 * (4*2048^2 + 3*2048*5632 + 2*2048) + 2048 (tied lm_head)
    assert n == 100663296 + 16 * (16777216 + 34603008 + 4096) + 2048 == 922814464
    assert abs(n - 1e9) <= 0.15e9
    assert bench.matmul_params(one_b, n) == n  # tied: the embedding is the lm_head's matmul
    one_b.tie_word_embeddings = False
    assert bench.matmul_params(one_b, n + 100663296) == n  # untied: the input embedding is a lookup
    assert bench.attn_dim(one_b) == 2048
    smol = bench.llama_config("smollm2-135m")
    assert bench.count_params(smol) == 134515008  # SmolLM2-135M's published count
    assert bench.attn_dim(smol) == 576


def test_missing_deepspeed_message(bench, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    assert bench.main(["--cpu-smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "pip install 'deepspeed>=0.19.8,<0.20' first" in err


def test_missing_peft_message_with_lora(bench, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert bench.missing_requirements() == []
    assert bench.main(["--cpu-smoke", "--lora"]) == 2
    assert "pip install 'peft>=0.21.2,<0.22' first" in capsys.readouterr().err


def test_cpu_smoke_writes_sane_json(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--json", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MFU n/a" in proc.stdout
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["peak_tflops"] is None
    (r,) = data["models"]
    assert r["model"] == "tiny" and r["dtype"] == "float32"
    assert len(r["update_s"]) == 2 and r["update_s_median"] > 0
    assert r["tokens_per_update"] == 8 * (16 + 24)
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_update"] / r["update_s_median"])
    assert r["tokens_per_s"] > 0 and r["tflops"] > 0
    assert r["flops_per_update"] == 6 * r["matmul_params"] * 320 + 12 * 2 * 64 * 8 * 40**2
    assert r["mfu"] is None and r["peak_mem_gib"] is None
    assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
    assert 0.0 < r["planning_frac"] < 0.4


def test_lora_train_flops_by_hand(bench):
    # frozen matmuls without weight gradients: 4 * 1000 * 10 = 40000; adapters 6 * 50 * 10 = 3000;
    # attention as in full fine-tuning: 12 * 2 * 4 * (3^2 + 7^2) = 5568
    assert bench.lora_train_flops(1000, 50, 10, 2, 4, [3, 7]) == 48568.0


def test_cpu_smoke_lora_writes_sane_json(tmp_path):
    """--lora: rank 2 on q_proj (64 -> 64) and v_proj (64 -> 32) of the tiny Llama: 2 (64 + 64) + 2 (64 + 32) = 448
    adapter parameters a layer, 896 in 2 layers; AdamW's two fp32 moments 2 x 896 x 4 = 7168 bytes."""
    out = tmp_path / "smoke.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--lora", "--lora-rank", "2",
                           "--lora-targets", "q_proj,v_proj", "--json", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LoRA rank 2: 0.00M trainable" in proc.stdout
    data = json.loads(out.read_text())
    assert data["lora"] == {"rank": 2, "alpha": 32.0, "target_modules": ["q_proj", "v_proj"]}
    assert data["flops_formula"].startswith("4*N*T + 6*N_lora*T")
    (r,) = data["models"]
    assert r["trainable_params"] == 896 and r["optimizer_state_bytes"] == 7168
    assert r["flops_per_update"] == 4 * r["matmul_params"] * 320 + 6 * 896 * 320 + 12 * 2 * 64 * 8 * 40**2
    assert math.isfinite(r["loss"]) and r["update_s_median"] > 0


def test_bad_lora_flags_are_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--lora", "--lora-rank", "-1"], cwd=tmp_path,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--lora-rank must be >= 1 with --lora, got -1" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--lora", "--lora-targets", "all-linear,q_proj"],
                          cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "config error at '--lora.target_modules': all-linear already means every linear layer" in proc.stderr
