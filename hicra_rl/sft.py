"""``hicra-sft``: supervised cold start with the same DeepSpeed learner code as RL.

Loss on response tokens only (token-mean NLL), prompts through the chat template, length-bucketed
batches.  Worked solutions come from a dataset field (GSM8K's human solutions, rewritten to end in
``\\boxed{}``) or are generated for a procedural task family (``arithmetic``: reasoning-gym
``basic_arithmetic`` / ``chain_sum`` expressions with + and -, solved step by step with one of two
strategies, so that strategic diversity is something the model can learn and semantic entropy can see).
Output: an HF model directory, written atomically.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hicra_rl.config import MODEL_DTYPES, DataConfig, LearnerLoraConfig, ModelConfig, _check, check_lora_config
from hicra_rl.errors import BadInputError, InputExistsError
from hicra_rl.iofiles import write_text_atomic

log = logging.getLogger("hicra_rl")

_TOKEN = re.compile(r"\s*([+-])\s*|\s*(\d+)\s*")


def parse_additive_expression(expression: str) -> list[int]:
    """``"5 - 33 + 2"`` -> signed terms ``[5, -33, 2]``.  Only non-negative integers joined by + and -
    (no eval of any text)."""
    terms, sign, expect_number, pos = [], 1, True, 0
    expression = expression.strip()
    while pos < len(expression):
        m = _TOKEN.match(expression, pos)
        if not m or m.end() == pos:
            raise ValueError(f"unsupported character at {pos} in expression {expression!r}")
        op, num = m.group(1), m.group(2)
        if expect_number:
            if num is None:
                raise ValueError(f"expected a number at {pos} in {expression!r}")
            terms.append(sign * int(num))
            expect_number = False
        else:
            if op is None:
                raise ValueError(f"expected + or - at {pos} in {expression!r}")
            sign = 1 if op == "+" else -1
            expect_number = True
        pos = m.end()
    if expect_number or not terms:
        raise ValueError(f"incomplete expression {expression!r}")
    return terms


def _fmt_step(left: int, term: int) -> str:
    op = "+" if term >= 0 else "-"
    return f"{left} {op} {abs(term)} = {left + term}"


ARITHMETIC_STRATEGIES = ("left_to_right", "group_signs", "direct")
# the sentence each strategy opens with: where the choice is made (hicra-sg mines it as a Strategic Gram; the
# strategy-choice testbed, conf/data/strat_*.yaml, tags responses by it)
STRATEGY_ANNOUNCEMENTS = {
    "left_to_right": "Let's work from left to right.",
    "group_signs": "We can add the positive terms first and then subtract the rest.",
    "direct": "Let's add it all up in one step.",
}


def arithmetic_worked_solution(expression: str, strategy: str) -> str:
    """A step-by-step solution ending in ``\\boxed{}``.

    ``left_to_right``: combine the terms one at a time.  ``group_signs``: add up the terms that are
    added, add up the terms that are subtracted, then subtract once (two-term sums fall back to
    ``left_to_right``, the same single step).  ``direct``: the whole expression and its value in one line
    (no intermediate results: a small model must get every carry right at once).
    """
    if strategy not in ARITHMETIC_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (one of {', '.join(ARITHMETIC_STRATEGIES)})")
    terms = parse_additive_expression(expression)
    total = sum(terms)
    if strategy == "group_signs" and len(terms) == 2:
        strategy = "left_to_right"
    lines = [STRATEGY_ANNOUNCEMENTS[strategy]]
    if strategy == "left_to_right":
        acc = terms[0]
        for t in terms[1:]:
            lines.append(_fmt_step(acc, t))
            acc += t
    elif strategy == "group_signs":
        plus = [t for t in terms if t >= 0]
        minus = [-t for t in terms if t < 0]
        p, m = sum(plus), sum(minus)
        lines.append(f"Added: {' + '.join(map(str, plus))} = {p}" if len(plus) > 1 else f"Added: {p}")
        if minus:
            lines.append(f"Subtracted: {' + '.join(map(str, minus))} = {m}" if len(minus) > 1 else f"Subtracted: {m}")
            lines.append(f"{p} - {m} = {p - m}")
    else:  # direct
        shown = str(terms[0]) + "".join(f" {'+' if t >= 0 else '-'} {abs(t)}" for t in terms[1:])
        lines.append(f"{shown} = {total}")
    lines.append(f"So the final answer is \\boxed{{{total}}}.")
    return "\n".join(lines)


def gsm8k_worked_solution(solution: str) -> str:
    """GSM8K's human solution without calculator annotations, its ``#### n`` line as ``\\boxed{n}``."""
    body, _, final = solution.rpartition("####")
    if not _:
        raise ValueError("GSM8K solution has no '####' line")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    answer = final.strip().replace(",", "")
    return f"{body}\nSo the final answer is \\boxed{{{answer}}}."


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solutions: str = "arithmetic"       # arithmetic | gsm8k | a field name holding the solution text
    # solutions=arithmetic: the strategies drawn uniformly at random for each problem, independently of it
    # (ARITHMETIC_STRATEGIES; the strategy-choice testbed uses [left_to_right, direct])
    strategies: list = field(default_factory=lambda: ["left_to_right", "group_signs"])
    out_dir: str = "${oc.env:HOME}/.cache/hicra-rl/cold_start/default"
    lr: float = 5e-5
    warmup_steps: int = 5
    batch_size: int = 16
    micro_batch_size: int = 8
    max_steps: int = 30
    max_minutes: float = 15.0          # stop (and save) when the time budget is spent
    zero_stage: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    bucket_factor: int = 2             # sort by length within windows of bucket_factor * batch_size
    overwrite: bool = False
    corpus_out: Optional[str] = None   # write the worked solutions as JSONL ({"id", "answer"}) and stop
    # LoRA adapters instead of full fine-tuning (lora.rank > 0; the learner's learner.lora, docs/lora.md): out_dir
    # gets the merged model, and the adapters alone in out_dir/adapter
    lora: LearnerLoraConfig = field(default_factory=LearnerLoraConfig)


def validate_sft(cfg: SFTConfig) -> None:
    _check(cfg.solutions in ("arithmetic", "gsm8k") or bool(cfg.solutions), "solutions", "must be set")
    # GSM8K's human solutions exist for GSM8K's own problems only: say so before any data or model loads
    _check(cfg.solutions != "gsm8k" or cfg.data.source == "gsm8k", "solutions",
           f"solutions=gsm8k writes GSM8K's human solutions and needs GSM8K's train data (add data=gsm8k), got "
           f"data {cfg.data.name!r} (source {cfg.data.source!r})")
    _check(cfg.batch_size >= 1 and cfg.batch_size % cfg.micro_batch_size == 0, "micro_batch_size",
           f"batch_size {cfg.batch_size} must be a multiple of micro_batch_size {cfg.micro_batch_size}")
    _check(cfg.max_steps >= 1, "max_steps", "must be >= 1")
    _check(cfg.lr > 0, "lr", "must be > 0")
    _check(cfg.max_minutes > 0, "max_minutes", "must be > 0")
    _check(len(cfg.strategies) >= 1 and len(set(cfg.strategies)) == len(cfg.strategies)
           and all(x in ARITHMETIC_STRATEGIES for x in cfg.strategies), "strategies",
           f"must be distinct names from {list(ARITHMETIC_STRATEGIES)}, got {list(cfg.strategies)}")
    _check(cfg.model.dtype in MODEL_DTYPES, "model.dtype", f"{cfg.model.dtype!r} is not one of {MODEL_DTYPES}")
    check_lora_config(cfg.lora, "lora")


def solution_for(row: dict, solutions: str, rng: random.Random,
                 strategies: tuple = ("left_to_right", "group_signs")) -> str:
    if solutions == "arithmetic":
        gold = json.loads(row["gold_entry"]) if row.get("gold_entry") else None
        expression = (gold or {}).get("metadata", {}).get("expression")
        if not expression:
            raise BadInputError(f"row {row['id']}: no arithmetic expression in the task metadata (solutions=arithmetic "
                             "needs reasoning-gym basic_arithmetic or chain_sum with + and - only)")
        return arithmetic_worked_solution(expression, rng.choice(list(strategies)))
    if solutions == "gsm8k":
        if not row.get("raw_solution"):
            raise BadInputError(f"row {row['id']}: no GSM8K solution text found for it (solutions=gsm8k needs GSM8K train)")
        return gsm8k_worked_solution(row["raw_solution"])
    if solutions not in row or not isinstance(row[solutions], str) or not row[solutions].strip():
        raise BadInputError(f"row {row.get('id')}: field {solutions!r} (the worked solution) is missing or empty")
    return row[solutions]


def load_sft_problems(cfg: SFTConfig):
    """The cold start's problems (role ``cold_start``)."""
    from hicra_rl.data.setup import load_problem_set

    return load_problem_set(cfg.data, cfg.seed, role="cold_start")


def build_examples(cfg: SFTConfig, tokenizer, problems=None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per training row (``problems``: ``load_sft_problems(cfg)`` if None)."""
    from hicra_rl.data.setup import prompts_of

    problems = load_sft_problems(cfg) if problems is None else problems
    prompt_set = prompts_of(cfg.data, tokenizer, problems)
    rows = {r["id"]: r for r in problems.rows}
    if cfg.solutions == "gsm8k":  # the human solution text is the raw answer field
        from hicra_rl.data.datasets import builtin_spec

        spec = builtin_spec("gsm8k_train", path=cfg.data.path)
        with open(spec.path, encoding="utf-8") as f:  # ids are "<name>-<line number>", as the loader makes them
            raw = {f"{spec.name}-{n}": json.loads(line)["answer"] for n, line in enumerate(f, start=1) if line.strip()}
        for row_id, r in rows.items():
            rows[row_id] = {**r, "raw_solution": raw.get(row_id)}
    rng = random.Random(cfg.seed)
    examples = []
    for p in prompt_set.prompts:
        text = solution_for(rows[p.id], cfg.solutions, rng, tuple(cfg.strategies))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((p.token_ids, ids))
    return examples


def write_corpus(cfg: SFTConfig, tokenizer, path: str, problems=None) -> int:
    """The cold start's worked solutions as a JSONL corpus (e.g. for ``hicra-sg mine --corpus``)."""
    examples = build_examples(cfg, tokenizer, problems)
    write_text_atomic(path, "".join(
        json.dumps({"id": i, "answer": tokenizer.decode(ids, skip_special_tokens=True)}) + "\n"
        for i, (_, ids) in enumerate(examples)))
    return len(examples)


def length_bucketed_batches(examples: list, batch_size: int, bucket_factor: int, seed: int) -> list[list[int]]:
    """Shuffle, then sort by length inside windows of ``bucket_factor * batch_size`` (less padding)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = max(batch_size, batch_size * bucket_factor)
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window], key=lambda i: len(examples[i][0]) + len(examples[i][1]))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def nll_loss(mb) -> tuple:
    """Token-mean NLL of the response tokens (the learner's global token count normalises it)."""
    loss = -(mb.log_probs * mb.mask).sum() / mb.token_normalizer
    return loss, {"sft/nll": float(loss.detach())}, {}


def nll_step(learner, input_ids, attention_mask, response_mask) -> dict[str, float]:
    """One optimizer step of token-mean NLL over the response tokens, through the learner's one
    gradient path (micro-batches, global counts, accumulation, clipping)."""
    out = learner.gradient_step(input_ids, attention_mask, response_mask, nll_loss)
    return {"sft/nll": out["sft/nll"], "sft/tokens": out["n_tokens"], "sft/grad_norm": out["grad_norm"],
            "sft/padding_frac": out["padding_frac"], "sft/forward_tokens": out["forward_tokens"]}


def learner_config(cfg: SFTConfig):
    """The cold start's learner: cosine schedule to 10 % of ``lr`` after ``warmup_steps``."""
    from hicra_rl.config import LearnerConfig

    return LearnerConfig(zero_stage=cfg.zero_stage, lr=cfg.lr, warmup_steps=cfg.warmup_steps, scheduler="cosine",
                         min_lr_ratio=0.1, max_grad_norm=cfg.max_grad_norm, micro_batch_size=cfg.micro_batch_size,
                         lora=cfg.lora)


def rendezvous_port(world_size: int) -> int:
    """The process group's port: ``MASTER_PORT`` when a launcher (torchrun) set it; a free port for a single
    process, so two ``hicra-sft`` runs on one machine (or one beside ``make run``'s) do not collide."""
    if "MASTER_PORT" in os.environ:
        return int(os.environ["MASTER_PORT"])
    if world_size > 1:
        raise BadInputError(f"WORLD_SIZE is {world_size} but MASTER_PORT is not set: launch the ranks with torchrun")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sft(cfg: SFTConfig) -> str:
    """Train and write the HF directory ``cfg.out_dir`` (atomically); returns its path."""
    from hicra_rl.models import resolve_model

    validate_sft(cfg)
    out = Path(os.path.expanduser(cfg.out_dir))
    if not cfg.corpus_out and out.exists() and not cfg.overwrite:
        raise InputExistsError(f"{out} exists; set overwrite=true to replace it")
    # the user's inputs first: a bad model path, data file or row fails before transformers loads
    model_path = resolve_model(cfg.model.path)
    problems = load_sft_problems(cfg)
    from transformers import AutoTokenizer  # ~6 s to import: after the checks of the user's inputs

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if cfg.corpus_out:
        n = write_corpus(cfg, tokenizer, cfg.corpus_out, problems)
        print(f"sft: wrote {n} worked solutions to {cfg.corpus_out}")
        return cfg.corpus_out
    from tqdm.auto import tqdm

    from hicra_rl.learner.checkpoint import save_adapter, save_hf_model
    from hicra_rl.learner.engine import PolicyLearner
    from hicra_rl.learner.sequences import build_sequences

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = build_examples(cfg, tokenizer, problems)
    batches = length_bucketed_batches(examples, cfg.batch_size, cfg.bucket_factor, cfg.seed)
    if not batches:
        raise BadInputError(f"{len(examples)} examples are fewer than one batch of {cfg.batch_size}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    learner = PolicyLearner(learner_config(cfg), model_path=model_path, dtype=cfg.model.dtype, seed=cfg.seed,
                            total_steps=cfg.max_steps, rank=rank, world_size=world,
                            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                            master_port=rendezvous_port(world))
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, desc="sft", unit="step", disable=rank != 0)
    history = []
    for step in range(cfg.max_steps):
        batch = batches[step % len(batches)]
        mine = batch[rank::world]
        ids, am, rm = build_sequences([examples[i][0] for i in mine], [examples[i][1] for i in mine], pad_id)
        stats = nll_step(learner, ids, am, rm)
        history.append(stats)
        bar.set_postfix(nll=f"{stats['sft/nll']:.3f}")
        bar.update(1)
        # every rank must leave the loop at the same step (the next step's collectives would hang):
        # rank 0's clock decides
        if learner.broadcast_from_rank0(float((time.perf_counter() - t0) / 60 > cfg.max_minutes)):
            log.warning("sft: time budget of %.1f min spent after %d steps; saving", cfg.max_minutes, step + 1)
            break
    bar.close()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    save_hf_model(learner, tmp)
    if learner.lora:
        save_adapter(learner, tmp / "adapter")
    if rank == 0:
        (tmp / "sft_history.json").write_text(json.dumps(
            {"steps": len(history), "minutes": (time.perf_counter() - t0) / 60, "history": history}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        print(f"sft: {len(history)} steps in {(time.perf_counter() - t0) / 60:.1f} min, final nll "
              f"{history[-1]['sft/nll']:.3f}; model in {out}")
    return str(out)


def main() -> None:
    from hicra_rl.config import hydra_entry

    hydra_entry("hicra-sft", "sft", SFTConfig, validate_sft, run_sft)


if __name__ == "__main__":
    main()
