"""From a ``DataConfig`` to tokenised prompts (the glue between the config schema and hicra_rl.data)."""
from __future__ import annotations

import logging

from hicra_rl.data.datasets import (
    DatasetSpec,
    FieldMap,
    ProblemSet,
    builtin_spec,
    load_problems,
    reasoning_gym_problems,
)
from hicra_rl.data.prompts import PromptConfig, PromptSet, build_prompts

log = logging.getLogger(__name__)

BUILTINS = {"gsm8k": None, "math500": "math500", "dapo_math_17k": "dapo_math_17k", "deepscaler": "deepscaler"}


def load_problem_set(cfg, seed: int) -> ProblemSet:
    """``cfg`` is a :class:`hicra_rl.config.DataConfig`."""
    if cfg.source == "reasoning_gym":
        if not cfg.task:
            raise ValueError("data.task must name a reasoning-gym task when data.source=reasoning_gym")
        return reasoning_gym_problems(cfg.task, cfg.size, seed, dict(cfg.task_config))
    overrides = {"on_bad_row": cfg.on_bad_row}
    if cfg.fields:
        overrides["fields"] = FieldMap(**dict(cfg.fields))
    if cfg.source in BUILTINS:
        name = BUILTINS[cfg.source] or f"gsm8k_{'test' if cfg.split == 'test' else 'train'}"
        spec = builtin_spec(name, path=cfg.path, **overrides)
    elif cfg.source in ("file", "jsonl", "parquet", "disk"):
        if not cfg.path:
            raise ValueError(f"data.path is required when data.source={cfg.source}")
        spec = DatasetSpec(name=cfg.name, path=cfg.path, split=cfg.split, **overrides)
    elif cfg.source == "hub":
        spec = DatasetSpec(name=cfg.name, hub=cfg.path, split=cfg.split, **overrides)
    else:
        raise ValueError(f"data.source {cfg.source!r} is not one of reasoning_gym, {', '.join(BUILTINS)}, file, hub")
    problems = load_problems(spec)
    if problems.n_skipped:
        log.warning("%s: skipped %d bad rows (on_bad_row=skip), first: %s", cfg.name, problems.n_skipped,
                    problems.skipped[0])
    if cfg.size and cfg.source != "reasoning_gym" and len(problems) > cfg.size:
        problems.rows = problems.rows.select(range(cfg.size))
    return problems


def load_prompts(cfg, tokenizer, seed: int) -> tuple[ProblemSet, PromptSet]:
    problems = load_problem_set(cfg, seed)
    pcfg = PromptConfig(system=cfg.system_prompt, max_prompt_tokens=cfg.max_prompt_tokens,
                        on_too_long="skip" if cfg.on_bad_row == "skip" else "error")
    prompts = build_prompts(tokenizer, problems.rows, pcfg)
    if not prompts.prompts:
        raise ValueError(f"dataset {cfg.name!r} produced no prompts")
    return problems, prompts
