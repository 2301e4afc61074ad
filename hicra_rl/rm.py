"""``hicra-rm``: learned reward models (docs/reward_models.md).

``hicra-rm train``: a reward model trained with the Bradley–Terry pairwise loss -log sigma(r_chosen - r_rejected)
(``hicra_rl.algo.bradley_terry``) on JSONL preference pairs ``{prompt, chosen, rejected}``, through the policy
learner's own gradient path (``hicra_rl.learner.reward_model.RewardLearner``: DeepSpeed, micro-batches, global
normalisers, clipping), reporting held-out pair accuracy before training and after each epoch.  Output: an HF
``<Arch>ForSequenceClassification`` folder (``num_labels=1``, ``pad_token_id`` set, the tokenizer beside it),
written atomically, that ``reward.model`` loads as is.  ``lora.rank`` > 0 trains LoRA adapters on the body and the
head in full, and saves the merged model (the same folder kind).

``hicra-rm pairs``: the CPU example's preference pairs, held out by construction: the cold start samples k
responses per problem (vLLM, the fleet of ``hicra-train``), the verifier marks them, and every problem with
both correct and incorrect responses gives pairs (a correct one chosen, an incorrect one rejected).  Training
pairs come from train-role problems, the held-out ones from eval-role problems (``hicra_rl.data.heldout``: the
two never share a problem), so the pair accuracy ``hicra-rm train`` reports is measured on problems the
reward model never saw.

Both are Hydra programs (``conf/rm.yaml``, ``conf/rm_pairs.yaml``) behind one console script: the first
argument picks the command, the rest are overrides.  A bad config value, file, row or model directory prints
one line ``hicra-rm <command>: <what, naming the file, row and field>`` and exits 2.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from hicra_rl.config import (
    MODEL_DTYPES,
    ClusterConfig,
    DataConfig,
    EvalDataConfig,
    LearnerLoraConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    _check,
    check_lora_config,
)
from hicra_rl.errors import BadInputError, InputExistsError
from hicra_rl.iofiles import write_json_atomic, write_text_atomic

log = logging.getLogger("hicra_rl")


# ---------------------------------------------------------------------------------------------- hicra-rm train
@dataclass
class RMTrainConfig:
    # what the reward model starts from: a causal LM (its body; the scalar head new) or a reward model
    model: ModelConfig = field(default_factory=ModelConfig)
    train_pairs: Optional[str] = None      # JSONL {prompt, chosen, rejected} (hicra-rm pairs writes train.jsonl)
    eval_pairs: Optional[str] = None       # held-out pairs: pair accuracy before training and after each epoch
    out_dir: str = "${oc.env:HOME}/.cache/hicra-rl/reward_models/default"
    overwrite: bool = False
    epochs: int = 2
    batch_pairs: int = 16                  # pairs per optimizer step
    micro_batch_pairs: int = 4             # pairs per forward/backward
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    zero_stage: int = 0
    max_tokens: int = 512                  # prompt + response tokens (longer: the last ones, counted)
    max_minutes: float = 60.0              # stop (and save) when the time budget is spent
    seed: int = 0
    # LoRA on the model's body (lora.rank > 0; the new scalar head trains in full); the saved reward model has
    # the adapters merged, so the pool loads it as any other (docs/reward_models.md)
    lora: LearnerLoraConfig = field(default_factory=LearnerLoraConfig)


def validate_rm(cfg: RMTrainConfig) -> None:
    """The keys' values (``train_pairs`` being set at all is checked when the run starts: ``run_rm_train``)."""
    for key in ("train_pairs", "eval_pairs"):
        path = getattr(cfg, key)
        _check(path is None or os.path.isfile(os.path.expanduser(path)), key, f"{path!r} is not an existing file")
    _check(cfg.epochs >= 1, "epochs", f"must be >= 1, got {cfg.epochs}")
    _check(cfg.batch_pairs >= 1, "batch_pairs", f"must be >= 1, got {cfg.batch_pairs}")
    _check(1 <= cfg.micro_batch_pairs <= cfg.batch_pairs, "micro_batch_pairs",
           f"must be in [1, batch_pairs={cfg.batch_pairs}], got {cfg.micro_batch_pairs}")
    _check(cfg.lr > 0, "lr", f"must be > 0, got {cfg.lr}")
    _check(cfg.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    _check(cfg.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0..3, got {cfg.zero_stage}")
    _check(cfg.max_tokens >= 2, "max_tokens", f"must be >= 2, got {cfg.max_tokens}")
    _check(cfg.max_minutes > 0, "max_minutes", f"must be > 0, got {cfg.max_minutes}")
    _check(cfg.model.dtype in MODEL_DTYPES, "model.dtype", f"{cfg.model.dtype!r} is not one of {MODEL_DTYPES}")
    check_lora_config(cfg.lora, "lora")


def rm_learner_config(cfg: RMTrainConfig):
    """The reward model's learner: AdamW, linear warmup then cosine to 10 % of ``lr``, micro-batches of
    ``micro_batch_pairs`` pairs (two rows each)."""
    from hicra_rl.config import LearnerConfig

    return LearnerConfig(zero_stage=cfg.zero_stage, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         warmup_steps=cfg.warmup_steps, scheduler="cosine", min_lr_ratio=0.1,
                         max_grad_norm=cfg.max_grad_norm, micro_batch_size=2 * cfg.micro_batch_pairs,
                         lora=cfg.lora)


def encode_pairs(tokenizer, pairs, max_tokens: int, source: str) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(chosen ids, rejected ids) of each pair (``hicra_rl.rewards.model.encode_pair``, as the scorer reads
    them) and how many texts were cut to ``max_tokens``; a text of fewer than 2 tokens is a bad row."""
    from hicra_rl.data.datasets import BadRowError
    from hicra_rl.rewards.model import encode_pair

    out, cut = [], 0
    for p in pairs:
        both = []
        for name, response in (("chosen", p.chosen), ("rejected", p.rejected)):
            ids, was_cut = encode_pair(tokenizer, p.prompt, response, max_tokens)
            if len(ids) < 2:
                raise BadRowError(source, p.row, name, f"prompt + {name} is {len(ids)} token(s); at least 2 are needed")
            cut += int(was_cut)
            both.append(ids)
        out.append((both[0], both[1]))
    return out, cut


def pair_batches(n_pairs: int, batch_pairs: int, seed: int, epoch: int, world: int = 1) -> list[list[int]]:
    """Pair indices of each optimizer step of ``epoch``: a seeded shuffle cut every ``batch_pairs`` (the last,
    shorter batch kept when every rank gets the same number of pairs from it)."""
    order = list(range(n_pairs))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    batches = [order[s:s + batch_pairs] for s in range(0, n_pairs, batch_pairs)]
    return [b for b in batches if len(b) % world == 0 and len(b) >= world]


def heldout_metrics(learner, encoded: list, batch_pairs: int) -> dict[str, float]:
    """Pair accuracy, mean Bradley–Terry loss and mean margin of ``learner`` on ``encoded`` pairs (collective)."""
    import torch

    from hicra_rl.algo.bradley_terry import bradley_terry_loss, pair_accuracy
    from hicra_rl.learner.reward_model import pair_sequences

    scores = []
    for s in range(0, len(encoded), batch_pairs):
        ids, am, rm = pair_sequences(encoded[s:s + batch_pairs], learner.pad_id)
        scores.append(learner.scores(ids, am, rm))
    s = torch.cat(scores).double()
    chosen, rejected = s[0::2], s[1::2]
    return {"eval/pair_accuracy": pair_accuracy(chosen, rejected),
            "eval/loss": float(bradley_terry_loss(chosen, rejected)),
            "eval/margin": float((chosen - rejected).mean()),
            "eval/pairs": float(len(encoded))}


def run_rm_train(cfg: RMTrainConfig) -> dict:
    """Train and write the reward model ``cfg.out_dir`` (atomically); returns ``{"out_dir", "history"}``."""
    from hicra_rl.data.preferences import load_preference_pairs
    from hicra_rl.models import resolve_model

    _check(bool(cfg.train_pairs), "train_pairs", "must name a JSONL file of {prompt, chosen, rejected} rows "
           "(hicra-rm pairs writes one)")
    validate_rm(cfg)
    out = Path(os.path.expanduser(cfg.out_dir))
    if out.exists() and not cfg.overwrite:
        raise InputExistsError(f"{out} exists; set overwrite=true to replace it")
    # the user's inputs first: a bad model path, pairs file or row fails before transformers loads
    model_path = resolve_model(cfg.model.path)
    train_path = os.path.expanduser(cfg.train_pairs)
    train = load_preference_pairs(train_path)
    held = load_preference_pairs(os.path.expanduser(cfg.eval_pairs)) if cfg.eval_pairs else None
    from transformers import AutoTokenizer  # ~6 s to import: after the checks of the user's inputs

    from hicra_rl.learner.checkpoint import save_hf_model
    from hicra_rl.learner.reward_model import RewardLearner, pair_sequences
    from hicra_rl.sft import rendezvous_port

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    enc_train, cut = encode_pairs(tokenizer, train, cfg.max_tokens, train_path)
    enc_held, cut_held = encode_pairs(tokenizer, held, cfg.max_tokens, cfg.eval_pairs) if held else ([], 0)
    if cut or cut_held:
        log.warning("rm: %d training and %d held-out texts were longer than max_tokens=%d (their last tokens kept)",
                    cut, cut_held, cfg.max_tokens)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    steps_per_epoch = len(pair_batches(len(enc_train), cfg.batch_pairs, cfg.seed, 1, world))
    if steps_per_epoch == 0:
        raise BadInputError(f"{train_path}: {len(enc_train)} pairs cannot give each of {world} ranks a pair")
    learner = RewardLearner(rm_learner_config(cfg), model_path=model_path, dtype=cfg.model.dtype, seed=cfg.seed,
                            total_steps=steps_per_epoch * cfg.epochs, rank=rank, world_size=world,
                            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                            master_port=rendezvous_port(world))
    t0 = time.perf_counter()
    history: list[dict] = []

    def report(epoch: int, train_stats: list[dict]) -> None:
        row: dict = {"epoch": epoch, "minutes": (time.perf_counter() - t0) / 60}
        if train_stats:
            for key in ("rm/loss", "rm/accuracy", "rm/margin", "rm/grad_norm"):
                row[key.replace("rm/", "train/")] = float(sum(s[key] for s in train_stats) / len(train_stats))
            row["train/steps"] = len(train_stats)
            row["train/nonfinite_skipped"] = float(sum(s["rm/nonfinite_skipped"] for s in train_stats))
        if enc_held:
            row.update(heldout_metrics(learner, enc_held, cfg.batch_pairs))
        history.append(row)
        if rank == 0:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "minutes")
            print(f"rm: epoch {epoch}: {shown}", flush=True)

    report(0, [])  # before training: the starting point (a new head: about 0.5)
    stopped = False
    for epoch in range(1, cfg.epochs + 1):
        stats = []
        for batch in pair_batches(len(enc_train), cfg.batch_pairs, cfg.seed, epoch, world):
            mine = batch[rank::world]
            ids, am, rm = pair_sequences([enc_train[i] for i in mine], learner.pad_id)
            stats.append(learner.train_pairs(ids, am, rm))
            # every rank leaves at the same step (rank 0's clock decides)
            if learner.broadcast_from_rank0(float((time.perf_counter() - t0) / 60 > cfg.max_minutes)):
                log.warning("rm: time budget of %.1f min spent in epoch %d; saving", cfg.max_minutes, epoch)
                stopped = True
                break
        report(epoch, stats)
        if stopped:
            break
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    save_hf_model(learner, tmp)
    if rank == 0:
        (tmp / "rm_history.json").write_text(json.dumps(
            {"train_pairs": str(train_path), "eval_pairs": cfg.eval_pairs, "base_model": model_path,
             "max_tokens": cfg.max_tokens, "truncated": {"train": cut, "eval": cut_held}, "history": history},
            indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        print(f"rm: reward model in {out} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    learner.close()
    return {"out_dir": str(out), "history": history}


# ---------------------------------------------------------------------------------------------- hicra-rm pairs
@dataclass
class RMPairsConfig:
    model: ModelConfig = field(default_factory=ModelConfig)     # the policy that answers: the cold start
    data: DataConfig = field(default_factory=DataConfig)        # training pairs: its train-role problems
    eval_data: EvalDataConfig = field(default_factory=EvalDataConfig)  # held-out pairs: eval-role problems
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)  # the verifier that marks the responses
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    k: int = 8                          # responses sampled per problem
    temperature: float = 1.0
    max_pairs_per_problem: int = 4
    seed: int = 0
    out_dir: str = "runs/rm_pairs/${model.name}-${data.name}"
    overwrite: bool = False


def validate_rm_pairs(cfg: RMPairsConfig) -> None:
    _check(cfg.k >= 2, "k", f"pairs need at least 2 responses per problem, got {cfg.k}")
    _check(cfg.temperature > 0, "temperature", f"must be > 0 (greedy samples are all alike), got {cfg.temperature}")
    _check(cfg.max_pairs_per_problem >= 1, "max_pairs_per_problem", f"must be >= 1, got {cfg.max_pairs_per_problem}")
    _check(cfg.rollout.num_workers >= 1, "rollout.num_workers", "must be >= 1")
    _check(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _check(cfg.model.dtype in MODEL_DTYPES, "model.dtype", f"{cfg.model.dtype!r} is not one of {MODEL_DTYPES}")
    for group in ("data", "eval_data"):
        d = getattr(cfg, group)
        _check(d.max_prompt_tokens + cfg.rollout.max_new_tokens <= cfg.model.max_model_len, "model.max_model_len",
               f"{cfg.model.max_model_len} is shorter than {group}.max_prompt_tokens ({d.max_prompt_tokens}) + "
               f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens})")


def build_pairs(prompt_texts: Sequence[str], problem_ids: Sequence[str], responses: Sequence[str],
                correct: Sequence[bool], group_ids: Sequence[int], max_per_problem: int,
                seed: int) -> list[dict]:
    """Preference pairs from scored samples: for each problem (group) with both correct and incorrect
    responses, (correct, incorrect) combinations of its distinct response texts, at most ``max_per_problem``,
    drawn with a seed of (``seed``, problem id).  ``prompt_texts`` / ``problem_ids`` are per group."""
    right: dict[int, list[str]] = {}
    wrong: dict[int, list[str]] = {}
    for text, ok, g in zip(responses, correct, group_ids):
        bucket = (right if ok else wrong).setdefault(g, [])
        if text not in bucket:
            bucket.append(text)
    out = []
    for g in sorted(set(right) & set(wrong)):
        combos = [(c, w) for c in right[g] for w in wrong[g] if c != w]
        random.Random(f"{seed}:{problem_ids[g]}").shuffle(combos)
        for n, (c, w) in enumerate(combos[:max_per_problem]):
            out.append({"id": f"{problem_ids[g]}-p{n}", "prompt": prompt_texts[g], "chosen": c, "rejected": w})
    return out


def sample_pairs(prompts: list, fleet, *, k: int, temperature: float, max_tokens: int, seed: int,
                 max_per_problem: int) -> tuple[list[dict], dict[str, float]]:
    """``k`` responses per prompt from ``fleet`` (``generate`` + ``score``: ``hicra_rl.fleet.Fleet`` or an
    in-process equivalent), marked by the verifier, made into pairs (:func:`build_pairs`); and statistics."""
    batch = fleet.generate([p.token_ids for p in prompts], k, temperature, max_tokens, seed)
    if len(batch) != len(prompts) * k:
        raise RuntimeError(f"expected {len(prompts) * k} responses, got {len(batch)}")
    batch.attach_problems([p.gold_entry or p.answer for p in prompts], [p.task for p in prompts])
    correct = [bool(r.correct) for r in fleet.score(batch)]
    pairs = build_pairs([p.text for p in prompts], [p.id for p in prompts], batch.response_texts, correct,
                        batch.group_ids, max_per_problem, seed)
    groups = {g: [c for c, h in zip(correct, batch.group_ids) if h == g] for g in set(batch.group_ids)}
    stats = {"problems": float(len(prompts)), "responses": float(len(batch)),
             "accuracy": float(sum(correct) / max(len(correct), 1)),
             "mixed_problems": float(sum(1 for v in groups.values() if any(v) and not all(v))),
             "pairs": float(len(pairs))}
    return pairs, stats


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def run_rm_pairs(cfg: RMPairsConfig) -> dict:
    """Sample, mark and pair (see the module docstring); writes ``train.jsonl``, ``eval.jsonl`` and
    ``pairs.json`` (statistics) into ``cfg.out_dir``."""
    from hicra_rl.data.setup import load_problem_set, prompts_of
    from hicra_rl.fleet import FleetSession
    from hicra_rl.models import resolve_model

    validate_rm_pairs(cfg)
    out = Path(os.path.expanduser(cfg.out_dir))
    if (out / "train.jsonl").exists() and not cfg.overwrite:
        raise InputExistsError(f"{out / 'train.jsonl'} exists; set overwrite=true to replace it")
    t0 = time.perf_counter()
    model_path = resolve_model(cfg.model.path)   # the user's inputs first: a bad path or file fails in seconds
    train_problems = load_problem_set(cfg.data, cfg.seed, role="train")
    eval_problems = load_problem_set(cfg.eval_data, cfg.eval_data.seed, role="eval", exclude=train_problems)
    from transformers import AutoTokenizer  # ~6 s to import: after the checks of the user's inputs

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_prompts = prompts_of(cfg.data, tokenizer, train_problems).prompts
    eval_prompts = prompts_of(cfg.eval_data, tokenizer, eval_problems).prompts
    reward = replace(cfg.reward, model=None, source="verifier")  # the verifier marks; no reward model here
    with FleetSession(model_path=model_path, model_cfg=cfg.model, rollout_cfg=cfg.rollout, reward_cfg=reward,
                      cluster_cfg=cfg.cluster, seed=cfg.seed) as session:
        session.wait_ready()
        common = dict(k=cfg.k, temperature=cfg.temperature, max_tokens=cfg.rollout.max_new_tokens,
                      max_per_problem=cfg.max_pairs_per_problem)
        train_pairs, train_stats = sample_pairs(train_prompts, session.fleet, seed=cfg.seed, **common)
        eval_pairs, eval_stats = sample_pairs(eval_prompts, session.fleet, seed=cfg.seed + 1, **common)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "train.jsonl", _jsonl(train_pairs))
    write_text_atomic(out / "eval.jsonl", _jsonl(eval_pairs))
    summary = {"model": model_path, "train": {"data": cfg.data.name, "role": "train", **train_stats},
               "eval": {"data": cfg.eval_data.name, "role": "eval", **eval_stats}, "k": cfg.k,
               "temperature": cfg.temperature, "max_new_tokens": cfg.rollout.max_new_tokens,
               "minutes": (time.perf_counter() - t0) / 60}
    write_json_atomic(out / "pairs.json", summary, indent=2)
    print(f"rm pairs: {len(train_pairs)} training pairs ({int(train_stats['mixed_problems'])} of "
          f"{int(train_stats['problems'])} train-role problems mixed, accuracy {train_stats['accuracy']:.3f}), "
          f"{len(eval_pairs)} held-out pairs ({int(eval_stats['mixed_problems'])} of {int(eval_stats['problems'])} "
          f"eval-role problems) in {out}", flush=True)
    if not train_pairs or not eval_pairs:
        log.warning("rm pairs: no %s pairs: every problem's responses were all right or all wrong (raise k or "
                    "data.size)", "training" if not train_pairs else "held-out")
    return summary


# ---------------------------------------------------------------------------------------------- the console script
COMMANDS = {"train": ("rm", "train a reward model (Bradley-Terry) on preference pairs"),
            "pairs": ("rm_pairs", "sample the CPU example's preference pairs from the cold start")}
USAGE = ("usage: hicra-rm {train,pairs} [key=value ...]\n"
         + "".join(f"  {name:6s} {what} (conf/{conf}.yaml)\n" for name, (conf, what) in COMMANDS.items())
         + "e.g. hicra-rm pairs, then hicra-rm train train_pairs=runs/rm_pairs/<dir>/train.jsonl "
           "eval_pairs=runs/rm_pairs/<dir>/eval.jsonl")


def main() -> None:
    from hicra_rl.config import hydra_entry

    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        asked = len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help")
        print(USAGE, file=sys.stdout if asked else sys.stderr)
        if not asked:
            got = f"unknown command {sys.argv[1]!r}" if len(sys.argv) >= 2 else "no command"
            print(f"hicra-rm: {got} (train or pairs)", file=sys.stderr)
        sys.exit(0 if asked else 2)
    command = sys.argv.pop(1)
    if command == "train":
        hydra_entry("hicra-rm train", "rm", RMTrainConfig, validate_rm, run_rm_train)
    else:
        hydra_entry("hicra-rm pairs", "rm_pairs", RMPairsConfig, validate_rm_pairs, run_rm_pairs)


if __name__ == "__main__":
    main()
