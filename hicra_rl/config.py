"""One typed configuration schema for every entry point.

Dataclasses registered with Hydra's ConfigStore (``hicra_schema``); YAML groups in ``conf/`` fill
them.  ``validate`` runs once at start and fails fast with messages naming the offending key.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from hicra_rl.errors import BadInputError

ALGORITHMS = ("hicra", "grpo", "entropy_reg", "dr_grpo", "hicra_adaptive")
# the dtypes a run can train in: the learner and vLLM use the same one (float16 has no loss scaling here)
MODEL_DTYPES = ("float32", "bfloat16")
# lexicons shipped in hicra_rl/resources (their metadata records the command that mined them)
SHIPPED_LEXICONS = {"default": "default_lexicon.json", "gsm8k": "default_lexicon.json", "arith": "arith_lexicon.json",
                    "strat": "strat_lexicon.json"}


def lexicon_path(cfg: TrainConfig) -> str:
    """The lexicon file a run uses: ``strategic.lexicon`` (``auto`` defers to ``data.lexicon``)."""
    from importlib import resources

    lex = cfg.data.lexicon if cfg.strategic.lexicon == "auto" else cfg.strategic.lexicon
    if lex in SHIPPED_LEXICONS:
        return str(resources.files("hicra_rl").joinpath("resources", SHIPPED_LEXICONS[lex]))
    return lex


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    # an alias ("smollm2-135m-instruct"), a local HF directory, or a hub name (needs network)
    path: str = "smollm2-135m-instruct"
    dtype: str = "float32"  # float32 on CPU, bfloat16 on GPU; the learner and vLLM both use it
    gradient_checkpointing: bool = False
    max_model_len: int = 2048


@dataclass
class AlgorithmConfig:
    name: str = "hicra"
    advantage_estimator: str = "grpo_mean"  # grpo_mean (paper) | grpo_std | dr_grpo
    hicra_alpha: float = 0.2                # 0 disables HICRA (GRPO); alpha_max for hicra_adaptive
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    dual_clip_c: Optional[float] = None
    loss_agg_mode: str = "token-mean"
    entropy_coef: float = 0.0               # > 0: the entropy-regularisation baseline
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    # hicra_adaptive only (docs/hicra_adaptive.md): alpha = hicra_alpha * g, g in [0, 1] from past training
    # steps: min(drop, flatness) of the execution relative-perplexity EMA and a ramp of the accuracy EMA
    adaptive_window: int = 4                # W: steps of the perplexity slope; g = 0 until W + 1 steps seen
    adaptive_ema: float = 0.7               # weight of the past in the EMAs of both signals
    adaptive_ppl_drop: float = 0.05         # relative fall of the perplexity EMA counted as consolidated (0: none)
    adaptive_ppl_slope: float = 0.01        # |change per step| / level at which the perplexity counts as moving
    adaptive_acc_low: float = 0.2           # accuracy EMA at which competence leaves 0
    adaptive_acc_high: float = 0.6          # accuracy EMA at which competence reaches 1
    adaptive_gate_ema: float = 0.5          # weight of the past in the gate's own smoothing
    # rollout-learner mismatch correction against vLLM's sampling log-probs (verl rollout_correction):
    # none | token_tis | seq_tis | seq_mask (hicra_rl.algo.losses.ROLLOUT_CORRECTIONS); cap C = TIS
    # truncation or the seq_mask band [1/C, C].  Needs rollout log-probs of the tempered policy
    # (vLLM logprobs_mode=processed_logprobs) when rollout.temperature != 1
    rollout_correction: str = "none"
    rollout_correction_cap: float = 2.0


@dataclass
class DataConfig:
    name: str = "arith"
    # "reasoning_gym" | "gsm8k" | "math500" | "jsonl" | "parquet" | "disk" | "hub"
    source: str = "reasoning_gym"
    path: Optional[str] = None
    task: Optional[str] = "basic_arithmetic"   # reasoning-gym task name
    task_config: dict = field(default_factory=dict)
    size: int = 2000                            # procedurally generated items
    split: str = "train"
    fields: dict = field(default_factory=dict)  # {"problem": ..., "answer": ..., "id": ...}
    on_bad_row: str = "error"                   # error | skip (counted and reported)
    max_prompt_tokens: int = 256
    # the system message; "" (the default) is an empty one, which keeps a template's built-in default
    # out (SmolLM2's adds 16 tokens to every prompt); None keeps the chat template's own default
    system_prompt: Optional[str] = ""
    shuffle: bool = True
    # the SG lexicon suited to this data (strategic.lexicon=auto); the default matches the default data
    # (conf/data/arith.yaml), so TrainConfig() in code and `hicra-train` tag the same grams
    lexicon: str = "arith"
    # strategy name -> the phrase that announces it (case-insensitive): each step logs the share and accuracy
    # of every strategy (hicra_rl/metrics/strategies.py); the strategy-choice testbed sets it (strat_*.yaml)
    strategies: dict = field(default_factory=dict)


@dataclass
class EvalDataConfig(DataConfig):
    size: int = 64
    split: str = "test"
    # which held-out problems (procedural tasks): fixed, not the training seed, so runs of every seed and
    # `hicra-eval` are scored on the same problems (paired comparisons)
    seed: int = 0


@dataclass
class RolloutConfig:
    num_workers: int = 1
    prompts_per_step: int = 8
    group_size: int = 4                 # G responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop: List[str] = field(default_factory=list)  # stop strings (the response ends before them)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.6
    kv_cache_gib: Optional[float] = 1.0  # CPU only (VLLM_CPU_KVCACHE_SPACE)
    # CPU only (VLLM_CPU_OMP_THREADS_BIND): "all" cores of the node (the learner and vLLM take turns in the
    # synchronous loop), a range such as "0-3" (several workers on one node), or None for vLLM's own default
    cpu_threads: Optional[str] = "all"
    enforce_eager: bool = True
    # shm_file: a safetensors file in /dev/shm (learner rank 0 and all rollout workers on one node);
    # broadcast: a process group of learner rank 0 and every vLLM worker (NCCL on GPU, gloo on CPU);
    # lora_adapter: with learner.lora.rank > 0, only the adapters, as a peft folder in /dev/shm, applied by vLLM's
    # own LoRA path (one node; docs/lora.md measures it against the merged weights shm_file sends)
    weight_transport: str = "shm_file"
    # the log-prob vLLM reports for each sampled token: processed_logprobs = of the distribution sampled from
    # (after temperature; the learner divides its logits by the same temperature, so the two agree at any T
    # with top_p = 1), raw_logprobs = of the untempered model.  The behaviour policy of rollout correction
    logprobs_mode: str = "processed_logprobs"
    # one-step off-policy rollout (verl one_step_off_policy): 1 = generation (and scoring) of step t+1 runs
    # while step t trains, with the weights of step t-1's end; new weights reach vLLM at the step boundary.
    # 0 = the synchronous loop.  With 1, use algorithm.rollout_correction (token_tis) for the stale samples
    staleness: int = 0
    # DAPO dynamic sampling (verl algorithm.filter_groups): drop groups whose responses are all right or all
    # wrong (no signal) and generate further rounds of prompts_per_step prompts until the step has
    # prompts_per_step informative groups, at most filter_groups_max_rounds extra rounds (then the step is
    # filled up with uninformative groups, counted in dynamic_sampling/filled_groups and left out of the loss)
    filter_groups: bool = False
    filter_groups_max_rounds: int = 3
    # what makes a group informative: correct = its responses differ in correctness (DAPO, verl's
    # filter_groups.metric=acc); reward = their rewards differ (with length / format shaping, an all-correct
    # group of different lengths then counts as informative)
    filter_groups_metric: str = "correct"


@dataclass
class RewardConfig:
    num_workers: int = 2
    timeout_s: float = 5.0
    answer_mode: str = "boxed"   # boxed | strict_boxed | gsm8k | boxed_or_last_number
    overlong_penalty: bool = False
    overlong_buffer: int = 32          # DAPO's L_cache; must be <= rollout.max_new_tokens
    overlong_penalty_factor: float = 1.0
    format_penalty: float = 0.0
    # learned reward models (docs/reward_models.md): what the reward a response trains on is made of:
    # verifier | model | sum | gated (hicra_rl/rewards/combine.py; gated: the model's score counts only where the
    # verifier accepts). `model` is an HF sequence-classification folder with a scalar head (hicra-rm train
    # writes one); with source=verifier a set model is only measured (reward/model_*)
    source: str = "verifier"
    model: Optional[str] = None
    model_weight: float = 1.0          # w: model -> w*m, sum -> v + w*m, gated -> v + w*sigmoid(m) where accepted
    model_num_workers: int = 1         # reward-model actors (the batch is split over them)
    model_batch_size: int = 16         # sequences per forward
    model_max_tokens: int = 1024       # prompt + response tokens read (longer: the last ones, counted)
    # a scoring call running longer counts as a hung reward model: killed, restarted, its share scored again
    model_timeout_s: float = 120.0


@dataclass
class LearnerLoraConfig:
    """LoRA adapters on the policy (``peft``; docs/lora.md).  ``rank`` 0: off, every weight trains."""

    rank: int = 0
    alpha: float = 16.0              # the update is (alpha / rank) * B @ A
    dropout: float = 0.0             # on the adapters' input in training forwards (vLLM and log-prob passes: none)
    # module names (suffixes) that get adapters; ["all-linear"]: every linear layer of the decoder except the
    # output head (peft's "all-linear"); e.g. [q_proj, v_proj]
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class LearnerConfig:
    """The DeepSpeed policy learner (one type, used by ``hicra-train`` as ``learner`` and by ``hicra-sft``)."""

    num_ranks: int = 1
    zero_stage: int = 2
    optimizer: str = "torch_adamw"   # torch AdamW (no JIT build) | deepspeed_adamw (DeepSpeed's fused/CPU Adam)
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "constant"      # constant | cosine, both after a linear warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0        # cosine floor as a fraction of lr
    max_grad_norm: float = 1.0       # <= 0 disables clipping
    micro_batch_size: int = 4        # sequences per forward/backward on one rank
    ppo_epochs: int = 1
    mini_batches_per_step: int = 1   # optimizer steps per epoch over a step's batch
    # rows of the [tokens x vocab] log-softmax per chunk; 0: auto (1024 on a GPU; on a CPU a chunk within
    # the L2 cache, ~2 MiB: 10 rows for SmolLM2's vocabulary, 3x faster than 1024 there)
    logprob_chunk_size: int = 0
    # auto: no separate old-log-prob forward when the update is on-policy (1 epoch, 1 mini-batch: the
    # ratio is 1 by construction); always: recompute them before the update anyway
    old_log_prob_forward: str = "auto"
    # one packed row per prompt group (the prompt computed once, not G times; block attention mask,
    # Prefix Grouper): same log-probs and gradients as separate rows (tested), fewer tokens
    shared_prefix: bool = False
    # the packed groups' attention: grouped (two SDPA calls per layer, the prompts' and each response's
    # against [prompt | itself], no [L x L] mask, and a micro-batch's groups in one unpadded row; llama /
    # qwen2 / qwen3 / mistral) | masked (the model's own attention with a block mask, one right-padded row
    # per group). Same values and gradients (tested); grouped computes fewer scores and no padding
    shared_prefix_attention: str = "grouped"
    # > 0: micro-batches by padded tokens instead of micro_batch_size sequences (verl use_dynamic_bsz):
    # length-sorted rows (with shared_prefix: packed prompt groups) are added while rows x longest row
    # <= micro_batch_tokens; a row longer than the budget runs alone. Same loss and gradients (global
    # normalisers; tested). 0: micro_batch_size sequences per micro-batch
    micro_batch_tokens: int = 0
    # > 0: every N-th update, right after it, each rank also times every matrix multiply that update ran, at
    # its shapes, back to back on random operands (``hicra_rl.learner.flops``), and logs
    # perf/gemm_reference_gflops and perf/update_vs_gemm: the learner's efficiency against its own GEMMs,
    # measured in the same run and minute (benchmarks/bench_step.py). It adds about the update's GEMM time
    # to those steps (not to perf/update_s). 0: never
    gemm_reference_every: int = 0
    # low-rank adapters instead of full fine-tuning (lora.rank > 0): only the adapters train and have optimizer
    # state; vLLM and checkpoints' hf/ get the merged weights W + (alpha / rank) * B @ A (docs/lora.md)
    lora: LearnerLoraConfig = field(default_factory=LearnerLoraConfig)


LEARNER_OPTIMIZERS = ("torch_adamw", "deepspeed_adamw")
LEARNER_SCHEDULERS = ("constant", "cosine")


def check_learner_config(l: LearnerConfig, prefix: str = "learner") -> None:
    """Fail fast on a learner config built in code (the schema's ``validate`` runs the same checks)."""
    _check(l.num_ranks >= 1, f"{prefix}.num_ranks", "must be >= 1")
    _check(l.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage", f"must be 0..3, got {l.zero_stage}")
    _check(l.optimizer in LEARNER_OPTIMIZERS, f"{prefix}.optimizer",
           f"{l.optimizer!r} is not one of {LEARNER_OPTIMIZERS}")
    _check(l.scheduler in LEARNER_SCHEDULERS, f"{prefix}.scheduler",
           f"{l.scheduler!r} is not one of {LEARNER_SCHEDULERS}")
    _check(l.lr > 0, f"{prefix}.lr", f"must be > 0, got {l.lr}")
    _check(len(l.betas) == 2 and all(0 <= b < 1 for b in l.betas), f"{prefix}.betas",
           f"must be two numbers in [0, 1), got {list(l.betas)}")
    for name in ("micro_batch_size", "ppo_epochs", "mini_batches_per_step"):
        _check(getattr(l, name) >= 1, f"{prefix}.{name}", f"must be >= 1, got {getattr(l, name)}")
    _check(l.logprob_chunk_size >= 0, f"{prefix}.logprob_chunk_size",
           f"must be >= 1 (rows per chunk) or 0 (auto), got {l.logprob_chunk_size}")
    _check(l.warmup_steps >= 0, f"{prefix}.warmup_steps", f"must be >= 0, got {l.warmup_steps}")
    _check(l.micro_batch_tokens >= 0, f"{prefix}.micro_batch_tokens",
           f"must be >= 0 (padded tokens per micro-batch; 0: micro_batch_size sequences), got {l.micro_batch_tokens}")
    _check(l.shared_prefix_attention in ("grouped", "masked"), f"{prefix}.shared_prefix_attention",
           f"must be grouped or masked, got {l.shared_prefix_attention!r}")
    _check(l.old_log_prob_forward in ("auto", "always"), f"{prefix}.old_log_prob_forward",
           f"must be auto or always, got {l.old_log_prob_forward!r}")
    _check(l.gemm_reference_every >= 0, f"{prefix}.gemm_reference_every",
           f"must be >= 0 (every N-th update; 0: never), got {l.gemm_reference_every}")
    check_lora_config(l.lora, f"{prefix}.lora")


def check_lora_config(c: LearnerLoraConfig, prefix: str = "learner.lora") -> None:
    _check(isinstance(c.rank, int) and c.rank >= 0, f"{prefix}.rank", f"must be >= 0 (0: no LoRA), got {c.rank}")
    if c.rank == 0:
        return
    _check(c.alpha > 0, f"{prefix}.alpha", f"must be > 0, got {c.alpha}")
    _check(0.0 <= c.dropout < 1.0, f"{prefix}.dropout", f"must be in [0, 1), got {c.dropout}")
    targets = list(c.target_modules)
    _check(len(targets) >= 1 and all(isinstance(t, str) and t.strip() for t in targets), f"{prefix}.target_modules",
           f"must name at least one module (e.g. [q_proj,v_proj] or [all-linear]), got {targets}")
    _check("all-linear" not in targets or targets == ["all-linear"], f"{prefix}.target_modules",
           f"all-linear already means every linear layer: give it alone, got {targets}")
    _check(len(set(targets)) == len(targets), f"{prefix}.target_modules", f"names a module twice: {targets}")


@dataclass
class StrategicConfig:
    # auto: the data group's `lexicon`; a shipped name (default = GSM8K-mined, arith); or a lexicon JSON path
    lexicon: str = "auto"


@dataclass
class ClusterConfig:
    name: str = "local_cpu"
    device: str = "cpu"                # cpu | cuda
    address: Optional[str] = None      # existing Ray cluster; None: RAY_ADDRESS or start a local one
    num_cpus: Optional[int] = None     # logical CPUs for a local Ray (None: all cores)
    cpus_per_actor: float = 1.0
    gpus_per_learner: float = 0.0
    gpus_per_rollout_worker: float = 0.0
    gpus_per_reward_model: float = 0.0   # each reward-model actor (reward.model): a fraction shares a GPU
    actor_start_timeout_s: float = 300.0
    step_timeout_s: float = 1800.0
    collective_timeout_s: float = 600.0
    torch_threads: Optional[int] = None
    # the learner ranks' processes keep freed memory in glibc's heap instead of handing it back to the kernel
    # (KEEP_FREED_MEMORY_ENV; the CPU default: see conf/cluster/local_cpu.yaml)
    learner_keep_freed_memory: bool = False
    # more environment variables of the learner ranks' processes only (set when Ray starts them)
    learner_env: Dict[str, str] = field(default_factory=dict)
    # fault tolerance: how often a blocked call checks that its rollout workers / verifiers are alive, and
    # how many dead ones one call may restart before the run fails naming them
    health_check_s: float = 10.0
    max_restarts_per_call: int = 2


# glibc: no block through its own mmap (each would be unmapped when freed), no trimming of the heap's top
KEEP_FREED_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}


def learner_process_env(c: ClusterConfig) -> dict[str, str]:
    """Environment variables a learner rank's process starts with: ``KEEP_FREED_MEMORY_ENV`` if
    ``learner_keep_freed_memory``, then ``learner_env`` (which wins)."""
    return {**(KEEP_FREED_MEMORY_ENV if c.learner_keep_freed_memory else {}), **dict(c.learner_env)}


@dataclass
class TrainerConfig:
    total_steps: int = 4
    seed: int = 0
    run_dir: str = "runs/default"
    save_every: int = 2
    keep_last: int = 2
    eval_every: int = 0                # 0: no periodic evaluation
    eval_samples: int = 4              # k for Pass@k during periodic evaluation
    eval_temperature: float = 0.6
    # evaluate eval_data before the first step (eval-step0.json) and after the last one, and end by
    # printing held-out Pass@1 before -> after (``make run`` sets it; a resumed run skips the "before")
    eval_before_after: bool = False
    resume: str = "auto"               # auto | never | <checkpoint dir>
    init_checkpoint: Optional[str] = None  # e.g. the cold-start (SFT) model directory
    # write every step's rollouts (ids, text, reward, planning mask, token advantages) to
    # <run_dir>/rollouts/step-N.jsonl, to inspect what HICRA credited
    dump_rollouts: bool = False
    # an update whose loss or gradient is not finite is skipped (counted as faults/nonfinite_updates);
    # this many in a row stop the run, naming the step
    max_nonfinite_updates: int = 3


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_mode: str = "offline"
    project: str = "hicra-rl"
    run_name: Optional[str] = None
    console_every: int = 1


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval_data: Optional[EvalDataConfig] = None
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    strategic: StrategicConfig = field(default_factory=StrategicConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="hicra_schema", node=TrainConfig)
    for group, node in (
        ("model", ModelConfig), ("algorithm", AlgorithmConfig), ("data", DataConfig),
        ("cluster", ClusterConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)


class ConfigError(BadInputError):
    """A configuration value is invalid; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config error at '{key}': {msg}")


CONF_DIR = os.environ.get("HICRA_CONF_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def typed_config(schema: type, cfg: DictConfig, validate_fn) -> Any:
    """Merge a Hydra DictConfig onto a dataclass schema (unknown keys fail, '+key' typos too) and validate."""
    if isinstance(cfg, schema):
        typed = cfg
    else:
        base = OmegaConf.structured(schema)
        try:
            # merging a plain container makes keys added with '+' (``+rollout.grup_size=4``) unknown too
            merged = OmegaConf.merge(base, OmegaConf.to_container(cfg, resolve=False))
        except Exception as err:  # omegaconf names the key in its message
            raise ConfigError(f"config error: {err}") from None
        typed = OmegaConf.to_object(merged)
    validate_fn(typed)
    return typed


def to_schema(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """The run config of ``hicra-train``: typed and validated."""
    return typed_config(TrainConfig, cfg, validate)


def store_entry_schema(config_name: str, schema: type) -> None:
    """Put ``schema`` in Hydra's ConfigStore under the name ``conf/<config_name>.yaml`` lists first in its
    defaults (``hicra_schema``, ``sft_schema``, ``eval_schema``): what the entry point and the compose API
    (tests/test_docs_commands.py) merge the YAML onto."""
    ConfigStore.instance().store(name=f"{config_name}_schema" if config_name != "config" else "hicra_schema",
                                 node=schema)


def hydra_entry(prog: str, config_name: str, schema: type, validate_fn, run_fn) -> None:
    """Run ``run_fn(typed_cfg)`` as a Hydra app on ``conf/<config_name>.yaml``.  A user-input error (a config
    value, a data file or row, a model directory, a lexicon: ``hicra_rl.errors.UserInputError``) prints one
    line ``<prog>: <message>`` and exits 2; ``HYDRA_FULL_ERROR=1`` shows its traceback instead."""
    import logging

    import hydra

    from hicra_rl.errors import hydra_full_error, user_errors_in_one_line

    store_entry_schema(config_name, schema)

    @hydra.main(version_base=None, config_path=CONF_DIR, config_name=config_name)
    def _main(dcfg: DictConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        with user_errors_in_one_line(prog, debug=hydra_full_error()):
            cfg = typed_config(schema, dcfg, validate_fn)
            run_fn(cfg)

    _main()


def check_reward_model_config(rw: RewardConfig, c: ClusterConfig) -> None:
    """The ``reward.source`` / ``reward.model*`` keys (the folder's contents are checked when the run loads its
    inputs, before any actor starts: ``hicra_rl.rewards.model.check_reward_model_dir``)."""
    import math

    from hicra_rl.rewards.combine import REWARD_SOURCES

    _check(rw.source in REWARD_SOURCES, "reward.source", f"{rw.source!r} is not one of {REWARD_SOURCES}")
    _check(rw.source == "verifier" or bool(rw.model), "reward.model",
           f"reward.source={rw.source} needs a reward model: set reward.model to an HF sequence-classification "
           "folder (hicra-rm train writes one)")
    _check(not rw.model or os.path.isdir(os.path.expanduser(rw.model)), "reward.model",
           f"{rw.model!r} is not an existing directory")
    _check(math.isfinite(rw.model_weight) and rw.model_weight > 0, "reward.model_weight",
           f"must be a finite number > 0, got {rw.model_weight}")
    _check(rw.model_num_workers >= 1, "reward.model_num_workers", f"must be >= 1, got {rw.model_num_workers}")
    _check(rw.model_batch_size >= 1, "reward.model_batch_size", f"must be >= 1, got {rw.model_batch_size}")
    _check(rw.model_max_tokens >= 2, "reward.model_max_tokens", f"must be >= 2, got {rw.model_max_tokens}")
    _check(rw.model_timeout_s > 0, "reward.model_timeout_s", f"must be > 0, got {rw.model_timeout_s}")
    _check(c.gpus_per_reward_model >= 0, "cluster.gpus_per_reward_model",
           f"must be >= 0, got {c.gpus_per_reward_model}")


DATA_SOURCES = ("reasoning_gym", "gsm8k", "math500", "dapo_math_17k", "deepscaler", "file", "jsonl", "parquet",
                "disk", "hub")


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # the max_lora_rank values vLLM accepts


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds adapters of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"vLLM's LoRA path holds ranks up to {VLLM_LORA_RANKS[-1]}, got {rank}")


def validate(cfg: TrainConfig) -> None:
    a, r, l, t, c = cfg.algorithm, cfg.rollout, cfg.learner, cfg.trainer, cfg.cluster
    _check(a.name in ALGORITHMS, "algorithm.name", f"{a.name!r} is not one of {ALGORITHMS}")
    _check(0.0 <= a.hicra_alpha <= 1.0, "algorithm.hicra_alpha", f"must be in [0, 1], got {a.hicra_alpha}")
    _check(a.name in ("hicra", "hicra_adaptive") or a.hicra_alpha == 0.0, "algorithm.hicra_alpha",
           f"algorithm {a.name!r} must have hicra_alpha 0 (got {a.hicra_alpha}); use algorithm=hicra or "
           "algorithm=hicra_adaptive")
    _check(a.name != "hicra_adaptive" or a.hicra_alpha > 0.0, "algorithm.hicra_alpha",
           f"algorithm 'hicra_adaptive' uses hicra_alpha as its alpha_max and needs it > 0 (got {a.hicra_alpha}); "
           "use algorithm=grpo for alpha 0")
    from hicra_rl.algo.adaptive_alpha import gate_config_errors

    for key, msg in gate_config_errors(a):
        _check(False, f"algorithm.{key}", msg)
    from hicra_rl.algo import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS

    _check(a.advantage_estimator in ADVANTAGE_ESTIMATORS, "algorithm.advantage_estimator",
           f"unknown estimator {a.advantage_estimator!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}")
    _check(a.loss_agg_mode in LOSS_AGGREGATIONS, "algorithm.loss_agg_mode",
           f"unknown mode {a.loss_agg_mode!r}; registered: {sorted(LOSS_AGGREGATIONS)}")
    _check(a.kl_estimator in KL_ESTIMATORS, "algorithm.kl_estimator",
           f"unknown estimator {a.kl_estimator!r}; registered: {sorted(KL_ESTIMATORS)}")
    _check(a.dual_clip_c is None or a.dual_clip_c > 1, "algorithm.dual_clip_c", f"must be > 1, got {a.dual_clip_c}")
    from hicra_rl.algo.losses import ROLLOUT_CORRECTIONS

    _check(a.rollout_correction in ROLLOUT_CORRECTIONS, "algorithm.rollout_correction",
           f"unknown correction {a.rollout_correction!r}; registered: {sorted(ROLLOUT_CORRECTIONS)}")
    _check(a.rollout_correction_cap > 1, "algorithm.rollout_correction_cap",
           f"must be > 1, got {a.rollout_correction_cap}")
    _check(0 <= a.clip_ratio_low < 1, "algorithm.clip_ratio_low", f"must be in [0, 1), got {a.clip_ratio_low}")
    _check(a.clip_ratio_high >= 0, "algorithm.clip_ratio_high", f"must be >= 0, got {a.clip_ratio_high}")
    _check(a.entropy_coef >= 0, "algorithm.entropy_coef", f"must be >= 0, got {a.entropy_coef}")
    _check(a.kl_coef >= 0, "algorithm.kl_coef", f"must be >= 0, got {a.kl_coef}")
    _check(r.group_size >= 2, "rollout.group_size",
           f"group-relative advantages need at least 2 responses per prompt, got {r.group_size}")
    _check(r.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
    _check(r.num_workers >= 1, "rollout.num_workers", "must be >= 1")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _check(r.temperature > 0, "rollout.temperature", f"must be > 0 for RL sampling, got {r.temperature}")
    batch = r.prompts_per_step * r.group_size
    check_learner_config(l)
    _check(batch % (l.num_ranks * l.mini_batches_per_step) == 0, "learner.mini_batches_per_step",
           f"batch of {batch} responses (prompts_per_step x group_size) does not divide into "
           f"{l.num_ranks} ranks x {l.mini_batches_per_step} mini-batches")
    per_rank_mini = batch // (l.num_ranks * l.mini_batches_per_step)
    _check(l.micro_batch_tokens > 0 or per_rank_mini % l.micro_batch_size == 0, "learner.micro_batch_size",
           f"{per_rank_mini} responses per rank and mini-batch do not divide into micro-batches of "
           f"{l.micro_batch_size}")
    _check(r.prompts_per_step >= r.num_workers, "rollout.num_workers",
           f"{r.num_workers} workers for {r.prompts_per_step} prompts per step: some would sit idle")
    _check(cfg.model.dtype in MODEL_DTYPES, "model.dtype",
           f"{cfg.model.dtype!r} is not one of {MODEL_DTYPES} (vLLM and the learner use the same dtype; float16 "
           "would need loss scaling the learner does not do: use bfloat16)")
    _check(c.device in ("cpu", "cuda"), "cluster.device", f"must be cpu or cuda, got {c.device!r}")
    _check(t.total_steps >= 1, "trainer.total_steps", "must be >= 1")
    _check(t.max_nonfinite_updates >= 1, "trainer.max_nonfinite_updates", "must be >= 1")
    _check(c.health_check_s > 0, "cluster.health_check_s", "must be > 0")
    _check(c.max_restarts_per_call >= 0, "cluster.max_restarts_per_call", "must be >= 0")
    for name in c.learner_env:
        _check(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None, f"cluster.learner_env.{name}",
               "is not an environment variable name (letters, digits and _, not starting with a digit)")
    _check(t.save_every >= 0 and t.eval_every >= 0, "trainer.save_every", "must be >= 0")
    _check(t.resume in ("auto", "never") or os.path.isdir(t.resume), "trainer.resume",
           f"{t.resume!r} is neither auto/never nor an existing checkpoint directory")
    _check(cfg.data.max_prompt_tokens + r.max_new_tokens <= cfg.model.max_model_len, "model.max_model_len",
           f"{cfg.model.max_model_len} is shorter than data.max_prompt_tokens ({cfg.data.max_prompt_tokens}) + "
           f"rollout.max_new_tokens ({r.max_new_tokens})")
    _check(t.eval_every == 0 or cfg.eval_data is not None, "trainer.eval_every",
           f"is {t.eval_every} but no eval_data is configured (e.g. +eval_data=arith_test, or eval_every=0)")
    _check(not t.eval_before_after or cfg.eval_data is not None, "trainer.eval_before_after",
           "is true but no eval_data is configured (e.g. +eval_data=arith_test)")
    _check(cfg.data.on_bad_row in ("error", "skip"), "data.on_bad_row", "must be error or skip")
    for name, phrase in dict(cfg.data.strategies).items():
        _check(isinstance(name, str) and name.strip() != "" and name != "none", f"data.strategies.{name}",
               "a strategy needs a non-empty name other than 'none' (the share of responses announcing no strategy)")
        _check(isinstance(phrase, str) and phrase.strip() != "", f"data.strategies.{name}",
               f"must be the non-empty phrase that announces the strategy, got {phrase!r}")
    _check(r.weight_transport in ("shm_file", "broadcast", "lora_adapter"), "rollout.weight_transport",
           f"must be shm_file, broadcast or lora_adapter, got {r.weight_transport!r}")
    if r.weight_transport == "lora_adapter":
        _check(l.lora.rank > 0, "rollout.weight_transport",
               "lora_adapter sends the LoRA adapters to vLLM: it needs learner.lora.rank > 0")
        _check(l.lora.rank <= VLLM_LORA_RANKS[-1], "learner.lora.rank",
               f"vLLM's LoRA path (rollout.weight_transport=lora_adapter) holds ranks up to {VLLM_LORA_RANKS[-1]}, "
               f"got {l.lora.rank}")
    _check(r.logprobs_mode in ("processed_logprobs", "raw_logprobs"), "rollout.logprobs_mode",
           f"must be processed_logprobs or raw_logprobs, got {r.logprobs_mode!r}")
    _check(a.rollout_correction == "none" or r.logprobs_mode == "processed_logprobs" or r.temperature == 1.0,
           "rollout.logprobs_mode", "raw_logprobs are of the untempered model: rollout correction at temperature "
           f"{r.temperature} needs rollout.logprobs_mode=processed_logprobs")
    _check(a.rollout_correction == "none" or r.top_p == 1.0, "rollout.top_p",
           f"is {r.top_p}: vLLM samples from the top-p truncated distribution, which the learner does not "
           "compute, so the importance ratios of algorithm.rollout_correction would be biased; use top_p 1")
    _check(r.staleness in (0, 1), "rollout.staleness", f"must be 0 (synchronous) or 1 (one step off-policy), "
           f"got {r.staleness}")
    _check(r.filter_groups_max_rounds >= 0, "rollout.filter_groups_max_rounds",
           f"must be >= 0, got {r.filter_groups_max_rounds}")
    _check(r.filter_groups_metric in ("correct", "reward"), "rollout.filter_groups_metric",
           f"must be correct or reward, got {r.filter_groups_metric!r}")
    _check(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be >= 1")
    lex = cfg.data.lexicon if cfg.strategic.lexicon == "auto" else cfg.strategic.lexicon
    _check(lex in SHIPPED_LEXICONS or os.path.isfile(lex), "strategic.lexicon",
           f"lexicon file {lex!r} does not exist (shipped lexicons: {', '.join(SHIPPED_LEXICONS)})")
    _check(cfg.reward.timeout_s > 0, "reward.timeout_s", "must be > 0")
    _check(not cfg.reward.overlong_penalty or 0 < cfg.reward.overlong_buffer <= r.max_new_tokens,
           "reward.overlong_buffer", f"must be in (0, rollout.max_new_tokens={r.max_new_tokens}]")
    _check(cfg.reward.num_workers >= 1, "reward.num_workers", "must be >= 1")
    check_reward_model_config(cfg.reward, c)
    from hicra_rl.rewards.math import ANSWER_MODES

    _check(cfg.reward.answer_mode in ANSWER_MODES, "reward.answer_mode",
           f"{cfg.reward.answer_mode!r} is not one of {ANSWER_MODES}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(cfg.logging.wandb_mode in ("online", "offline", "disabled"), "logging.wandb_mode",
           f"{cfg.logging.wandb_mode!r} is not one of online, offline, disabled")
    _check(t.keep_last >= 1, "trainer.keep_last", f"must be >= 1 (checkpoints kept), got {t.keep_last}")
    for group, d in (("data", cfg.data), ("eval_data", cfg.eval_data)):
        if d is None:
            continue
        _check(d.source in DATA_SOURCES, f"{group}.source", f"{d.source!r} is not one of {DATA_SOURCES}")
        _check(d.max_prompt_tokens >= 1, f"{group}.max_prompt_tokens", f"must be >= 1, got {d.max_prompt_tokens}")


def policy_loss_config(cfg: TrainConfig):
    """The learner's loss settings from the ``algorithm`` group; Dr.GRPO's constant normaliser is the
    generation budget ``rollout.max_new_tokens``."""
    from hicra_rl.algo.losses import PolicyLossConfig

    a = cfg.algorithm
    return PolicyLossConfig(clip_ratio_low=a.clip_ratio_low, clip_ratio_high=a.clip_ratio_high,
                            dual_clip_c=a.dual_clip_c, agg_mode=a.loss_agg_mode, entropy_coef=a.entropy_coef,
                            kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                            norm_constant=float(cfg.rollout.max_new_tokens),
                            rollout_correction=a.rollout_correction,
                            rollout_correction_cap=a.rollout_correction_cap)


def as_plain_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


__all__ = ["ConfigError", "TrainConfig", "as_plain_dict", "register_configs", "to_schema", "validate", "MISSING"]
