"""The Hydra config tree (conf/) composed with Hydra's compose API, the typed schema's validation, the
`hicra-train --cfg job` entry point, and the up-front Ray resource check."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hicra_rl.config import ConfigError, TrainConfig, register_configs, to_schema

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
HICRA_TRAIN = Path(sys.executable).parent / "hicra-train"
GROUPS = ("algorithm", "model", "data", "cluster")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
PAPER_PRESETS = sorted(p.stem for p in (CONF / "paper").glob("*.yaml"))

register_configs()


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        yield


def load(*overrides: str) -> TrainConfig:
    return to_schema(compose(config_name="config", overrides=list(overrides)))


# ---------------------------------------------------------------- every option composes and validates
def test_the_groups_have_the_expected_options():
    found = {g: sorted(o for gg, o in OPTIONS if gg == g) for g in GROUPS}
    assert found["algorithm"] == ["dr_grpo", "entropy_reg", "grpo", "hicra", "hicra_adaptive"]
    assert {"smollm2_135m", "qwen2.5_7b_base", "qwen3_4b_base", "qwen3_4b_instruct"} <= set(found["model"])
    assert {"local_cpu", "single_node_gpu", "multi_node"} <= set(found["cluster"])
    assert {"arith", "gsm8k", "math500", "dapo_math_17k", "deepscaler"} <= set(found["data"])
    assert {"math_8gpu", "qwen2.5_7b_base", "qwen3_4b_base", "qwen3_4b_instruct"} <= set(PAPER_PRESETS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_validates(hydra_conf, group, option):
    cfg = load(f"{group}={option}")
    # the option's `name` is what run_dir and wandb use: it must say which file it came from
    assert getattr(cfg, group).name == option
    assert cfg.trainer.run_dir == f"runs/{cfg.algorithm.name}-{cfg.model.name}-{cfg.data.name}"


SHARED = [(g, o) for g, o in OPTIONS if g in ("model", "data", "cluster")]


@pytest.mark.parametrize("group,option", SHARED, ids=[f"{g}={o}" for g, o in SHARED])
def test_model_data_cluster_options_also_compose_into_hicra_eval(hydra_conf, group, option):
    from hydra.core.config_store import ConfigStore

    from hicra_rl.evaluation import EvalConfig, validate_eval

    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)  # what hicra-eval's main registers
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig),
                                              compose(config_name="eval", overrides=[f"{group}={option}"])))
    validate_eval(cfg)
    assert getattr(cfg, group).name == option and cfg.temperature == 0.6


def test_defaults_are_the_cpu_setup(hydra_conf):
    cfg = load()
    assert (cfg.algorithm.name, cfg.model.name, cfg.data.name, cfg.cluster.name) == (
        "hicra", "smollm2_135m", "arith", "local_cpu")
    assert cfg.trainer.run_dir == "runs/hicra-smollm2_135m-arith"
    # the CPU default packs prompt groups (short sequences); the GPU presets (long responses) do not
    assert cfg.learner.shared_prefix and cfg.learner.micro_batch_size == 16
    assert not load("+paper=math_8gpu").learner.shared_prefix


@pytest.mark.parametrize("model,hub_name", [("qwen2.5_7b_base", "Qwen/Qwen2.5-7B"),
                                            ("qwen3_4b_base", "Qwen/Qwen3-4B-Base"),
                                            ("qwen3_4b_instruct", "Qwen/Qwen3-4B-Instruct-2507")])
def test_model_presets_are_bf16_hub_models(hydra_conf, model, hub_name):
    cfg = load(f"model={model}", "cluster=single_node_gpu")
    assert (cfg.model.path, cfg.model.dtype, cfg.cluster.device) == (hub_name, "bfloat16", "cuda")


def test_data_presets_read_under_hicra_data_root(hydra_conf, monkeypatch):
    monkeypatch.setenv("HICRA_DATA_ROOT", "/mnt/shared/data")
    dapo = load("data=dapo_math_17k").data
    assert (dapo.source, dapo.path) == ("dapo_math_17k", "/mnt/shared/data/dapo-math-17k/data/dapo-math-17k.parquet")
    deepscaler = load("data=deepscaler").data
    assert (deepscaler.source, deepscaler.path) == ("deepscaler", "/mnt/shared/data/deepscaler/train.parquet")
    monkeypatch.delenv("HICRA_DATA_ROOT")
    assert load("data=deepscaler").data.path == "/data/deepscaler/train.parquet"


def test_data_presets_load_a_parquet_file_through_the_real_loader(tmp_path):
    """The dapo_math_17k group's source/field mapping on a 2-row Parquet file in the published layout."""
    import datasets

    from hicra_rl.config import DataConfig
    from hicra_rl.data.setup import load_problem_set

    wrapper = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
    rows = [{"prompt": [{"role": "user", "content": wrapper + "What is 2+3?\n\nRemember to put your answer on its "
                         "own line after \"Answer:\"."}],
             "reward_model": {"ground_truth": "5", "style": "rule"}, "extra_info": {"index": "a1"}},
            {"prompt": [{"role": "user", "content": wrapper + "What is 7*6?\n\nRemember to put your answer on its "
                         "own line after \"Answer:\"."}],
             "reward_model": {"ground_truth": "42", "style": "rule"}, "extra_info": {"index": "a2"}}]
    path = tmp_path / "dapo.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig),
                                              OmegaConf.load(CONF / "data" / "dapo_math_17k.yaml"),
                                              {"path": str(path)}))
    problems = load_problem_set(cfg, seed=0)
    assert [(r["problem"], r["answer"]) for r in problems.rows] == [("What is 2+3?", "5"), ("What is 7*6?", "42")]


# ---------------------------------------------------------------- the paper presets
PRESET_MODEL = {"math_8gpu": "smollm2-135m-instruct", "qwen2.5_7b_base": "Qwen/Qwen2.5-7B",
                "qwen3_4b_base": "Qwen/Qwen3-4B-Base", "qwen3_4b_instruct": "Qwen/Qwen3-4B-Instruct-2507"}


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_hold_the_paper_settings_and_fit_8_gpus(hydra_conf, preset):
    cfg = load(f"+paper={preset}")
    a = cfg.algorithm
    # the paper's: HICRA alpha 0.2, clip-higher 0.2 / 0.28, evaluation at T = 0.6
    assert (a.name, a.hicra_alpha, a.clip_ratio_low, a.clip_ratio_high) == ("hicra", 0.2, 0.2, 0.28)
    assert cfg.trainer.eval_temperature == 0.6
    assert cfg.eval_data is not None and cfg.eval_data.source == "math500" and cfg.trainer.eval_every > 0
    assert cfg.model.path == PRESET_MODEL[preset]
    assert (cfg.cluster.name, cfg.cluster.device, cfg.data.name) == ("single_node_gpu", "cuda", "dapo_math_17k")
    # one learner rank + one vLLM engine on each of 8 GPUs: 8 x 0.5 + 8 x 0.5 = 8 GPUs
    r, l, c = cfg.rollout, cfg.learner, cfg.cluster
    assert l.num_ranks * c.gpus_per_learner + r.num_workers * c.gpus_per_rollout_worker * r.tensor_parallel_size == 8
    # every preset gives each rank 16 responses per mini-batch (hand-computed per file: 512/(8x4), 256/(8x2))
    assert r.prompts_per_step * r.group_size // (l.num_ranks * l.mini_batches_per_step) == 16
    if preset != "math_8gpu":  # prompt + response must fit the model's context
        assert cfg.data.max_prompt_tokens + r.max_new_tokens <= cfg.model.max_model_len
    assert cfg.model.dtype == ("float32" if preset == "math_8gpu" else "bfloat16")


def test_paper_preset_with_the_grpo_baseline(hydra_conf):
    cfg = load("+paper=qwen3_4b_base", "algorithm=grpo")
    assert (cfg.algorithm.name, cfg.algorithm.hicra_alpha, cfg.algorithm.clip_ratio_high) == ("grpo", 0.0, 0.28)
    assert cfg.model.name == "qwen3_4b_base"
    assert cfg.trainer.run_dir == "runs/grpo-qwen3_4b_base-dapo_math_17k"


def test_paper_preset_values_yield_to_the_command_line(hydra_conf):
    cfg = load("+paper=qwen3_4b_base", "rollout.max_new_tokens=1024", "trainer.total_steps=3")
    assert (cfg.rollout.max_new_tokens, cfg.trainer.total_steps, cfg.rollout.group_size) == (1024, 3, 8)


# ---------------------------------------------------------------- command-line style overrides
def test_command_line_overrides_apply(hydra_conf, tmp_path):
    lexicon = tmp_path / "sg.json"
    lexicon.write_text("{}")
    cfg = load("algorithm=grpo", "model=qwen3_4b_base", "cluster=single_node_gpu", "rollout.group_size=8",
               "learner.lr=3e-6", "rollout.stop=[e,'\n\n']", "algorithm.entropy_coef=0.01",
               f"strategic.lexicon={lexicon}")
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.entropy_coef == 0.01
    assert cfg.rollout.group_size == 8 and cfg.learner.lr == 3e-6
    assert cfg.rollout.stop == ["e", "\n\n"]
    assert cfg.strategic.lexicon == str(lexicon)
    assert cfg.trainer.run_dir == "runs/grpo-qwen3_4b_base-arith"
    assert cfg.cluster.gpus_per_learner == 0.5


def test_cli_cfg_job_prints_the_resolved_config_without_training(tmp_path):
    t0 = time.monotonic()
    out = subprocess.run([str(HICRA_TRAIN), "algorithm=dr_grpo", "rollout.group_size=6", "model=qwen3_4b_base",
                          "--cfg", "job", "--resolve"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed.algorithm.name == "dr_grpo"
    assert printed.algorithm.loss_agg_mode == "seq-mean-token-sum-norm"
    assert printed.rollout.group_size == 6
    assert printed.model.path == "Qwen/Qwen3-4B-Base"
    assert printed.trainer.run_dir == "runs/dr_grpo-qwen3_4b_base-arith"  # --resolve resolved it
    assert "hydra" not in printed
    assert not (tmp_path / "runs").exists(), "--cfg job must not start a run"
    assert elapsed < 60, f"--cfg job took {elapsed:.0f} s"


def test_cli_rejects_an_invalid_value_before_starting_anything(tmp_path):
    out = subprocess.run([str(HICRA_TRAIN), "algorithm.hicra_alpha=1.5", f"trainer.run_dir={tmp_path / 'run'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert "config error at 'algorithm.hicra_alpha': must be in [0, 1], got 1.5" in out.stderr
    assert not (tmp_path / "run" / "config.json").exists()


def test_cli_rejects_an_unknown_key(tmp_path):
    out = subprocess.run([str(HICRA_TRAIN), "rollout.grup_size=4", "--cfg", "job"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0
    assert "rollout.grup_size" in out.stderr


# ---------------------------------------------------------------- clear errors naming the key
def _raises_naming(key: str, fragment: str, *overrides: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(*overrides)
    assert f"config error at '{key}'" in str(err.value)
    assert fragment in str(err.value)


def test_unknown_key_in_a_config_is_a_config_error_naming_it():
    with pytest.raises(ConfigError) as err:
        to_schema(OmegaConf.create({"rollout": {"grup_size": 4}}))
    assert "grup_size" in str(err.value) and "rollout.grup_size" in str(err.value)


def test_appended_unknown_key_is_a_config_error(hydra_conf):
    try:
        cfg = load("+rollout.grup_size=4")
    except ConfigError as err:
        assert "rollout.grup_size" in str(err)
        return
    raise AssertionError(f"'+rollout.grup_size=4' was accepted: {cfg.rollout}")


@pytest.mark.parametrize("value", ["1.5", "1.0000001", "-0.1", "2"])
def test_alpha_outside_zero_one(hydra_conf, value):
    _raises_naming("algorithm.hicra_alpha", f"must be in [0, 1], got {float(value)}",
                   f"algorithm.hicra_alpha={value}")


@pytest.mark.parametrize("algorithm", ["hicra", "hicra_adaptive"])
def test_alpha_one_is_accepted(hydra_conf, algorithm):
    # alpha = 1: a failure's planning tokens get advantage 0 (docs/hicra_law.md); alpha > 1 would flip their sign
    assert load(f"algorithm={algorithm}", "algorithm.hicra_alpha=1.0").algorithm.hicra_alpha == 1.0


def test_alpha_on_a_baseline_algorithm(hydra_conf):
    _raises_naming("algorithm.hicra_alpha", "algorithm 'grpo' must have hicra_alpha 0 (got 0.2)",
                   "algorithm=grpo", "algorithm.hicra_alpha=0.2")


@pytest.mark.parametrize("g", ["1", "0"])
def test_group_size_below_two(hydra_conf, g):
    _raises_naming("rollout.group_size", f"at least 2 responses per prompt, got {g}", f"rollout.group_size={g}")


def test_micro_batches_that_do_not_divide(hydra_conf):
    # 2 prompts x 3 responses = 6 per rank and mini-batch; 6 % 4 != 0
    _raises_naming("learner.micro_batch_size", "6 responses per rank and mini-batch do not divide into "
                   "micro-batches of 4", "rollout.prompts_per_step=2", "rollout.group_size=3",
                   "learner.micro_batch_size=4")


def test_ranks_and_mini_batches_that_do_not_divide(hydra_conf):
    # 3 prompts x 2 responses = 6 responses over 4 ranks x 1 mini-batch
    _raises_naming("learner.mini_batches_per_step", "batch of 6 responses (prompts_per_step x group_size) does "
                   "not divide into 4 ranks x 1 mini-batches", "rollout.prompts_per_step=3",
                   "rollout.group_size=2", "learner.num_ranks=4")
    # 8 x 4 = 32 responses over 2 ranks x 3 mini-batches
    _raises_naming("learner.mini_batches_per_step", "batch of 32 responses", "rollout.prompts_per_step=8", "learner.num_ranks=2",
                   "learner.mini_batches_per_step=3")


def test_batch_sizes_that_divide_pass(hydra_conf):
    cfg = load("rollout.prompts_per_step=2", "rollout.group_size=3", "learner.micro_batch_size=3")
    assert cfg.learner.micro_batch_size == 3


def test_lexicon_file_that_does_not_exist(hydra_conf, tmp_path):
    missing = tmp_path / "no_such_lexicon.json"
    _raises_naming("strategic.lexicon", f"lexicon file '{missing}' does not exist", f"strategic.lexicon={missing}")


# ---------------------------------------------------------------- the cluster is too small: fail at once
def test_reserve_more_gpus_than_the_cluster_has_fails_at_once():
    import ray

    from hicra_rl.cluster import reserve

    # what cluster=single_node_gpu with 8 learner ranks and 8 rollout workers asks for
    bundles = {f"learner{i}": {"CPU": 2.0, "GPU": 0.5} for i in range(8)}
    bundles.update({f"rollout{i}": {"CPU": 2.0, "GPU": 0.5} for i in range(8)})
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(ValueError) as err:
            reserve(bundles, timeout_s=120)
        assert time.monotonic() - t0 < 10, "the impossible request must fail before waiting"
        assert "GPU: need 8, cluster has 0" in str(err.value)
        assert "CPU: need 32, cluster has 2" in str(err.value)
        # a request that fits is reserved
        ok = reserve({"learner0": {"CPU": 1.0}, "metrics": {"CPU": 0.25}}, timeout_s=60)
        ok.release()
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- the registries are the truth
def test_a_newly_registered_estimator_aggregation_and_kl_are_accepted(hydra_conf):
    """Validation reads the registries in hicra_rl.algo: registering is all a new estimator needs."""
    import torch

    from hicra_rl.algo import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, compute_advantages
    from hicra_rl.algo.advantages import register_advantage
    from hicra_rl.algo.losses import register_aggregation, register_kl_estimator

    _raises_naming("algorithm.advantage_estimator", "unknown estimator 'rloo_test'",
                   "algorithm.advantage_estimator=rloo_test")
    try:
        @register_advantage("rloo_test")
        def rloo(rewards, group_ids, **_):  # leave-one-out baseline: R_i - mean of the others
            n = rewards.numel()
            return rewards - (rewards.sum() - rewards) / (n - 1)

        register_aggregation("sum_test")(lambda loss_mat, mask, **_: (loss_mat * mask).sum())
        register_kl_estimator("k2_test")(lambda log_ratio: 0.5 * log_ratio ** 2)
        cfg = load("algorithm.advantage_estimator=rloo_test", "algorithm.loss_agg_mode=sum_test",
                   "algorithm.kl_estimator=k2_test")
        assert (cfg.algorithm.advantage_estimator, cfg.algorithm.loss_agg_mode) == ("rloo_test", "sum_test")
        # [1, 0, 0]: 1 - 0 = 1, 0 - 0.5 = -0.5 (x2)
        assert compute_advantages("rloo_test", torch.tensor([1.0, 0.0, 0.0]), [0, 0, 0]).tolist() == [1.0, -0.5, -0.5]
    finally:
        ADVANTAGE_ESTIMATORS.pop("rloo_test", None)
        LOSS_AGGREGATIONS.pop("sum_test", None)
        KL_ESTIMATORS.pop("k2_test", None)
    _raises_naming("algorithm.kl_estimator", "unknown estimator 'k2_test'", "algorithm.kl_estimator=k2_test")


def test_one_learner_config_type():
    """hicra-train's `learner` group and the DeepSpeed learner take the same class (no bridge)."""
    import inspect

    from hicra_rl.config import LearnerConfig
    from hicra_rl.learner import engine

    assert TrainConfig().learner.__class__ is LearnerConfig
    assert inspect.signature(engine.PolicyLearner).parameters["cfg"].annotation in ("LearnerConfig", LearnerConfig)
    assert not hasattr(engine, "LearnerConfig") or engine.LearnerConfig is LearnerConfig


def test_float16_is_rejected_for_train_and_sft(hydra_conf):
    """vLLM would sample in fp16 while the learner trained in fp32: the two must agree."""
    from hicra_rl.sft import SFTConfig, validate_sft

    _raises_naming("model.dtype", "'float16' is not one of ('float32', 'bfloat16')", "model.dtype=float16",
                   "cluster=single_node_gpu")
    cfg = SFTConfig()
    cfg.model.dtype = "float16"
    with pytest.raises(ConfigError, match="model.dtype"):
        validate_sft(cfg)


def test_schema_default_lexicon_is_the_default_data_groups(hydra_conf):
    """TrainConfig() built in code and `hicra-train` with no overrides tag with the same lexicon."""
    from hicra_rl.config import lexicon_path

    composed = load()
    assert composed.data.name == TrainConfig().data.name == "arith"
    assert lexicon_path(TrainConfig()) == lexicon_path(composed)
    assert lexicon_path(TrainConfig()).endswith("arith_lexicon.json")


def test_dr_grpo_loss_normaliser_is_the_generation_budget(hydra_conf):
    from hicra_rl.config import policy_loss_config

    cfg = load("algorithm=dr_grpo", "rollout.max_new_tokens=96")
    loss = policy_loss_config(cfg)
    assert (loss.agg_mode, loss.norm_constant) == ("seq-mean-token-sum-norm", 96.0)


def test_comparison_preset_composes_for_every_algorithm(hydra_conf):
    """`hicra-train -m +experiment=compare_cpu ...`: one run dir per algorithm and seed, the same held-out
    evaluation for all, and the learner layout the committed runs used."""
    for algorithm in ("hicra", "grpo", "entropy_reg"):
        cfg = load("+experiment=compare_cpu", f"algorithm={algorithm}", "trainer.seed=2")
        assert cfg.trainer.run_dir == f"runs/compare_cpu/{algorithm}-s2"
        assert (cfg.eval_data.size, cfg.eval_data.seed, cfg.trainer.eval_every, cfg.trainer.total_steps) == (128, 0, 5, 10)
        assert not cfg.learner.shared_prefix and cfg.learner.micro_batch_size == 4


def test_lora_adapter_transport_needs_a_lora_learner_and_picks_vllms_rank(hydra_conf):
    from hicra_rl.config import validate, vllm_max_lora_rank

    with pytest.raises(ConfigError, match="config error at 'rollout.weight_transport': lora_adapter sends the LoRA"):
        load("rollout.weight_transport=lora_adapter")
    cfg = load("rollout.weight_transport=lora_adapter", "learner.lora.rank=16")
    validate(cfg)
    with pytest.raises(ConfigError, match=r"config error at 'learner.lora.rank': vLLM's LoRA path \(rollout.weight_transport=lora_adapter\) holds ranks up to 512, got 600"):
        load("rollout.weight_transport=lora_adapter", "learner.lora.rank=600")
    with pytest.raises(ConfigError, match="must be shm_file, broadcast or lora_adapter"):
        load("rollout.weight_transport=adapters")
    # vLLM accepts max_lora_rank in {1, 8, 16, 32, 64, 128, 256, 320, 512}: the smallest that holds the rank
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 300, 321, 512)] == [1, 8, 8, 16, 16, 32, 320, 512, 512]
    with pytest.raises(ValueError):
        vllm_max_lora_rank(513)


def test_rm_example_preset_is_the_learning_curve_but_for_the_reward(hydra_conf, tmp_path):
    """`+experiment=rm_cpu` (make rm-example) must differ from its counterpart, the committed learning curve, only
    in the reward and the run dir: same seed, steps, prompts, recipe and held-out evaluation."""
    from dataclasses import asdict

    (tmp_path / "config.json").write_text("{}")
    curve = asdict(load("+experiment=learning_curve", "trainer.seed=0"))
    rm = asdict(load("+experiment=rm_cpu", "reward.source=model", f"reward.model={tmp_path}", "trainer.seed=0"))
    assert rm["trainer"].pop("run_dir") == "runs/rm_cpu/model-s0"
    curve["trainer"].pop("run_dir")
    assert (rm.pop("reward")["source"], curve.pop("reward")["source"]) == ("model", "verifier")
    assert rm == curve and rm["trainer"]["total_steps"] == 40


def test_learner_process_env_composes_from_the_cpu_default_and_rejects_bad_names(hydra_conf):
    """cluster.learner_keep_freed_memory: on in the CPU default (glibc's two settings), off in the GPU presets
    and in code; cluster.learner_env adds variables and wins; a name that is no environment variable fails
    naming the key."""
    from hicra_rl.config import learner_process_env

    keep = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    assert learner_process_env(load().cluster) == keep
    assert learner_process_env(load("cluster=single_node_gpu").cluster) == {}
    assert learner_process_env(TrainConfig().cluster) == {}
    assert learner_process_env(load("cluster.learner_keep_freed_memory=false").cluster) == {}
    assert learner_process_env(load("+cluster.learner_env.OMP_PROC_BIND=close",
                                    "+cluster.learner_env.MALLOC_MMAP_MAX_=8").cluster) == {
        **keep, "OMP_PROC_BIND": "close", "MALLOC_MMAP_MAX_": "8"}
    with pytest.raises(ConfigError) as err:   # as a YAML file could write it
        to_schema(OmegaConf.create({"cluster": {"learner_env": {"LD PRELOAD": "x"}}}))
    assert "config error at 'cluster.learner_env.LD PRELOAD'" in str(err.value)
    assert "is not an environment variable name" in str(err.value)
