"""``hicra-eval``: Pass@1 (averaged over k samples) and Pass@k at T = 0.6 through the vLLM rollout
workers and the verifier pool; writes ``eval.json`` and ``eval.md`` in ``out_dir``."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hicra_rl.config import (
    ClusterConfig,
    EvalDataConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    _check,
)

log = logging.getLogger("hicra_rl")


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


def markdown_table(metrics: dict[str, float], model: str, data: str, k: int, temperature: float) -> str:
    lines = [f"# Evaluation: {model} on {data} (k={k}, T={temperature})", "", "| metric | value |", "| --- | --- |"]
    for key, value in metrics.items():
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def run_eval(cfg: EvalConfig) -> dict[str, float]:
    import ray
    from transformers import AutoTokenizer

    from hicra_rl import cluster
    from hicra_rl.data.setup import load_prompts
    from hicra_rl.evaluation import evaluate
    from hicra_rl.fleet import Fleet, fleet_bundles, start_rollout_workers, start_verifiers
    from hicra_rl.models import resolve_model

    validate_eval(cfg)
    t0 = time.perf_counter()
    model_path = resolve_model(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    problems, prompt_set = load_prompts(cfg.data, tokenizer, cfg.seed + 1)
    meta = {r["id"]: r for r in problems.rows}
    prompts = prompt_set.prompts
    started = not ray.is_initialized() and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    cluster.connect(cfg.cluster.address, cfg.cluster.num_cpus)
    cl, r = cfg.cluster, cfg.rollout
    bundles = fleet_bundles(r, cfg.reward, cl)
    reservation = cluster.reserve(bundles, cl.actor_start_timeout_s)
    opts = lambda name: dict(scheduling_strategy=reservation.strategy(name), num_cpus=bundles[name].get("CPU", 0),  # noqa: E731
                             num_gpus=bundles[name].get("GPU", 0))
    rollouts = start_rollout_workers(ray, r.num_workers, model_path, cfg.model, r, cfg.seed, opts)
    verifiers = start_verifiers(ray, cfg.reward, r.max_new_tokens, opts)
    try:
        cluster.bounded_get([w.ready.remote() for w in rollouts], cl.actor_start_timeout_s, "rollout workers (vLLM start-up)")
        fleet = Fleet(rollouts, verifiers, cl.step_timeout_s, r.top_p, list(r.stop))
        metrics, rows = evaluate(prompts, [meta.get(p.id, {}) for p in prompts], generate=fleet.generate,
                                 score=fleet.score, k=cfg.k, temperature=cfg.temperature,
                                 max_tokens=r.max_new_tokens, seed=cfg.seed)
    finally:
        for w in rollouts:
            try:
                ray.get(w.close.remote(), timeout=120)
            except Exception as err:
                log.warning("closing a rollout worker: %s", err)
        for group in (rollouts, verifiers):
            for w in group:
                ray.kill(w)
        reservation.release()
        if started:
            ray.shutdown()
    metrics["eval/seconds"] = time.perf_counter() - t0
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": model_path, "data": cfg.data.name, "k": cfg.k, "temperature": cfg.temperature,
               "metrics": metrics, "rows": rows}
    for name, text in (("eval.json", json.dumps(payload, indent=1)),
                       ("eval.md", markdown_table(metrics, model_path, cfg.data.name, cfg.k, cfg.temperature))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    print(markdown_table(metrics, model_path, cfg.data.name, cfg.k, cfg.temperature))
    return metrics


def main() -> None:
    from hicra_rl.config import hydra_entry

    hydra_entry("hicra-eval", "eval", EvalConfig, validate_eval, run_eval)


if __name__ == "__main__":
    main()
