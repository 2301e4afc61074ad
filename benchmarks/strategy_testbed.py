"""The strategy-choice testbed's cold start, per strategy and difficulty, on held-out problems (issue 21).

    python benchmarks/strategy_testbed.py [--model DIR] [--problems 128] [--k 4] [--out DIR] [DIFFICULTY ...]

A DIFFICULTY is ``TERMS:DIGITS[:OPS]`` (e.g. ``3:1:+``: three one-digit terms added, ``5:2``: five terms of 1-2
digits joined by + and -)
or a data config name (``strat_hard``).  One vLLM fleet samples k responses at T = 0.6 to each of N
eval-role problems of basic_arithmetic at each difficulty (none is a training or cold-start problem:
hicra_rl/data/heldout.py) and tags each response's strategy by its announcement (``data.strategies`` of
conf/data/strat_mix.yaml).  Prints and writes ``testbed.md`` / ``testbed.json``: per difficulty the overall
Pass@1, each strategy's share and accuracy, the semantic entropy of the strategy choice and the gap.
The testbed's criteria (issue 21): each strategy in >= 25 % of responses, accuracies >= 20 points apart,
overall accuracy 0.10-0.35 (hard) and 0.65-0.90 (easy).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = os.path.expanduser("~/.cache/hicra-rl/cold_start/smollm2_135m-strat-v1")


def compose(overrides: list[str], config_name: str = "eval"):
    """The typed hicra-eval config with ``overrides`` (Hydra's compose, the entry point's own schema)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from hicra_rl.config import CONF_DIR, typed_config
    from hicra_rl.evaluation import EvalConfig, validate_eval

    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base=None):
        return typed_config(EvalConfig, hydra_compose(config_name, overrides=overrides), validate_eval)


def difficulty_overrides(spec: str) -> list[str]:
    """``TERMS:DIGITS[:OPS]`` (OPS: ``+`` or ``+-``, default ``+-``) or a data config name."""
    if ":" not in spec:
        return [f"data={spec}"]
    terms, digits, *ops = spec.split(":")
    ops = ops[0] if ops else "+-"
    if not ops or set(ops) - {"+", "-"}:
        raise SystemExit(f"strategy_testbed: {spec!r}: operators must be '+' or '+-'")
    name = f"terms{terms}_digits{digits}" + ("_plus" if ops == "+" else "")
    return ["data=strat_mix", f"data.name={name}", f"data.task_config.min_terms={int(terms)}",
            f"data.task_config.max_terms={int(terms)}", "data.task_config.min_digits=1",
            f"data.task_config.max_digits={int(digits)}",
            "data.task_config.operators=[" + ",".join(f"'{o}'" for o in ops) + "]"]


def choice_entropy(shares: dict[str, float]) -> float:
    """Shannon entropy (nats) of the strategy choice."""
    return -sum(p * math.log(p) for p in shares.values() if p > 0)


def write_tables(results: dict, args, t0: float, first) -> str:
    """``testbed.md`` / ``testbed.json`` under ``args.out`` (rewritten after each difficulty: nothing is lost)."""
    from hicra_rl.iofiles import write_json_atomic, write_text_atomic

    lines = [f"# Strategy-choice testbed: the cold start on held-out problems ({args.model})", "",
             f"k = {first.k} samples at T = {first.temperature} to each of N eval-role problems "
             f"(`python benchmarks/strategy_testbed.py {' '.join(args.argv)}`, "
             f"{(time.perf_counter() - t0) / 60:.1f} min).", "",
             "| difficulty | N | Pass@1 | left_to_right share | direct share | none | left_to_right acc | direct acc | "
             "gap (points) | choice entropy (nats) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for spec, r in results.items():
        by = {s["strategy"]: s for s in r["strategies"]}
        none = by.get("none", {"share": 0.0})["share"]
        lines.append(f"| {spec} ({r['data']}) | {r['problems']} | {r['pass@1']:.3f} | {by['left_to_right']['share']:.2f} | "
                     f"{by['direct']['share']:.2f} | {none:.2f} | {by['left_to_right']['accuracy']:.3f} | "
                     f"{by['direct']['accuracy']:.3f} | {100 * r['gap']:+.1f} | {r['choice_entropy']:.3f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "testbed.md", "\n".join(lines) + "\n")
    write_json_atomic(out / "testbed.json", results, indent=1)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("difficulties", nargs="*", default=["3:1", "3:2", "4:2", "5:2"])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--problems", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (training runs use 1.0)")
    p.add_argument("--out", default="benchmarks/results/strategy_choice/cold_start")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    from transformers import AutoTokenizer

    from hicra_rl.data.setup import load_prompts
    from hicra_rl.evaluation import evaluate
    from hicra_rl.fleet import FleetSession
    from hicra_rl.metrics.strategies import strategy_table

    common = [f"model.path={args.model}", f"data.size={args.problems}", f"k={args.k}", f"temperature={args.temperature}",
              f"rollout.max_new_tokens={args.max_new_tokens}"]
    cfgs = {d: compose(difficulty_overrides(d) + common) for d in args.difficulties}
    first = next(iter(cfgs.values()))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    results = {}
    t0 = time.perf_counter()
    with FleetSession(model_path=args.model, model_cfg=first.model, rollout_cfg=first.rollout,
                      reward_cfg=first.reward, cluster_cfg=first.cluster, seed=first.seed) as session:
        session.wait_ready()
        for spec, cfg in cfgs.items():
            strategies = dict(cfg.data.strategies)
            problems, prompt_set = load_prompts(cfg.data, tokenizer, cfg.data.seed, role="eval")
            metrics, rows = evaluate(prompt_set.prompts, [], session.fleet, k=cfg.k, temperature=cfg.temperature,
                                     max_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed, strategies=strategies)
            table = strategy_table(rows, strategies)
            shares = {r["strategy"]: r["share"] for r in table if r["strategy"] != "none"}
            acc = {r["strategy"]: r["accuracy"] for r in table}
            results[spec] = {"data": cfg.data.name, "task_config": dict(cfg.data.task_config),
                             "problems": len(rows), "k": cfg.k, "temperature": cfg.temperature,
                             "pass@1": metrics["eval/pass@1"], "strategies": table,
                             "choice_entropy": choice_entropy(shares),
                             "gap": (acc.get("left_to_right", math.nan) - acc.get("direct", math.nan)),
                             "first_problem_ids": [r["id"] for r in rows[:3]]}
            print(f"{spec}: pass@1 {metrics['eval/pass@1']:.3f}  " + "  ".join(
                f"{r['strategy']} {r['share']:.2f} share, {r['accuracy']:.3f} acc" for r in table), flush=True)
            write_tables(results, args, t0, first)
    print(write_tables(results, args, t0, first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
