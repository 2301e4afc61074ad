"""The training loop (CleanRL-style: ``Trainer.train_step`` reads top to bottom as the stages).

1. prompts of the step (a pure function of the step: exact resume)
2. rollout: G samples per prompt (vLLM workers) -> one ``RolloutBatch``
3. rewards (verifier pool; with reward.model, the learned reward model combined by reward.source)
4. planning tags (lexicon) and advantages (group baseline + HICRA), one pure function
5. old (and reference) log-probs (learner ranks)
6. update (DeepSpeed ranks)
7. weight sync (learner -> vLLM)
8. metrics (metrics actor), evaluation every M steps; ``run`` checkpoints every N steps.

The trainer talks to its actors only through ``Fleet`` / ``LearnerGroup`` / the metrics logger
interfaces (``hicra_rl.fleet``), so the step runs in a unit test with in-process fakes of them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hicra_rl import leftovers
from hicra_rl.algo import hicra_step_advantages
from hicra_rl.batch import RolloutBatch, pad_ragged
from hicra_rl.config import (
    TrainConfig,
    as_plain_dict,
    learner_process_env,
    lexicon_path,
    policy_loss_config,
    vllm_max_lora_rank,
)
from hicra_rl.evaluation import evaluate
from hicra_rl.fmt import fmt_float
from hicra_rl.iofiles import write_json_atomic, write_text_atomic
from hicra_rl.learner.sequences import build_sequences

log = logging.getLogger("hicra_rl")


def prompt_indices(step: int, n_items: int, per_step: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of the prompts of ``step``: consecutive slices of a per-epoch permutation, so the data
    position is a pure function of the step (what makes resume exact)."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(pos, n_items)
        order = np.random.default_rng([seed, epoch]).permutation(n_items) if shuffle else np.arange(n_items)
        out.append(int(order[offset]))
    return out


def rollout_seed(seed: int, step: int, round_: int = 0) -> int:
    """vLLM's sampling seed of a step (round k > 0: dynamic sampling's extra rounds)."""
    key = [seed, step, 17] if round_ == 0 else [seed, step, 17, round_]
    return int(np.random.SeedSequence(key).generate_state(1)[0] >> 1)


def extra_prompt_indices(step: int, round_: int, n_items: int, per_step: int, seed: int,
                         exclude: Sequence[int] = ()) -> list[int]:
    """Prompts of dynamic sampling's extra round ``round_`` (>= 1) of ``step``: up to ``per_step`` distinct
    items not in ``exclude`` (the step's earlier rounds), drawn with a key of (seed, step, round): a pure
    function of the step like ``prompt_indices`` (exact resume).  An item may also be a main prompt of
    another step."""
    candidates = np.setdiff1d(np.arange(n_items), np.asarray(list(exclude), dtype=np.int64))
    rng = np.random.default_rng([seed, step, round_, 29])
    return [int(i) for i in rng.choice(candidates, size=min(per_step, len(candidates)), replace=False)]


def policy_lag_stats(row_versions: Sequence[int], trained_version: int) -> dict[str, float]:
    """How old the step's samples are: a response's lag is the updates between the weights that sampled
    it (its policy version) and the weights the step's update starts from (``trained_version``).
    ``rollout/policy_lag`` is the mean over the batch's responses, ``rollout/policy_lag_max`` the largest,
    ``rollout/mixed_policy_versions`` 1.0 when the responses come from more than one version (a rollout
    worker restarted mid-generation and given other weights than the rest), else 0.0."""
    lags = [trained_version - int(v) for v in row_versions]
    return {"rollout/policy_lag": float(np.mean(lags)) if lags else 0.0,
            "rollout/policy_lag_max": float(max(lags, default=0)),
            "rollout/mixed_policy_versions": float(len(set(row_versions)) > 1)}


@dataclass
class Produced:
    """A step's scored rollouts and how they were made: the weights version the fleet held when the
    generation started (syncs done before; each response's own version, when the fleet stamps them, is in
    ``batch.policy_versions``), the generate/reward timings, the dynamic-sampling statistics and the groups
    (indices into ``batch``'s group ids) that only fill the batch up and stay out of the loss."""

    batch: RolloutBatch
    prompts: list
    version: int
    times: dict[str, float]
    stats: dict[str, float]
    fill_groups: tuple[int, ...] = ()


class Background:
    """``fn(step)`` in a daemon thread (a stuck Ray wait never blocks the interpreter's exit); ``result``
    re-raises its exception in the caller."""

    def __init__(self, step: int, fn):
        import threading

        self.step, self._out, self._err = step, None, None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=f"rollout-step-{step + 1}", daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._out = fn(self.step)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            self._err = err

    def wait(self) -> None:
        while self._thread.is_alive():  # short joins: Ctrl-C and SIGTERM still reach the main thread
            self._thread.join(0.5)

    def result(self):
        self.wait()
        if self._err is not None:
            raise self._err
        return self._out


class Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[f"timing/{name}_s"] = self.times.get(f"timing/{name}_s", 0.0) + time.perf_counter() - t0


class RunAlreadyComplete(RuntimeError):
    """The run directory already holds a checkpoint at ``trainer.total_steps`` (nothing left to train)."""


class NonFiniteUpdates(RuntimeError):
    """``trainer.max_nonfinite_updates`` updates in a row had a non-finite loss or gradient."""


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir).absolute()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.start_step = 0
        self.eval_prompts, self.eval_meta = [], []
        self.session = None
        self.nonfinite_updates = 0       # skipped updates in this process
        self.nonfinite_in_a_row = 0
        self.weights_version = 0         # weight syncs to vLLM so far (the policy that samples next)
        self._next: Background | None = None  # rollout.staleness 1: the next step's batch, in the making
        self.alpha_gate = None
        if cfg.algorithm.name == "hicra_adaptive":
            from hicra_rl.algo.adaptive_alpha import AdaptiveAlphaGate

            self.alpha_gate = AdaptiveAlphaGate(cfg.algorithm)

    @property
    def on_policy(self) -> bool:
        """One epoch over one mini-batch: the sampling policy is the one updated (no old-log-prob forward)."""
        lc = self.cfg.learner
        return lc.old_log_prob_forward == "auto" and lc.ppo_epochs == 1 and lc.mini_batches_per_step == 1

    @classmethod
    def from_parts(cls, cfg: TrainConfig, *, prompts, tagger, pad_id: int, fleet, learners, metrics,
                   eval_prompts=(), eval_meta=()) -> Trainer:
        """A trainer around given components (tests use in-process fakes of the actor interfaces)."""
        trainer = cls(cfg)
        trainer.prompts, trainer.tagger, trainer.pad_id = list(prompts), tagger, pad_id
        trainer.fleet, trainer.learners, trainer.metrics = fleet, learners, metrics
        trainer.eval_prompts, trainer.eval_meta = list(eval_prompts), list(eval_meta)
        if hasattr(fleet, "after_rollout_restart"):  # a real ``Fleet`` (the in-process fakes never restart)
            fleet.after_rollout_restart = trainer._after_rollout_restart
        return trainer

    # ------------------------------------------------------------------ set-up
    def resume_checkpoint(self) -> Path | None:
        """The checkpoint to resume from (``trainer.resume``); raises ``RunAlreadyComplete`` when it is
        already at ``total_steps``, before any actor starts."""
        from hicra_rl.learner.checkpoint import complete_checkpoints

        t = self.cfg.trainer
        if t.resume == "never":
            return None
        if t.resume == "auto":
            found = complete_checkpoints(self.ckpt_root)
            if not found:
                return None
            step, path = found[-1]
        else:
            path = Path(t.resume)
            step = int(json.loads((path / "extra.json").read_text())["step"]) if (path / "extra.json").is_file() \
                else -1
        if step >= t.total_steps:
            raise RunAlreadyComplete(
                f"run already complete at step {step} of {t.total_steps} ({path}); raise trainer.total_steps or "
                "choose a new trainer.run_dir")
        return path

    def setup(self) -> None:
        cfg, t0 = self.cfg, time.perf_counter()
        cl, lc = cfg.cluster, cfg.learner
        resume = self.resume_checkpoint()
        random.seed(cfg.trainer.seed)
        np.random.seed(cfg.trainer.seed)
        torch.manual_seed(cfg.trainer.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        leftovers.reap(self.run_dir)  # processes of an earlier run of this directory that was SIGKILLed
        write_json_atomic(self.run_dir / "config.json", as_plain_dict(cfg), indent=2)

        self.load_inputs()
        log.info("data: %d training prompts, %d eval prompts", len(self.prompts), len(self.eval_prompts))

        from hicra_rl import cluster
        from hicra_rl.actors import LearnerWorker, MetricsWorker
        from hicra_rl.fleet import FleetSession, LearnerGroup, RemoteMetrics

        bundles = {f"learner{i}": {"CPU": cl.cpus_per_actor, "GPU": cl.gpus_per_learner} for i in range(lc.num_ranks)}
        bundles["metrics"] = {"CPU": 0.25}
        adapters_only = cfg.rollout.weight_transport == "lora_adapter"   # vLLM's LoRA path (docs/lora.md)
        session = self.session = FleetSession(
            model_path=self.model_path, model_cfg=cfg.model, rollout_cfg=cfg.rollout, reward_cfg=cfg.reward,
            cluster_cfg=cl, seed=cfg.trainer.seed, extra_bundles=bundles,
            max_lora_rank=vllm_max_lora_rank(lc.lora.rank) if adapters_only else 0).__enter__()
        self.fleet = session.fleet
        self.fleet.after_rollout_restart = self._after_rollout_restart
        if cfg.rollout.staleness > 0 and cfg.algorithm.rollout_correction == "none":
            log.warning("rollout.staleness=%d without algorithm.rollout_correction: the update treats samples of "
                        "the previous policy as on-policy (consider algorithm.rollout_correction=token_tis)",
                        cfg.rollout.staleness)
        threads = cl.torch_threads or max(1, (os.cpu_count() or 1) // lc.num_ranks)
        ranks = [session.start(f"learner{i}", LearnerWorker, i, lc.num_ranks, threads, _env=learner_process_env(cl))
                 for i in range(lc.num_ranks)]
        # staleness 1: the last sync's weights stay published (one copy) for a rollout worker restarted
        # while the next step's generation overlaps the update (LearnerGroup's docstring)
        self.learners = LearnerGroup(ranks, cl.step_timeout_s, cl.device, keep_fleet_weights=cfg.rollout.staleness > 0,
                                     adapters_only=adapters_only)
        timeout = cl.actor_start_timeout_s
        addr, port = cluster.bounded_get(ranks[0].address.remote(), timeout, "learner rank 0 (address)")
        learner_kwargs = dict(
            model_path=self.model_path, dtype=cfg.model.dtype, loss=policy_loss_config(cfg),
            logits_temperature=cfg.rollout.temperature, seed=cfg.trainer.seed,
            total_steps=cfg.trainer.total_steps * lc.ppo_epochs * lc.mini_batches_per_step,
            gradient_checkpointing=cfg.model.gradient_checkpointing)
        cluster.bounded_get([w.build.remote(lc, addr, port, cl.collective_timeout_s, **learner_kwargs) for w in ranks],
                            timeout, f"learner ranks (DeepSpeed init, {lc.num_ranks} ranks at {addr}:{port})")
        session.wait_ready()

        extra = {}
        if resume is not None:
            extra = self.learners.load(str(resume))
            self.start_step = int(extra["step"])
            if self.alpha_gate is not None and "adaptive_gate" in extra:
                self.alpha_gate.load_state_dict(extra["adaptive_gate"])
            log.info("resumed from %s at step %d", resume, self.start_step)
        self.metrics = RemoteMetrics(session.start(
            "metrics", MetricsWorker, str(self.run_dir), as_plain_dict(cfg)["logging"], as_plain_dict(cfg),
            self.start_step, extra.get("rel_ppl"), self.lexicon.cluster_of, dict(cfg.data.strategies)),
            cl.step_timeout_s)
        if cfg.rollout.weight_transport == "broadcast":
            self.learners.open_weight_group(self.fleet, cfg.rollout.tensor_parallel_size, cl.collective_timeout_s)
        self.learners.sync_weights(self.fleet)  # vLLM starts from exactly the learner's weights (also after a resume)
        if session.started_ray:  # our own local Ray: if this driver is SIGKILLed, the next start stops them
            leftovers.record(self.run_dir)
        self.setup_seconds = time.perf_counter() - t0

    def load_inputs(self) -> None:
        """The model path, lexicon and data, checked and loaded before any actor starts: the user's inputs
        first (a bad path, file or row fails within seconds, before transformers loads), then the tokenizer
        and the prompts."""
        from hicra_rl.data.setup import load_problem_set, prompts_of
        from hicra_rl.models import resolve_model
        from hicra_rl.strategic.lexicon import load_lexicon
        from hicra_rl.strategic.tagger import PlanningTagger

        cfg = self.cfg
        self.model_path = resolve_model(cfg.trainer.init_checkpoint or cfg.model.path)
        if cfg.reward.model:  # a learned reward model's folder: config, a one-output head with weights, tokenizer
            from hicra_rl.rewards.model import check_reward_model_dir

            check_reward_model_dir(cfg.reward.model)
        self.lexicon = load_lexicon(lexicon_path(cfg))
        self.problems = load_problem_set(cfg.data, cfg.trainer.seed, role="train")
        eval_problems = None
        if cfg.eval_data is not None and (cfg.trainer.eval_every > 0 or cfg.trainer.eval_before_after):
            eval_problems = load_problem_set(cfg.eval_data, cfg.eval_data.seed, role="eval", exclude=self.problems)
        from transformers import AutoTokenizer  # ~6 s to import: after the checks of the user's inputs

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.tagger = PlanningTagger(self.lexicon, self.tokenizer)
        self.prompt_set = prompts_of(cfg.data, self.tokenizer, self.problems)
        self.prompts = self.prompt_set.prompts
        if eval_problems is not None:
            self.eval_prompts = prompts_of(cfg.eval_data, self.tokenizer, eval_problems).prompts
            meta = {r["id"]: r for r in eval_problems.rows}
            self.eval_meta = [meta.get(p.id, {}) for p in self.eval_prompts]

    def _after_rollout_restart(self, worker) -> int:
        """A restarted rollout worker gets the weights the rest of the fleet holds before it generates again
        (with ``rollout.staleness=1`` the last sync's kept weights, not those of the update running meanwhile);
        returns their version, which ``Fleet.generate`` stamps on the worker's responses."""
        return self.learners.restore_weights(self.fleet, worker)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        """One step.  ``rollout.staleness`` 0: generate, score, learn, sync in turn.  1: the step's batch was
        produced while the previous step trained (``_produce`` in a background thread, started here for
        the next step), so generation overlaps the update; vLLM takes the new weights once both are done."""
        t_step = time.perf_counter()
        if self.cfg.rollout.staleness == 0:
            produced = self._produce(step)
            return self._learn(step, produced, t_step, before_sync=None)
        if self._next is not None and self._next.step != step:  # not the step it was made for: let it finish
            self._next.wait()
            self._next = None
        produced = self._next.result() if self._next is not None else self._produce(step)
        self._next = None
        if step + 1 < self.cfg.trainer.total_steps:
            self._next = Background(step + 1, self._produce)  # vLLM still holds the weights that sampled `step`
        return self._learn(step, produced, t_step, before_sync=self._wait_for_next)

    def _wait_for_next(self, timer: Timer) -> None:
        """Weights change only while vLLM is idle: wait for the overlapped generation to finish first."""
        if self._next is not None:
            with timer("wait_rollout"):
                self._next.wait()

    def _produce(self, step: int) -> Produced:
        """The step's scored rollouts (generation + verifier), from the weights vLLM holds now.  With
        ``rollout.filter_groups`` (DAPO dynamic sampling) groups whose rewards are all equal are dropped
        and further rounds of prompts are generated until ``prompts_per_step`` informative groups."""
        cfg, r, timer = self.cfg, self.cfg.rollout, Timer()
        version = self.weights_version
        idx = prompt_indices(step, len(self.prompts), r.prompts_per_step, cfg.trainer.seed, cfg.data.shuffle)
        prompts = [self.prompts[i] for i in idx]
        batch = self._generate_and_score(step, prompts, rollout_seed(cfg.trainer.seed, step), timer)
        stats: dict[str, float] = {}
        fill: tuple[int, ...] = ()
        if r.filter_groups:
            batch, prompts, stats, fill = self._filter_groups(step, batch, prompts, idx, timer)
        return Produced(batch, prompts, version, timer.times, stats, fill)

    def _generate_and_score(self, step: int, prompts: list, seed: int, timer: Timer):
        r = self.cfg.rollout
        with timer("generate"):
            batch = self.fleet.generate([p.token_ids for p in prompts], r.group_size, r.temperature,
                                        r.max_new_tokens, seed)
        batch.attach_problems([p.gold_entry or p.answer for p in prompts], [p.task for p in prompts])
        if min(batch.lengths) == 0:
            raise RuntimeError(f"step {step}: vLLM returned an empty response (prompt {batch.group_ids[batch.lengths.index(0)]})")
        with timer("reward"):
            batch.scores = self.fleet.score(batch)
        if self.cfg.reward.model:  # 3b. the learned reward model, combined with the verifier (reward.source)
            with timer("reward_model"):
                self._model_rewards(batch, prompts)
        return batch

    def _model_rewards(self, batch, prompts: list) -> None:
        """The reward model's score of each (prompt text, response text) into ``batch.model_scores``, and each
        response's reward made of it and the verifier's by ``reward.source`` (``hicra_rl.rewards.combine``)."""
        import dataclasses

        from hicra_rl.rewards.combine import combine_rewards

        rw = self.cfg.reward
        batch.model_scores = self.fleet.score_model(
            [(prompts[g].text, text) for g, text in zip(batch.group_ids, batch.response_texts)])
        combined = combine_rewards(rw.source, batch.rewards, [bool(s.correct) for s in batch.scores],
                                   batch.model_scores, rw.model_weight, batch.group_ids)
        batch.scores = [dataclasses.replace(s, reward=r) for s, r in zip(batch.scores, combined.rewards)]

    def _filter_groups(self, step: int, batch, prompts: list, idx: list[int], timer: Timer):
        """DAPO dynamic sampling.  A group is informative when its responses differ in correctness
        (``rollout.filter_groups_metric=correct``, DAPO's choice; ``reward``: when the shaped rewards
        differ).  Round k >= 1 draws ``prompts_per_step`` prompts from ``extra_prompt_indices(step, k)``, a
        pure function of (seed, step, round): the data position stays exact across a resume.  After
        ``filter_groups_max_rounds`` extra rounds the step is filled up with uninformative groups so the
        learner's batch keeps its shape; their indices are returned so they stay out of the loss (DAPO
        averages over the kept groups only).  Returns (batch, prompts, stats, fill-up group indices)."""
        cfg, r = self.cfg, self.cfg.rollout
        want = r.prompts_per_step
        kept, spare, seen = [], [], 0   # (batch, group, prompt) of informative / uninformative groups
        generated = 0                   # response tokens of every round (dropped groups too)
        rounds, used = 0, list(idx)  # the main round's prompts; extra rounds exclude what the step used
        while True:
            generated += sum(batch.lengths)
            for g in range(len(prompts)):
                (kept if self._informative(batch, g) else spare).append((batch, g, prompts[g]))
            seen += len(prompts)
            if len(kept) >= want or rounds >= r.filter_groups_max_rounds:
                break
            idx = extra_prompt_indices(step, rounds + 1, len(self.prompts), want, cfg.trainer.seed, used)
            if not idx:  # every prompt of the data set was tried in this step
                break
            rounds += 1
            used = used + idx
            prompts = [self.prompts[i] for i in idx]
            batch = self._generate_and_score(step, prompts, rollout_seed(cfg.trainer.seed, step, rounds), timer)
        chosen = (kept + spare)[:want]
        out = RolloutBatch.join([b.take_groups([g]) for b, g, _ in chosen])
        every = [s.correct for b in {id(b): b for b, _, _ in kept + spare}.values() for s in b.scores]
        stats = {"dynamic_sampling/rounds": float(rounds),
                 "dynamic_sampling/filtered_frac": 1.0 - len(kept) / seen,
                 "dynamic_sampling/filled_groups": float(max(0, want - len(kept))),
                 "dynamic_sampling/generated_tokens": float(generated),
                 # the filter keeps mixed groups, so the kept batch's accuracy leans to 0.5: this is the
                 # accuracy of everything generated (what hicra_adaptive's competence reads)
                 "dynamic_sampling/accuracy_before_filter": float(np.mean(every)) if every else float("nan")}
        fill = tuple(range(min(len(kept), want), len(chosen)))  # out's group ids follow the chosen order
        return out, [p for _, _, p in chosen], stats, fill

    def _informative(self, batch, group: int) -> bool:
        """Whether ``group``'s responses differ in correctness (or in reward, with
        ``rollout.filter_groups_metric=reward``): a group that does not carries no signal."""
        by_reward = self.cfg.rollout.filter_groups_metric == "reward"
        values = {s.reward if by_reward else bool(s.correct)
                  for s, g in zip(batch.scores, batch.group_ids) if g == group}
        return len(values) > 1

    @staticmethod
    def _fill_loss_mask(batch, fill_groups: tuple[int, ...], width: int) -> torch.Tensor | None:
        """The learner's loss mask [B, width]: 0 on every token of the fill-up groups (no loss, no share
        of the token-mean or sequence-mean denominators, no entropy or KL term), 1 elsewhere; None when
        there are none."""
        if not fill_groups:
            return None
        left_out = torch.tensor([g in fill_groups for g in batch.group_ids])
        return (~left_out).float()[:, None].expand(len(batch.group_ids), width).contiguous()

    def _learn(self, step: int, produced: Produced, t_step: float, before_sync) -> dict[str, float]:
        cfg, timer = self.cfg, Timer()
        a, r = cfg.algorithm, cfg.rollout
        batch, prompts = produced.batch, produced.prompts
        trained_version = self.weights_version  # the policy this step's update starts from
        timer.times.update(produced.times)

        # 4. planning tokens and HICRA advantages (mask and SG occurrences from the same token ids)
        alpha = self.alpha_gate.alpha if self.alpha_gate is not None else a.hicra_alpha
        with timer("tag_and_advantage"):
            batch.planning_masks, batch.tagged_texts, batch.sg_occurrences = self.tagger.tag_responses(
                batch.response_ids)
            adv = hicra_step_advantages(batch.rewards, batch.group_ids, batch.planning_masks, batch.lengths,
                                        estimator=a.advantage_estimator, alpha=alpha)
        width = adv.token.shape[1]
        sequences = build_sequences(batch.prompt_ids, batch.response_ids, self.pad_id)
        sampling_lp = pad_ragged(batch.sampling_logprobs, 0.0, torch.float32, width)

        # 5. log-probs of the policy that sampled: a separate forward only when the update is not on-policy
        #    (on-policy the ratio is 1 by construction and the update's own forward gives them)
        old_lp = entropy = ref_lp = None
        with timer("old_log_probs"):
            if not self.on_policy:
                old_lp, entropy = self.learners.log_probs(sequences, width)
            if a.kl_coef > 0:
                ref_lp = self.learners.ref_log_probs(sequences, width)

        # 6. policy update (vLLM's sampling log-probs are the behaviour policy of the rollout correction)
        update_kw = {"behaviour_log_probs": sampling_lp} if self.uses_behaviour_log_probs else {}
        loss_mask = self._fill_loss_mask(batch, produced.fill_groups, width)
        if loss_mask is not None:  # dynamic sampling's fill-up groups: DAPO averages over the kept groups only
            update_kw["loss_mask"] = loss_mask
        with timer("update"):
            stats, forward_lp, forward_entropy = self.learners.update(sequences, old_lp, adv.token, ref_lp,
                                                                      **update_kw)
        if old_lp is None:
            old_lp, entropy = forward_lp, forward_entropy
        self._count_nonfinite(step, stats)

        # 7. new weights to the rollout workers (off-policy: once the overlapped generation is done)
        if before_sync is not None:
            before_sync(timer)
        with timer("sync"):
            sync = self.learners.sync_weights(self.fleet)
        self.weights_version += 1

        if cfg.trainer.dump_rollouts:
            self.dump_rollouts(step + 1, batch, adv)

        # 8. metrics (and evaluation every eval_every steps)
        extra = {**{k: float(v) for k, v in stats.items()}, **sync,
                 **self._batch_stats(batch, adv, old_lp, sampling_lp, self.logprobs_comparable), **timer.times,
                 **produced.stats}
        extra["timing/step_s"] = time.perf_counter() - t_step  # the metrics call itself is in no row
        # every token generated (under dynamic sampling: all rounds, dropped groups too) over the generation time
        generated = produced.stats.get("dynamic_sampling/generated_tokens", float(sum(batch.lengths)))
        extra["perf/generate_tokens_per_s"] = generated / max(timer.times["timing/generate_s"], 1e-9)
        extra.update(policy_lag_stats(batch.policy_versions or [produced.version] * len(batch), trained_version))
        if extra["rollout/mixed_policy_versions"]:
            log.warning("step %d: the batch mixes policy versions %s (a rollout worker restarted mid-generation got "
                        "other weights than the rest); rollout/policy_lag %.2f is the mean over its responses",
                        step + 1, sorted(set(batch.policy_versions)), extra["rollout/policy_lag"])
        extra.update(getattr(self.fleet, "faults", {}))
        if batch.model_scores:  # reward/model_*: the learned reward model's scores and agreement with the verifier
            from hicra_rl.rewards.combine import model_reward_metrics

            extra.update(model_reward_metrics(batch.model_scores, [bool(s.correct) for s in batch.scores],
                                              batch.group_ids, cfg.reward.source))
        extra["faults/nonfinite_updates"] = float(self.nonfinite_updates)
        extra["data/prompt_ids"] = [p.id for p in prompts]  # what this step trained on (resume leaves no gap)
        if self.alpha_gate is not None:
            extra.update(self.alpha_gate.metrics())
        if self.eval_prompts and cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0:
            extra.update(self.run_eval(step))
        payload = dict(
            rewards=batch.rewards, correct=[bool(s.correct) for s in batch.scores], group_ids=batch.group_ids,
            response_lengths=batch.lengths, finish_reasons=batch.finish_reasons, sg_occurrences=batch.sg_occurrences,
            response_texts=batch.tagged_texts, planning_mask=adv.planning_mask, response_mask=adv.response_mask,
            token_entropy=entropy, token_log_probs=old_lp, pass_k=r.group_size,
        )
        row = self.metrics.log_step(step + 1, payload, extra)
        if self.alpha_gate is not None:  # alpha of the next step, from this step's training metrics only
            signals = dict(row)
            if "dynamic_sampling/accuracy_before_filter" in row:
                signals["reward/accuracy"] = row["dynamic_sampling/accuracy_before_filter"]
            self.alpha_gate.update(signals)
        return row

    @property
    def uses_behaviour_log_probs(self) -> bool:
        return self.cfg.algorithm.rollout_correction != "none" or self.cfg.rollout.staleness > 0

    @property
    def logprobs_comparable(self) -> bool:
        """vLLM's reported log-probs are of the learner's distribution (pi^(1/T), no top-p truncation)."""
        r = self.cfg.rollout
        return r.top_p == 1.0 and (r.logprobs_mode == "processed_logprobs" or r.temperature == 1.0)

    def _count_nonfinite(self, step: int, stats: dict) -> None:
        """A skipped (non-finite) update is counted; ``trainer.max_nonfinite_updates`` in a row stop the run."""
        if stats.get("actor/nonfinite_skipped", 0.0) > 0:
            self.nonfinite_updates += 1
            self.nonfinite_in_a_row += 1
            limit = self.cfg.trainer.max_nonfinite_updates
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, limit %d)",
                        step + 1, self.nonfinite_in_a_row, limit)
            if self.nonfinite_in_a_row >= limit:
                raise NonFiniteUpdates(
                    f"step {step + 1}: {self.nonfinite_in_a_row} updates in a row had a non-finite loss or gradient "
                    f"(trainer.max_nonfinite_updates={limit}); stopping. The newest checkpoint in {self.ckpt_root} "
                    "holds the last finite weights")
        else:
            self.nonfinite_in_a_row = 0

    @staticmethod
    def _batch_stats(batch, adv, old_lp: torch.Tensor, sampling_lp: torch.Tensor, comparable: bool) -> dict[str, float]:
        """Advantage, verifier and sampler statistics of the step."""
        planning = adv.planning_mask.float()
        n_valid = adv.response_mask.sum().clamp_min(1)
        return {
            "advantage/mean": float(adv.sequence.mean()),
            "advantage/abs_mean": float(adv.sequence.abs().mean()),
            "advantage/planning_token_mean": float((adv.token * planning).sum() / planning.sum().clamp_min(1)),
            "reward/timeouts": float(sum(s.timed_out for s in batch.scores)),
            "reward/verifier_errors": float(sum(s.error is not None for s in batch.scores)),
            "reward/answered_frac": float(np.mean([s.extracted is not None for s in batch.scores])),
            # |log pi_learner - log pi_vLLM| per token: comparable with processed log-probs (or T = 1) and top_p 1
            # (see hicra_rl.rollout.engine); off-policy it also holds the policy lag
            "rollout/logprob_diff_vllm": float(((old_lp - sampling_lp).abs() * adv.response_mask).sum() / n_valid)
            if comparable else float("nan"),
            "rollout/generated_tokens": float(sum(batch.lengths)),
        }

    def dump_rollouts(self, step: int, batch, adv) -> None:
        """One JSON line per response: what was sampled, its reward and the credit each token got."""
        rows = []
        for i, ids in enumerate(batch.response_ids):
            n = len(ids)
            rows.append(json.dumps({
                "step": step, "group": batch.group_ids[i], "prompt_ids": list(batch.prompt_ids[i]),
                "response_ids": list(ids), "text": batch.tagged_texts[i],
                "reward": batch.scores[i].reward, "advantage": float(adv.sequence[i]),
                # the learned reward model's raw score (reward.model set; null where not finite)
                "model_score": batch.model_scores[i] if batch.model_scores and math.isfinite(batch.model_scores[i])
                else None,
                "planning_mask": [bool(x) for x in batch.planning_masks[i]],
                "token_advantages": adv.token[i, :n].tolist(), "sg_occurrences": batch.sg_occurrences[i]}))
        folder = self.run_dir / "rollouts"
        folder.mkdir(exist_ok=True)
        write_text_atomic(folder / f"step-{step}.jsonl", "\n".join(rows) + "\n")

    def run_eval(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        metrics, rows = evaluate(self.eval_prompts, self.eval_meta, self.fleet, k=cfg.trainer.eval_samples,
                                 temperature=cfg.trainer.eval_temperature, max_tokens=cfg.rollout.max_new_tokens,
                                 seed=cfg.trainer.seed + 991, strategies=dict(cfg.eval_data.strategies))
        write_json_atomic(self.run_dir / f"eval-step{step + 1}.json", {"metrics": metrics, "rows": rows}, indent=2)
        metrics["timing/eval_s"] = time.perf_counter() - t0
        return metrics

    def save(self, step_done: int) -> str:
        extra = {"step": step_done, "data_position": step_done * self.cfg.rollout.prompts_per_step,
                 "rel_ppl": self.metrics.state_dict()}
        if self.alpha_gate is not None:
            extra["adaptive_gate"] = self.alpha_gate.state_dict()
        return self.learners.save(str(self.ckpt_root), step_done, extra, self.cfg.trainer.keep_last)

    # ------------------------------------------------------------------ loop
    def run(self) -> list[dict[str, float]]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        history = []
        before_after = bool(self.eval_prompts) and cfg.trainer.eval_before_after
        if before_after and self.start_step == 0:
            m = self.run_eval(-1)  # eval-step0.json: the starting policy on the held-out set
            print(f"held-out before training: Pass@1 {fmt_float(m['eval/pass@1'], '.3f')} "
                  f"({fmt_float(m['timing/eval_s'], '.0f')} s)", flush=True)
        bar = tqdm(total=cfg.trainer.total_steps, initial=self.start_step, desc=f"{cfg.algorithm.name} steps",
                   unit="step", dynamic_ncols=True)
        for step in range(self.start_step, cfg.trainer.total_steps):
            metrics = self.train_step(step)
            done = step + 1
            if before_after and done == cfg.trainer.total_steps and "eval/pass@1" not in metrics:
                metrics.update(self.run_eval(step))  # the final evaluation (eval_every did not fall here)
            if checkpoint_due(done, cfg.trainer.total_steps, cfg.trainer.save_every):
                t0 = time.perf_counter()
                path = self.save(done)
                metrics["timing/checkpoint_s"] = time.perf_counter() - t0
                bar.write(f"checkpoint: {path}")
            history.append(metrics)
            if cfg.logging.console_every and done % cfg.logging.console_every == 0:
                bar.write(console_line(done, metrics))
            bar.update(1)
        bar.close()
        if before_after:
            line = before_after_line(self.run_dir, cfg.trainer.total_steps)
            if line:
                print(line, flush=True)
        return history

    def close(self, timeout_s: float = 60.0) -> None:
        """Close every actor the fleet session started (learners and metrics too) and release Ray; actors
        that do not close within ``timeout_s`` are killed."""
        if self.session is not None:
            self.session.close(timeout_s)
            self.session = None
            leftovers.forget(self.run_dir)


def checkpoint_due(done: int, total_steps: int, save_every: int) -> bool:
    """A checkpoint after step ``done``: every ``save_every`` steps and always after the last step
    (``save_every`` 0: only after the last one, so a finished run is never lost)."""
    return done == total_steps or (save_every > 0 and done % save_every == 0)


def before_after_line(run_dir: Path, total_steps: int) -> str | None:
    """``held-out Pass@1 0.498 -> 0.500 (+0.002; Pass@4 0.656 -> 0.648), k=4 on 64 eval-role problems`` from
    the run's eval-step0.json and eval-step<total_steps>.json; None when either is missing."""
    first, last = Path(run_dir) / "eval-step0.json", Path(run_dir) / f"eval-step{total_steps}.json"
    if not (first.is_file() and last.is_file()):
        return None
    a, b = (json.loads(f.read_text()) for f in (first, last))
    ma, mb = a["metrics"], b["metrics"]
    import re

    k = max((int(m.group(1)) for m in map(re.compile(r"eval/pass@(\d+)$").match, mb) if m), default=1)
    line = (f"held-out Pass@1 {fmt_float(ma['eval/pass@1'], '.3f')} -> {fmt_float(mb['eval/pass@1'], '.3f')} "
            f"({fmt_float(mb['eval/pass@1'] - ma['eval/pass@1'], '+.3f')}")
    if k > 1 and f"eval/pass@{k}" in mb:
        line += f"; Pass@{k} {fmt_float(ma[f'eval/pass@{k}'], '.3f')} -> {fmt_float(mb[f'eval/pass@{k}'], '.3f')}"
    return line + f"), k={k} on {int(mb['eval/n_problems'])} eval-role problems, before step 1 and after step {total_steps}"


def console_line(step: int, m: dict[str, float]) -> str:
    def f(key, spec=".3f"):
        v = m.get(key)
        return "nan" if v is None or (isinstance(v, float) and v != v) else fmt_float(v, spec)

    return (f"step {step}: reward {f('reward/mean')} acc {f('reward/accuracy')} "
            f"sem_H {f('strategic/semantic_entropy')} tokH plan/exec {f('token_entropy/planning')}/"
            f"{f('token_entropy/execution')} len {f('response/length_mean', '.0f')} "
            f"pg {f('actor/pg_loss', '.4f')} gnorm {f('actor/grad_norm')} | "
            f"gen {f('timing/generate_s', '.1f')}s rew {f('timing/reward_s', '.1f')}s "
            f"learn {f('timing/update_s', '.1f')}s sync {f('timing/sync_s', '.1f')}s "
            f"step {f('timing/step_s', '.1f')}s")


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM: the run stops, closing every actor and the Ray it started."""

    last_signal = "SIGINT"


@contextmanager
def stop_on_signals():
    """SIGTERM behaves like Ctrl-C (``Interrupted``) in the main thread; the old handlers come back after.
    Every wait of the loop returns to Python at least once a second (``cluster.POLL_S``), so either stops
    the run within seconds."""
    import signal
    import threading

    from hicra_rl.cluster import keep_signal_handlers

    def handler(signum, frame):
        Interrupted.last_signal = signal.Signals(signum).name  # Ray's waits may re-raise it as KeyboardInterrupt
        raise Interrupted(Interrupted.last_signal)

    with keep_signal_handlers():
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, handler)
        yield


def train(cfg: TrainConfig) -> list[dict[str, float]]:
    trainer = Trainer(cfg)
    with stop_on_signals():
        try:
            trainer.setup()
            history = trainer.run()
        except BaseException:
            # failed or interrupted: actors may be stuck (a dead peer, a collective): do not wait long
            trainer.close(timeout_s=2)
            raise
        trainer.close()
    return history
