"""The training loop (CleanRL-style: one readable function per stage).

prompts -> rollout (vLLM workers) -> rewards (verifier pool) -> planning tags (lexicon) ->
advantages (GRPO + HICRA) -> old log-probs -> update (DeepSpeed ranks) -> weight sync ->
metrics (metrics actor) -> checkpoint every N -> evaluation every M.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from hicra_rl.algo import compute_advantages, hicra_advantages
from hicra_rl.batch import pad_ragged
from hicra_rl.config import TrainConfig, as_plain_dict, lexicon_path
from hicra_rl.evaluation import evaluate
from hicra_rl.fleet import Fleet, fleet_bundles, start_rollout_workers, start_verifiers

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


def rollout_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step, 17]).generate_state(1)[0] >> 1)


def response_layout_mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def learner_config(cfg: TrainConfig, model_path: str) -> dict:
    """The learner's own config (hicra_rl.learner.engine.LearnerConfig) from the run config."""
    a, l = cfg.algorithm, cfg.learner
    return dict(
        model_path=model_path, zero_stage=l.zero_stage,
        dtype={"float32": "fp32", "bfloat16": "bf16"}.get(cfg.model.dtype, "fp32"),
        optimizer="torch_adamw" if l.torch_optimizer else "deepspeed_adamw",
        lr=l.lr, weight_decay=l.weight_decay, lr_scheduler=l.scheduler, warmup_steps=l.warmup_steps,
        total_steps=cfg.trainer.total_steps * l.ppo_epochs * l.mini_batches_per_step,
        max_grad_norm=l.max_grad_norm, micro_batch_size=l.micro_batch_size,
        num_mini_batches=l.mini_batches_per_step, ppo_epochs=l.ppo_epochs,
        gradient_checkpointing=cfg.model.gradient_checkpointing, logprob_chunk_size=l.logprob_chunk_size,
        logits_temperature=cfg.rollout.temperature, seed=cfg.trainer.seed, use_reference_model=a.kl_coef > 0,
        loss=dict(clip_ratio_low=a.clip_ratio_low, clip_ratio_high=a.clip_ratio_high, dual_clip_c=a.dual_clip_c,
                  agg_mode=a.loss_agg_mode, entropy_coef=a.entropy_coef, kl_coef=a.kl_coef,
                  kl_estimator=a.kl_estimator),
    )


class Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[f"timing/{name}_s"] = self.times.get(f"timing/{name}_s", 0.0) + time.perf_counter() - t0


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir).absolute()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.start_step = 0
        self._started_ray = False
        self.actors: dict[str, list] = {}

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        import ray
        from transformers import AutoTokenizer

        from hicra_rl import cluster
        from hicra_rl.actors import LearnerWorker, MetricsWorker
        from hicra_rl.data.setup import load_prompts
        from hicra_rl.learner.checkpoint import find_latest_complete
        from hicra_rl.models import resolve_model
        from hicra_rl.strategic.lexicon import load_lexicon
        from hicra_rl.strategic.tagger import PlanningTagger

        cfg, t0 = self.cfg, time.perf_counter()
        random.seed(cfg.trainer.seed)
        np.random.seed(cfg.trainer.seed)
        torch.manual_seed(cfg.trainer.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.run_dir / "config.json", as_plain_dict(cfg))

        resume = None
        if cfg.trainer.resume == "auto":
            resume = find_latest_complete(self.ckpt_root)
        elif cfg.trainer.resume != "never":
            resume = Path(cfg.trainer.resume)
        self.model_path = cfg.trainer.init_checkpoint or resolve_model(cfg.model.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.tagger = PlanningTagger(load_lexicon(lexicon_path(cfg)), self.tokenizer)
        self.problems, self.prompt_set = load_prompts(cfg.data, self.tokenizer, cfg.trainer.seed)
        self.prompts = self.prompt_set.prompts
        self.eval_prompts, self.eval_meta = [], []
        if cfg.eval_data is not None and cfg.trainer.eval_every > 0:
            eval_problems, eval_set = load_prompts(cfg.eval_data, self.tokenizer, cfg.trainer.seed + 1)
            self.eval_prompts = eval_set.prompts
            meta = {r["id"]: r for r in eval_problems.rows}
            self.eval_meta = [meta.get(p.id, {}) for p in self.eval_prompts]
        log.info("data: %d training prompts, %d eval prompts", len(self.prompts), len(self.eval_prompts))

        cl, r, lc = cfg.cluster, cfg.rollout, cfg.learner
        self._started_ray = not ray.is_initialized() and not (cl.address or os.environ.get("RAY_ADDRESS"))
        cluster.connect(cl.address, cl.num_cpus)
        bundles = {}
        for i in range(lc.num_ranks):
            bundles[f"learner{i}"] = {"CPU": cl.cpus_per_actor, "GPU": cl.gpus_per_learner}
        bundles.update(fleet_bundles(r, cfg.reward, cl))
        bundles["metrics"] = {"CPU": 0.25}
        self.reservation = cluster.reserve(bundles, cl.actor_start_timeout_s)
        opts = lambda name, **kw: dict(scheduling_strategy=self.reservation.strategy(name),  # noqa: E731
                                       num_cpus=bundles[name].get("CPU", 0), num_gpus=bundles[name].get("GPU", 0), **kw)
        threads = cl.torch_threads or max(1, (os.cpu_count() or 1) // lc.num_ranks)
        self.learners = [ray.remote(LearnerWorker).options(**opts(f"learner{i}")).remote(i, lc.num_ranks, threads)
                         for i in range(lc.num_ranks)]
        self.rollouts = start_rollout_workers(ray, r.num_workers, self.model_path, cfg.model, r, cfg.trainer.seed, opts)
        self.verifiers = start_verifiers(ray, cfg.reward, r.max_new_tokens, opts)
        self.fleet = Fleet(self.rollouts, self.verifiers, cl.step_timeout_s, r.top_p, list(r.stop))

        timeout = cl.actor_start_timeout_s
        addr, port = cluster.bounded_get(self.learners[0].address.remote(), timeout, "learner rank 0 (address)")
        lcfg = learner_config(cfg, self.model_path)
        cluster.bounded_get([w.build.remote(lcfg, addr, port, cl.collective_timeout_s) for w in self.learners],
                            timeout, f"learner ranks (DeepSpeed init, {lc.num_ranks} ranks at {addr}:{port})")
        startup = cluster.bounded_get([w.ready.remote() for w in self.rollouts], timeout,
                                      "rollout workers (vLLM start-up)")
        cluster.bounded_get([v.stats.remote() for v in self.verifiers], timeout, "verifier pool start-up")
        log.info("vLLM engines started in %s s", [round(s, 1) for s in startup])

        extra = {}
        if resume is not None:
            extra = cluster.bounded_get([w.load.remote(str(resume)) for w in self.learners],
                                        cl.step_timeout_s, f"learner ranks (loading {resume})")[0]
            self.start_step = int(extra["step"])
            log.info("resumed from %s at step %d", resume, self.start_step)
        self.metrics = ray.remote(MetricsWorker).options(**opts("metrics")).remote(
            str(self.run_dir), as_plain_dict(cfg)["logging"], as_plain_dict(cfg), self.start_step,
            extra.get("rel_ppl"))
        if r.weight_transport == "broadcast":
            self._open_weight_group()
        self.sync_weights()  # vLLM starts from exactly the learner's weights (also after a resume)
        self.setup_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ stages
    def _get(self, refs, what: str):
        from hicra_rl.cluster import bounded_get

        return bounded_get(refs, self.cfg.cluster.step_timeout_s, what)

    def _rank_shards(self, n: int) -> list[slice]:
        per = n // len(self.learners)
        return [slice(i * per, (i + 1) * per) for i in range(len(self.learners))]

    def _open_weight_group(self) -> None:
        """Transport ``broadcast``: one process group of learner rank 0 and every vLLM worker (NCCL on GPU,
        gloo on CPU), so rollout workers on other nodes receive the weights over the network."""
        cfg = self.cfg
        tp = cfg.rollout.tensor_parallel_size
        world = 1 + tp * len(self.rollouts)
        backend = "nccl" if cfg.cluster.device == "cuda" else "gloo"
        timeout = cfg.cluster.collective_timeout_s
        host, port = self._get(self.learners[0].open_weight_group.remote(world, backend, timeout),
                               "learner rank 0 (weight group rendezvous)")
        refs = [self.learners[0].connect_weight_group.remote()] + [
            w.join_weight_group.remote(host, port, world, 1 + i * tp, backend, timeout)
            for i, w in enumerate(self.rollouts)]
        self._get(refs, f"weight group ({world} members at {host}:{port})")

    def sync_weights(self) -> dict[str, float]:
        t0 = time.perf_counter()
        handles = self._get([w.publish_weights.remote() for w in self.learners], "learner ranks (gather weights)")
        handle = handles[0]
        try:
            receives = [w.receive_weights.remote(handle) for w in self.rollouts]
            if handle.transport == "broadcast":  # sender and receivers run the collective together
                self._get(self.learners[0].send_weights.remote(), "learner rank 0 (weight broadcast)")
            stats = self._get(receives, "rollout workers (weight sync)")
        finally:
            self._get(self.learners[0].release_weights.remote(handle), "learner rank 0 (release weights)")
        return {"sync/megabytes": stats[0]["megabytes"], "sync/write_s": handle.write_seconds,
                "sync/load_s": max(s["load_seconds"] for s in stats), "sync/total_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        cfg, timer = self.cfg, Timer()
        a, r = cfg.algorithm, cfg.rollout
        t_step = time.perf_counter()
        idx = prompt_indices(step, len(self.prompts), r.prompts_per_step, cfg.trainer.seed, cfg.data.shuffle)
        prompts = [self.prompts[i] for i in idx]

        with timer("generate"):
            responses = self.fleet.generate([p.token_ids for p in prompts], r.group_size, r.temperature,
                                      r.max_new_tokens, rollout_seed(cfg.trainer.seed, step))
        prompt_ids = [prompts[x["group_index"]].token_ids for x in responses]
        response_ids = [x["token_ids"] for x in responses]
        group_ids = [x["group_index"] for x in responses]
        lengths = [len(ids) for ids in response_ids]
        if min(lengths) == 0:
            raise RuntimeError(f"step {step}: vLLM returned an empty response (prompt {group_ids[lengths.index(0)]})")

        with timer("reward"):
            items = [(x["text"], prompts[x["group_index"]].gold_entry or prompts[x["group_index"]].answer,
                      prompts[x["group_index"]].task) for x in responses]
            results = self.fleet.score(items, lengths, [x["finish_reason"] == "stop" for x in responses])
        rewards = [res["reward"] for res in results]

        with timer("tag_and_advantage"):
            masks = self.tagger.tag_batch(response_ids)
            occurrences = [self.tagger.find_occurrences(x["text"]) for x in responses]
            width = max(lengths)
            planning = pad_ragged([list(m) for m in masks], False, torch.bool, width)
            seq_adv = compute_advantages(a.advantage_estimator, torch.tensor(rewards, dtype=torch.float32), group_ids)
            token_adv = hicra_advantages(seq_adv, planning, a.hicra_alpha)
            resp_mask = response_layout_mask(lengths, width)
            token_adv = token_adv * resp_mask

        from hicra_rl.learner.sequences import build_sequences

        input_ids, attention_mask, response_mask = build_sequences(prompt_ids, response_ids, self.pad_id)
        shards = self._rank_shards(len(responses))
        with timer("old_log_probs"):
            parts = self._get([w.compute_log_probs.remote(input_ids[s], attention_mask[s], response_mask[s], width)
                               for w, s in zip(self.learners, shards)], "learner ranks (old log-probs)")
            old_lp = torch.cat([p[0] for p in parts])
            entropy = torch.cat([p[1] for p in parts])
            ref_lp = None
            if a.kl_coef > 0:
                ref_lp = torch.cat(self._get(
                    [w.compute_ref_log_probs.remote(input_ids[s], attention_mask[s], response_mask[s], width)
                     for w, s in zip(self.learners, shards)], "learner ranks (reference log-probs)"))

        with timer("update"):
            batches = []
            for s in shards:
                b = dict(input_ids=input_ids[s], attention_mask=attention_mask[s], response_mask=response_mask[s],
                         old_log_probs=old_lp[s], advantages=token_adv[s])
                if ref_lp is not None:
                    b["ref_log_probs"] = ref_lp[s]
                batches.append(b)
            stats = self._get([w.update.remote(b) for w, b in zip(self.learners, batches)],
                              "learner ranks (update)")[0]

        with timer("sync"):
            sync = self.sync_weights()

        sampling_lp = pad_ragged([x["logprobs"] for x in responses], 0.0, torch.float32, width)
        n_valid = resp_mask.sum().clamp_min(1)
        extra = {
            **{k: float(v) for k, v in stats.items()},
            **sync,
            "advantage/mean": float((seq_adv).mean()),
            "advantage/abs_mean": float(seq_adv.abs().mean()),
            "advantage/planning_token_mean": float((token_adv * planning).sum() / planning.sum().clamp_min(1)),
            "reward/timeouts": float(sum(res["timed_out"] for res in results)),
            "reward/verifier_errors": float(sum(res["error"] is not None for res in results)),
            "reward/answered_frac": float(np.mean([res["extracted"] is not None for res in results])),
            "rollout/logprob_diff_vllm": float(((old_lp - sampling_lp).abs() * resp_mask).sum() / n_valid)
            if r.temperature == 1.0 else float("nan"),
            "rollout/generated_tokens": float(sum(lengths)),
        }
        # the metrics actor's own time lands in no row (the row is written by that call); timing/step_s ends here
        payload = dict(
            rewards=rewards, correct=[bool(res["correct"]) for res in results], group_ids=group_ids,
            response_lengths=lengths, finish_reasons=[x["finish_reason"] for x in responses],
            sg_occurrences=occurrences, response_texts=[x["text"] for x in responses],
            planning_mask=planning, response_mask=resp_mask, token_entropy=entropy, token_log_probs=old_lp,
            pass_k=r.group_size,
        )
        extra.update(timer.times)
        extra["timing/step_s"] = time.perf_counter() - t_step
        extra["perf/generate_tokens_per_s"] = sum(lengths) / max(timer.times["timing/generate_s"], 1e-9)
        if self.eval_prompts and cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0:
            extra.update(self.run_eval(step))
        metrics = self._get(self.metrics.log_step.remote(step + 1, payload, extra), "metrics actor")
        return metrics

    def run_eval(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        metrics, rows = evaluate(
            self.eval_prompts, self.eval_meta,
            generate=self.fleet.generate, score=self.fleet.score, k=cfg.trainer.eval_samples, temperature=cfg.trainer.eval_temperature,
            max_tokens=cfg.rollout.max_new_tokens, seed=cfg.trainer.seed + 991,
        )
        _write_json_atomic(self.run_dir / f"eval-step{step + 1}.json", {"metrics": metrics, "rows": rows})
        metrics["timing/eval_s"] = time.perf_counter() - t0
        return metrics

    def save(self, step_done: int) -> str:
        rel = self._get(self.metrics.state_dict.remote(), "metrics actor (state)")
        extra = {"step": step_done, "data_position": step_done * self.cfg.rollout.prompts_per_step, "rel_ppl": rel}
        paths = self._get([w.save.remote(str(self.ckpt_root), step_done, extra, self.cfg.trainer.keep_last)
                           for w in self.learners], "learner ranks (checkpoint)")
        return paths[0]

    # ------------------------------------------------------------------ loop
    def run(self) -> list[dict[str, float]]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        history = []
        bar = tqdm(total=cfg.trainer.total_steps, initial=self.start_step, desc=f"{cfg.algorithm.name} steps",
                   unit="step", dynamic_ncols=True)
        for step in range(self.start_step, cfg.trainer.total_steps):
            metrics = self.train_step(step)
            done = step + 1
            if cfg.trainer.save_every and (done % cfg.trainer.save_every == 0 or done == cfg.trainer.total_steps):
                t0 = time.perf_counter()
                path = self.save(done)
                metrics["timing/checkpoint_s"] = time.perf_counter() - t0
                bar.write(f"checkpoint: {path}")
            history.append(metrics)
            if cfg.logging.console_every and done % cfg.logging.console_every == 0:
                bar.write(console_line(done, metrics))
            bar.update(1)
        bar.close()
        return history

    def close(self) -> None:
        import ray

        for name, group in (("rollout", getattr(self, "rollouts", [])), ("learner", getattr(self, "learners", [])),
                            ("verifier", getattr(self, "verifiers", []))):
            refs = [w.close.remote() for w in group]
            try:
                ray.get(refs, timeout=120)
            except Exception as err:  # shutting down: report, keep going
                log.warning("closing %s actors: %s", name, err)
        if hasattr(self, "metrics"):
            try:
                ray.get(self.metrics.close.remote(), timeout=60)
            except Exception as err:
                log.warning("closing metrics actor: %s", err)
        for group in (getattr(self, "rollouts", []), getattr(self, "learners", []), getattr(self, "verifiers", [])):
            for w in group:
                ray.kill(w)
        if hasattr(self, "reservation"):
            self.reservation.release()
        if self._started_ray:
            ray.shutdown()


def console_line(step: int, m: dict[str, float]) -> str:
    def f(key, fmt="{:.3f}"):
        v = m.get(key)
        return "nan" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)

    return (f"step {step}: reward {f('reward/mean')} acc {f('reward/accuracy')} "
            f"sem_H {f('strategic/semantic_entropy')} tokH plan/exec {f('token_entropy/planning')}/"
            f"{f('token_entropy/execution')} len {f('response/length_mean', '{:.0f}')} "
            f"pg {f('actor/pg_loss', '{:.4f}')} gnorm {f('actor/grad_norm')} | "
            f"gen {f('timing/generate_s', '{:.1f}')}s rew {f('timing/reward_s', '{:.1f}')}s "
            f"learn {f('timing/update_s', '{:.1f}')}s sync {f('timing/sync_s', '{:.1f}')}s "
            f"step {f('timing/step_s', '{:.1f}')}s")


def train(cfg: TrainConfig) -> list[dict[str, float]]:
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()
