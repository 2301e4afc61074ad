"""From a ``DataConfig`` to tokenised prompts (the glue between the config schema and hicra_rl.data).

Callers say which role a set plays (see :mod:`hicra_rl.data.heldout`):

- ``role="train"``: RL training (``hicra-train``'s ``data``);
- ``role="cold_start"``: the SFT warm-up (``hicra-sft``'s ``data``);
- ``role="eval"``: evaluation (``hicra-train``'s ``eval_data``, ``hicra-eval``'s ``data``).

``split`` keeps its meaning, the published split a file/hub source reads (GSM8K: train or test; MATH-500 is
test only; DAPO-Math-17k and DeepScaleR are train only); a role that contradicts it is refused (no training
on a test split, no evaluation on a train split).  For reasoning-gym the role picks the item-seed block and
the share of the problem space, so the three roles never share a problem, whatever the run seed.  The same
run seed may (and should) be passed for every role.  ``role=None`` infers it from the split (test -> eval,
otherwise train).  ``exclude=`` (e.g. the training set) drops every problem whose normalised text it holds,
logging the count.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from hicra_rl.data.datasets import (
    DatasetSpec,
    FieldMap,
    ProblemSet,
    builtin_spec,
    load_problems,
)
from hicra_rl.data.heldout import check_split, drop_seen, heldout_task_problems
from hicra_rl.data.prompts import PromptConfig, PromptSet, build_prompts
from hicra_rl.errors import BadInputError

log = logging.getLogger(__name__)

BUILTINS = {"gsm8k": None, "math500": "math500", "dapo_math_17k": "dapo_math_17k", "deepscaler": "deepscaler"}


def data_split(cfg) -> str:
    """The split ``cfg`` really reads: fixed for MATH-500 (test) and DAPO-Math-17k / DeepScaleR (train)."""
    if cfg.source == "math500":
        return "test"
    if cfg.source in ("dapo_math_17k", "deepscaler"):
        return "train"
    if cfg.source == "gsm8k":
        split = "test" if cfg.split == "test" else "train"
        stem = Path(cfg.path).stem if cfg.path else ""
        if stem in ("train", "test") and stem != split:
            raise BadInputError(f"data {cfg.name!r}: split {cfg.split!r} but data.path {cfg.path} is the GSM8K {stem} "
                             "file (drop data.path to use the split's shipped file)")
        return split
    return cfg.split


def resolve_role(cfg, role: str | None) -> str:
    """``role``, checked against the split; None -> "eval" for a test split, else "train"."""
    split = data_split(cfg)
    role = role or ("eval" if split == "test" else "train")
    check_split(role, split, f"data {cfg.name!r} (source {cfg.source}, split {split})")
    return role


def load_problem_set(cfg, seed: int, role: str | None = None, exclude=None) -> ProblemSet:
    """``cfg`` is a :class:`hicra_rl.config.DataConfig`; ``role`` one of train / cold_start / eval;
    ``exclude`` a set whose problems are removed (see :func:`hicra_rl.data.heldout.drop_seen`)."""
    role = resolve_role(cfg, role)
    problems = _load(cfg, seed, role)
    log.info("%s: %d problems for role %s (%s)", cfg.name, len(problems), role, problems.source)
    if exclude is not None:
        problems = drop_seen(problems, exclude, f"{cfg.name} ({role})")
    return problems


def _load(cfg, seed: int, role: str) -> ProblemSet:
    if cfg.source == "reasoning_gym":
        if not cfg.task:
            raise BadInputError("data.task must name a reasoning-gym task when data.source=reasoning_gym")
        try:
            return heldout_task_problems(cfg.task, cfg.size, seed, role, dict(cfg.task_config))
        except (AssertionError, TypeError, KeyError) as exc:  # reasoning-gym's own checks of its config
            raise BadInputError(f"data {cfg.name!r}: reasoning-gym task {cfg.task!r} rejected data.task_config="
                             f"{dict(cfg.task_config)}: {type(exc).__name__}: {exc}") from exc
        except ValueError as exc:  # data.task unknown, data.size out of range: say which data group
            raise BadInputError(f"data {cfg.name!r}: {exc}") from exc
    if cfg.size is not None and cfg.size < 0:
        raise BadInputError(f"data {cfg.name!r}: data.size must be >= 0 (0: every row of the file), got {cfg.size}")
    overrides = {"on_bad_row": cfg.on_bad_row}
    if cfg.fields:
        known = [f.name for f in dataclasses.fields(FieldMap)]
        unknown = sorted(set(cfg.fields) - set(known))
        if unknown:
            raise BadInputError(f"data {cfg.name!r}: data.fields has unknown key(s) {unknown}; known: {', '.join(known)}")
        overrides["fields"] = FieldMap(**dict(cfg.fields))
    if cfg.source in BUILTINS:
        name = BUILTINS[cfg.source] or f"gsm8k_{data_split(cfg)}"
        spec = builtin_spec(name, path=cfg.path, **overrides)
    elif cfg.source in ("file", "jsonl", "parquet", "disk"):
        if not cfg.path:
            raise BadInputError(f"data.path is required when data.source={cfg.source}")
        spec = DatasetSpec(name=cfg.name, path=cfg.path, split=cfg.split, **overrides)
    elif cfg.source == "hub":
        spec = DatasetSpec(name=cfg.name, hub=cfg.path, split=cfg.split, **overrides)
    else:
        raise BadInputError(f"data {cfg.name!r}: data.source {cfg.source!r} is not one of reasoning_gym, "
                         f"{', '.join(BUILTINS)}, file (or jsonl / parquet / disk), hub")
    problems = load_problems(spec)
    if problems.n_skipped:
        log.warning("%s: skipped %d bad rows (on_bad_row=skip), first: %s", cfg.name, problems.n_skipped,
                    problems.skipped[0])
    if cfg.size and len(problems) > cfg.size:
        problems.rows = problems.rows.select(range(cfg.size))
    return problems


def load_prompts(cfg, tokenizer, seed: int, role: str | None = None, exclude=None) -> tuple[ProblemSet, PromptSet]:
    """The problems (see :func:`load_problem_set`) and their chat prompts."""
    problems = load_problem_set(cfg, seed, role, exclude)
    return problems, prompts_of(cfg, tokenizer, problems)


def prompts_of(cfg, tokenizer, problems: ProblemSet) -> PromptSet:
    """The chat prompts of ``problems`` (loaded from ``cfg``): entry points load the problems first, so that
    a bad data file fails before the tokenizer (and transformers) loads."""
    if cfg.max_prompt_tokens <= 0:
        raise BadInputError(f"data {cfg.name!r}: data.max_prompt_tokens must be > 0, got {cfg.max_prompt_tokens}")
    # ``data.chat_template`` is read when the config schema has it (for a tokenizer without a template)
    pcfg = PromptConfig(system=cfg.system_prompt, max_prompt_tokens=cfg.max_prompt_tokens,
                        on_too_long="skip" if cfg.on_bad_row == "skip" else "error",
                        chat_template=getattr(cfg, "chat_template", None) or None)
    prompts = build_prompts(tokenizer, problems.rows, pcfg)
    if not prompts.prompts:
        raise BadInputError(f"dataset {cfg.name!r} produced no prompts")
    return prompts
