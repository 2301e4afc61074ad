"""Evaluation: k samples per problem at the paper's T = 0.6, Pass@1 averaged over k, Pass@k, accuracy by
subject / level, mean response length.  ``evaluate`` is what periodic evaluation in the training loop
calls; ``hicra-eval`` runs it on a fleet of its own and writes ``eval.json`` and ``eval.md``."""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hicra_rl.config import (
    MODEL_DTYPES,
    ClusterConfig,
    EvalDataConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    _check,
)
from hicra_rl.fmt import fmt_float
from hicra_rl.iofiles import write_json_atomic, write_text_atomic
from hicra_rl.metrics.passk import mean_pass_at_k

log = logging.getLogger("hicra_rl")


def summarise(rows: list[dict[str, Any]], k: int, prefix: str = "eval/") -> dict[str, float]:
    """``rows``: one per problem with ``correct`` (list of k bools), ``lengths``, optional subject/level."""
    correct = [r["correct"] for r in rows]
    out = {
        f"{prefix}pass@1": mean_pass_at_k(correct, 1),
        f"{prefix}pass@{k}": mean_pass_at_k(correct, k),
        f"{prefix}response_length": float(np.mean([x for r in rows for x in r["lengths"]])),
        f"{prefix}boxed_frac": float(np.mean([x for r in rows for x in r["answered"]])),
        f"{prefix}n_problems": float(len(rows)),
    }
    for key in ("subject", "level"):
        groups: dict[str, list] = defaultdict(list)
        for r in rows:
            if r.get(key) not in (None, ""):
                groups[str(r[key])].append(r["correct"])
        for name, rs in sorted(groups.items()):
            out[f"{prefix}pass@1/{key}={name}"] = mean_pass_at_k(rs, 1)
    return out


def strategy_summary(rows: list[dict[str, Any]], strategies: dict[str, str],
                     prefix: str = "eval/") -> dict[str, float]:
    """``<prefix>strategy_share=<name>`` and ``<prefix>strategy_accuracy=<name>`` of each strategy named in
    ``strategies`` (name -> announcing phrase; ``none`` too when some response announced none)."""
    from hicra_rl.metrics.strategies import strategy_table

    out = {}
    for r in strategy_table(rows, strategies):
        out[f"{prefix}strategy_share={r['strategy']}"] = r["share"]
        out[f"{prefix}strategy_accuracy={r['strategy']}"] = r["accuracy"]
    return out


def evaluate(prompts: list, problems_meta: list[dict], fleet, *, k: int, temperature: float, max_tokens: int,
             seed: int, strategies: dict[str, str] | None = None) -> tuple[dict[str, float], list[dict]]:
    """``fleet``: ``generate(prompt_ids, n, temperature, max_tokens, seed) -> RolloutBatch`` and
    ``score(batch) -> [VerifyResult]`` (``hicra_rl.fleet.Fleet`` or an in-process equivalent).  With
    ``strategies`` (``data.strategies``) the share and accuracy of each strategy too."""
    batch = fleet.generate([p.token_ids for p in prompts], k, temperature, max_tokens, seed)
    if len(batch) != len(prompts) * k:
        raise RuntimeError(f"expected {len(prompts) * k} responses, got {len(batch)}")
    batch.attach_problems([p.gold_entry or p.answer for p in prompts], [p.task for p in prompts])
    results = fleet.score(batch)
    rows = []
    for j, p in enumerate(prompts):
        rs = results[j * k:(j + 1) * k]
        meta = problems_meta[j] if j < len(problems_meta) else {}
        rows.append({
            "id": p.id, "answer": p.answer, "subject": meta.get("subject"), "level": meta.get("level"),
            "correct": [bool(x.correct) for x in rs],
            "extracted": [x.extracted for x in rs],
            "answered": [x.extracted is not None for x in rs],
            "lengths": batch.lengths[j * k:(j + 1) * k],
            "responses": batch.response_texts[j * k:(j + 1) * k],
        })
    metrics = summarise(rows, k)
    if strategies:
        metrics.update(strategy_summary(rows, strategies))
    return metrics, rows


# ---------------------------------------------------------------------------- hicra-eval
@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    k: int = 4
    temperature: float = 0.6
    seed: int = 0
    out_dir: str = "runs/eval"


def validate_eval(cfg: EvalConfig) -> None:
    _check(cfg.k >= 1, "k", f"must be >= 1, got {cfg.k}")
    _check(cfg.temperature >= 0, "temperature", "must be >= 0")
    _check(cfg.rollout.num_workers >= 1, "rollout.num_workers", "must be >= 1")
    _check(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _check(cfg.model.dtype in MODEL_DTYPES, "model.dtype", f"{cfg.model.dtype!r} is not one of {MODEL_DTYPES}")
    # as hicra-train: vLLM would refuse (or cut) the prompts and responses that do not fit; a model=... preset
    # sets max_model_len and dtype (e.g. model=qwen3_4b_base for a Qwen3-4B checkpoint)
    _check(cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens <= cfg.model.max_model_len, "model.max_model_len",
           f"{cfg.model.max_model_len} (model {cfg.model.name!r}) is shorter than data.max_prompt_tokens "
           f"({cfg.data.max_prompt_tokens}) + rollout.max_new_tokens ({cfg.rollout.max_new_tokens}); choose the "
           "checkpoint's model preset (model=...) or set model.max_model_len")


def markdown_table(metrics: dict[str, float], model: str, data: str, k: int, temperature: float) -> str:
    lines = [f"# Evaluation: {model} on {data} (k={k}, T={temperature})", "", "| metric | value |", "| --- | --- |"]
    for key, value in metrics.items():
        lines.append(f"| {key} | {fmt_float(value, '.4f')} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def run_eval(cfg: EvalConfig) -> dict[str, float]:
    from hicra_rl.data.setup import load_problem_set, prompts_of
    from hicra_rl.fleet import FleetSession
    from hicra_rl.models import resolve_model

    validate_eval(cfg)
    t0 = time.perf_counter()
    model_path = resolve_model(cfg.model.path)  # the user's inputs first: a bad path or file fails in seconds
    problems = load_problem_set(cfg.data, cfg.data.seed, role="eval")
    from transformers import AutoTokenizer  # ~6 s to import: after the checks of the user's inputs

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = prompts_of(cfg.data, tokenizer, problems).prompts
    meta = {r["id"]: r for r in problems.rows}
    with FleetSession(model_path=model_path, model_cfg=cfg.model, rollout_cfg=cfg.rollout, reward_cfg=cfg.reward,
                      cluster_cfg=cfg.cluster, seed=cfg.seed) as session:
        session.wait_ready()
        metrics, rows = evaluate(prompts, [meta.get(p.id, {}) for p in prompts], session.fleet, k=cfg.k,
                                 temperature=cfg.temperature, max_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed,
                                 strategies=dict(cfg.data.strategies))
    metrics["eval/seconds"] = time.perf_counter() - t0
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": model_path, "data": cfg.data.name, "k": cfg.k, "temperature": cfg.temperature,
               "metrics": metrics, "rows": rows}
    table = markdown_table(metrics, model_path, cfg.data.name, cfg.k, cfg.temperature)
    write_json_atomic(out / "eval.json", payload)
    write_text_atomic(out / "eval.md", table)
    print(table)
    return metrics


def main() -> None:
    from hicra_rl.config import hydra_entry

    hydra_entry("hicra-eval", "eval", EvalConfig, validate_eval, run_eval)


if __name__ == "__main__":
    main()
