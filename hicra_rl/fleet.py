"""The Ray side of a run, in one place: a ``FleetSession`` connects to (or starts) Ray, reserves one
placement group, starts the rollout workers and the verifier pool (and whatever other actors the caller
starts in it) and tears all of it down.  ``Fleet`` and ``LearnerGroup`` are the handles the training
loop and evaluation talk to; their interfaces are what the in-process fakes of the step tests implement.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from hicra_rl.batch import RolloutBatch

log = logging.getLogger("hicra_rl")


def split_evenly(items: list, n: int) -> list[list]:
    """Contiguous chunks of nearly equal size (the first ones one longer), never more than len(items)."""
    n = max(1, min(n, len(items)))
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


def _bounded_get(refs, timeout_s: float, what: str, names: list[str] | None = None):
    from hicra_rl.cluster import bounded_get

    return bounded_get(refs, timeout_s, what, names)


class Fleet:
    """Rollout workers + verifier pool as one unit: prompts in, scored responses out.

    Fault tolerance: a rollout worker whose actor or vLLM engine dies mid-call (noticed at once, or by the
    health check every ``health_every_s``) is restarted through ``restart_rollout(i)`` and its share of the
    prompts generated again with the same seeds; a verifier that dies or stops answering is restarted
    through ``restart_verifier(i)`` and its items scored again.  ``faults`` counts the restarts.  Without
    the restart hooks (or after ``max_restarts`` in one call) the error names the component.

    Policy versions: ``weight_versions[i]`` is the version (``LearnerGroup.version``) of the weights rollout
    worker ``i`` holds; a fleet-wide ``LearnerGroup.sync_weights`` sets them all, and a restarted worker's
    entry is what ``after_rollout_restart(actor)`` (the trainer: ``LearnerGroup.restore_weights``) returns
    before its share is generated again.  ``generate`` stamps each response with its worker's version
    (``RolloutBatch.policy_versions``), so a batch that mixes versions says so."""

    def __init__(self, rollouts: list, verifiers: list, timeout_s: float, top_p: float = 1.0,
                 stop: list[str] | None = None, *, health_every_s: float = 10.0, max_restarts: int = 2,
                 restart_rollout=None, restart_verifier=None, reward_models: list | None = None,
                 restart_reward_model=None):
        self.rollouts, self.verifiers = rollouts, verifiers
        self.timeout_s, self.top_p, self.stop = timeout_s, top_p, list(stop or []) or None
        self.health_every_s, self.max_restarts = health_every_s, max_restarts
        self.restart_rollout, self.restart_verifier = restart_rollout, restart_verifier
        # learned reward models (reward.model): restarted like the verifiers when they die or overrun
        # reward.model_timeout_s (their health check says so)
        self.reward_models, self.restart_reward_model = list(reward_models or []), restart_reward_model
        self.faults = {"faults/rollout_restarts": 0, "faults/verifier_restarts": 0}
        self.where = lambda kind, j: ""  # FleetSession: "host h, node n" of an actor, for messages
        self.weight_versions = [0] * len(rollouts)  # policy version of the weights each rollout worker holds
        self.after_rollout_restart = None  # (actor) -> the policy version it was given (None: unknown)

    def name(self, kind: str, j: int) -> str:
        where = self.where(kind, j)
        return f"{kind} worker {j}" + (f" ({where})" if where else "")

    def _resilient(self, actors: list, jobs: list[int], call, what: str, kind: str, restart,
                   after_restart=None) -> list:
        """``call(actor, job)`` for each job on ``actors[job]``, restarting a dead actor (then
        ``after_restart(job, actor)``) and retrying its job."""
        from hicra_rl.cluster import probe_health, wait_each

        def health(pending: list[int]) -> list[tuple[int, str]]:
            return probe_health({k: actors[jobs[k]] for k in pending})

        def recover(k: int, reason: str):
            j = jobs[k]
            log.warning("%s: %s %d %s; restarting it and retrying its share", what, kind, j, reason)
            actors[j] = restart(j)
            self.faults[f"faults/{kind}_restarts"] += 1
            if after_restart is not None:
                after_restart(j, actors[j])
            return call(actors[j], j)

        return wait_each([call(actors[j], j) for j in jobs], self.timeout_s, what,
                         [self.name(kind, j) for j in jobs], health=health, health_every_s=self.health_every_s,
                         recover=recover if restart is not None else None, max_recoveries=self.max_restarts)

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int,
                 seed: int) -> RolloutBatch:
        """``n`` samples per prompt, the prompts split over the rollout workers; prompt-major, with
        ``group_ids`` = the prompt's index in ``prompt_ids`` and ``policy_versions`` = the weights version of
        the worker that sampled it.  Worker ``j`` samples with seed ``seed + j`` (also when it is restarted
        mid-call: the retry samples the same responses, from the weights ``after_rollout_restart`` gave it)."""
        chunks = split_evenly(list(range(len(prompt_ids))), len(self.rollouts))

        def call(worker, j):
            return worker.generate.remote([prompt_ids[i] for i in chunks[j]], n, temperature, self.top_p,
                                          max_tokens, seed + j, self.stop)

        parts = self._resilient(self.rollouts, list(range(len(chunks))), call, "rollout workers (generate)",
                                "rollout", self.restart_rollout, self._restore_weights)
        batch = RolloutBatch.concat(parts, [chunk[0] for chunk in chunks])
        batch.policy_versions = [self.weight_versions[j] for j, part in enumerate(parts) for _ in range(len(part))]
        return batch

    def _restore_weights(self, j: int, actor) -> None:
        """A restarted rollout worker gets its policy weights (``after_rollout_restart``) before it generates."""
        if self.after_rollout_restart is not None:
            version = self.after_rollout_restart(actor)
            if version is not None:
                self.weight_versions[j] = int(version)

    def score(self, batch: RolloutBatch) -> list:
        """One ``VerifyResult`` per response (``batch`` needs ``golds`` and ``tasks``)."""
        if len(batch.golds) != len(batch) or len(batch.tasks) != len(batch):
            raise ValueError("RolloutBatch has no golds/tasks: call attach_problems first")
        items = list(zip(batch.response_texts, batch.golds, batch.tasks))
        lengths, finished = batch.lengths, [r == "stop" for r in batch.finish_reasons]
        chunks = split_evenly(list(range(len(items))), len(self.verifiers))

        def call(verifier, j):
            c = chunks[j]
            return verifier.score.remote([items[i] for i in c], [lengths[i] for i in c], [finished[i] for i in c])

        parts = self._resilient(self.verifiers, list(range(len(chunks))), call, "verifier pool (score)",
                                "verifier", self.restart_verifier)
        return [r for part in parts for r in part]

    def score_model(self, pairs: list[tuple[str, str]]) -> list[float]:
        """The reward models' raw score of each (prompt text, response text), in order, the pairs split over
        the reward-model actors (NaN / inf passed on as they are: ``hicra_rl.rewards.combine`` counts them)."""
        if not self.reward_models:
            raise RuntimeError("this fleet has no reward model (reward.model is not set)")
        self.faults.setdefault("faults/reward_model_restarts", 0)
        chunks = split_evenly(list(range(len(pairs))), len(self.reward_models))

        def call(model, j):
            return model.score.remote([pairs[i] for i in chunks[j]])

        parts = self._resilient(self.reward_models, list(range(len(chunks))), call, "reward models (score)",
                                "reward_model", self.restart_reward_model)
        return [float(x) for part in parts for x in part]


def _one_at_a_time(method):
    """Run a ``LearnerGroup`` call under its lock (see ``LearnerGroup.__init__``)."""
    import functools

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


class LearnerGroup:
    """The DeepSpeed learner ranks: every call splits the batch's rows evenly over the ranks.

    Policy versions: ``version`` counts the updates applied in this process (0: the weights loaded at the
    start; one update per training step, so after each step's sync it equals ``Trainer.weights_version``).
    It is incremented under ``lock`` as ``update`` returns, so a sync (also under the lock) always reports
    the version of the weights it published.

    A rollout worker restarted while the learner trains (``rollout.staleness=1``: the next step's generation
    runs during ``update``) must sample with the weights the rest of the fleet holds, not with the newer
    weights of the update it would wait for (the batch would mix two policies).  With ``keep_fleet_weights``
    a fleet-wide ``sync_weights`` keeps what it published until the next fleet-wide sync, and
    ``restore_weights`` hands exactly those to the restarted worker, without waiting for the update.  The
    cost is bounded: one copy of the policy weights in the sync dtype (transport ``shm_file``: a file in
    /dev/shm, i.e. host RAM on the learner's node) held between syncs instead of only during one; never two,
    since the kept copy is deleted before the next fleet-wide sync publishes (no generation runs then).
    Without it (the synchronous loop, where vLLM generates only while the learner holds the fleet's
    weights; transport ``broadcast``, which has no file to keep and refuses restarts) ``restore_weights``
    publishes the current weights and returns their version: ``Fleet.generate`` stamps the restarted
    worker's rows with it, so a mixed batch is at least recorded truthfully."""

    def __init__(self, learners: list, timeout_s: float, device: str = "cpu", keep_fleet_weights: bool = False,
                 adapters_only: bool = False):
        import threading

        self.learners, self.timeout_s, self.device = learners, timeout_s, device
        self.adapters_only = adapters_only  # transport lora_adapter: syncs send the LoRA adapters, not merged weights
        # one call at a time: a weight sync for a restarted rollout worker (the off-policy generation
        # thread) must not interleave its per-rank submissions with the update's (ranks would run
        # their collectives in different orders)
        self.lock = threading.RLock()
        self.version = 0  # updates applied (under ``lock``)
        self.keep_fleet_weights = keep_fleet_weights
        self._kept = None  # (version, WeightHandle) the last fleet-wide sync published, while kept
        self._kept_lock = threading.Lock()  # a restarted worker loading the kept weights vs their deletion

    def _get(self, refs, what: str):
        """Bounded wait; a rank that dies fails the call at once, naming the rank (not after the
        collective timeout of the ranks still waiting for it)."""
        names = [f"learner rank {i}" for i in range(len(refs))] if isinstance(refs, list) else ["learner rank 0"]
        return _bounded_get(refs, self.timeout_s, what, names)

    def _shards(self, n: int) -> list[slice]:
        per = n // len(self.learners)
        return [slice(i * per, (i + 1) * per) for i in range(len(self.learners))]

    @_one_at_a_time
    def log_probs(self, sequences: tuple[torch.Tensor, ...], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi, entropy) of the current policy per response token, [B, width]."""
        ids, am, rm = sequences
        parts = self._get([w.compute_log_probs.remote(ids[s], am[s], rm[s], width)
                           for w, s in zip(self.learners, self._shards(len(ids)))], "learner ranks (log-probs)")
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @_one_at_a_time
    def ref_log_probs(self, sequences: tuple[torch.Tensor, ...], width: int) -> torch.Tensor:
        ids, am, rm = sequences
        return torch.cat(self._get([w.compute_ref_log_probs.remote(ids[s], am[s], rm[s], width)
                                    for w, s in zip(self.learners, self._shards(len(ids)))],
                                   "learner ranks (reference log-probs)"))

    @_one_at_a_time
    def update(self, sequences: tuple[torch.Tensor, ...], old_log_probs: torch.Tensor | None,
               advantages: torch.Tensor, ref_log_probs: torch.Tensor | None = None,
               behaviour_log_probs: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None):
        """(stats, log-probs, entropies); ``old_log_probs`` None is the on-policy update, which returns the
        pre-update policy's log-probs and entropies from its own forward (else those two are None).
        ``behaviour_log_probs``: vLLM's sampling log-probs (response layout), for rollout correction;
        ``loss_mask`` (response layout, 0/1): tokens left out of the loss and its normalisers."""
        ids, am, rm = sequences
        batches = []
        optional = {"ref_log_probs": ref_log_probs, "behaviour_log_probs": behaviour_log_probs,
                    "loss_mask": loss_mask}
        for s in self._shards(len(ids)):
            b = dict(input_ids=ids[s], attention_mask=am[s], response_mask=rm[s], advantages=advantages[s],
                     old_log_probs=None if old_log_probs is None else old_log_probs[s])
            b.update({k: v[s] for k, v in optional.items() if v is not None})
            batches.append(b)
        parts = self._get([w.update.remote(b) for w, b in zip(self.learners, batches)], "learner ranks (update)")
        self.version += 1  # still under the lock: no sync sees the new weights under the old version
        if parts[0][1] is None:
            return parts[0][0], None, None
        return parts[0][0], torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])

    @_one_at_a_time
    def open_weight_group(self, fleet: Fleet, tensor_parallel_size: int, timeout_s: float) -> None:
        """Transport ``broadcast``: one process group of learner rank 0 and every vLLM worker (NCCL on GPU,
        gloo on CPU), so rollout workers on other nodes receive the weights over the network."""
        world = 1 + tensor_parallel_size * len(fleet.rollouts)
        backend = "nccl" if self.device == "cuda" else "gloo"
        host, port = self._get(self.learners[0].open_weight_group.remote(world, backend, timeout_s),
                               "learner rank 0 (weight group rendezvous)")
        refs = [self.learners[0].connect_weight_group.remote()] + [
            w.join_weight_group.remote(host, port, world, 1 + i * tensor_parallel_size, backend, timeout_s)
            for i, w in enumerate(fleet.rollouts)]
        self._get(refs, f"weight group ({world} members at {host}:{port})")

    @_one_at_a_time
    def sync_weights(self, fleet: Fleet, workers: list | None = None) -> dict[str, float]:
        """Learner -> every vLLM engine of ``fleet`` (then ``fleet.weight_versions`` are all ``version``), or
        only ``workers``; returns the ``sync/*`` metrics.  A fleet-wide sync with ``keep_fleet_weights``
        keeps what it published for ``restore_weights`` until the next fleet-wide sync."""
        t0 = time.perf_counter()
        everyone = workers is None
        if everyone:  # no generation runs during a fleet-wide sync: the previous fleet weights are done with
            self._drop_kept()
        handle = self._get([w.publish_weights.remote(self.adapters_only) for w in self.learners],
                           "learner ranks (gather weights)")[0]
        targets = fleet.rollouts if everyone else workers
        try:
            stats = self._send(fleet, handle, targets)
        except BaseException:
            self._release(handle)
            raise
        if everyone and self.keep_fleet_weights and handle.transport in ("shm_file", "lora_adapter"):
            with self._kept_lock:
                self._kept = (self.version, handle)
        else:
            self._release(handle)
        if everyone:
            fleet.weight_versions = [self.version] * len(targets)
        return {"sync/megabytes": stats[0]["megabytes"], "sync/write_s": handle.write_seconds,
                "sync/load_s": max(s["load_seconds"] for s in stats), "sync/total_s": time.perf_counter() - t0}

    def restore_weights(self, fleet: Fleet, worker) -> int:
        """A restarted rollout worker gets the weights the rest of the fleet holds: the kept ones
        (``keep_fleet_weights``), at once, also while an update runs; else the learner's current weights
        (under the lock: after a running update).  Returns the version it now holds."""
        with self._kept_lock:
            if self._kept is not None:
                version, handle = self._kept
                self._send(fleet, handle, [worker])
                return version
        with self.lock:
            version = self.version
            self.sync_weights(fleet, [worker])
            return version

    def _release(self, handle) -> None:
        self._get(self.learners[0].release_weights.remote(handle), "learner rank 0 (release weights)")

    def _drop_kept(self) -> None:
        with self._kept_lock:
            kept, self._kept = self._kept, None
        if kept is not None:
            self._release(kept[1])

    def _send(self, fleet: Fleet, handle, targets: list) -> list[dict]:
        """``handle``'s weights into the vLLM engines ``targets``; their load statistics."""
        from hicra_rl.cluster import ComponentDied, probe_health, wait_each

        try:
            refs = [w.receive_weights.remote(handle) for w in targets]
            names = [fleet.name("rollout", i) for i in range(len(targets))]
            if handle.transport == "broadcast":  # sender and receivers run the collective together
                refs.append(self.learners[0].send_weights.remote())
                names.append("learner rank 0 (broadcast)")
            # a receiver that dies silently (a lost node) would block the collective until its timeout:
            # the health check finds it first
            stats = wait_each(refs, self.timeout_s, "weight sync", names, health_every_s=fleet.health_every_s,
                              health=lambda pending: probe_health({k: targets[k] for k in pending
                                                                   if k < len(targets)}))[:len(targets)]
        except Exception as err:  # a broadcast fails on every member when one dies: name the dead one
            if isinstance(err, ComponentDied):
                raise
            dead = probe_health(dict(enumerate(targets)))
            if not dead:
                raise
            i, reason = dead[0]
            raise ComponentDied(f"weight sync: {fleet.name('rollout', i)} {reason} "
                                f"({type(err).__name__} on the learner side)", i) from None
        return stats

    @_one_at_a_time
    def save(self, ckpt_root: str, step: int, extra: dict, keep_last: int) -> str:
        return self._get([w.save.remote(ckpt_root, step, extra, keep_last) for w in self.learners],
                         "learner ranks (checkpoint)")[0]

    @_one_at_a_time
    def load(self, ckpt_dir: str) -> dict:
        return self._get([w.load.remote(ckpt_dir) for w in self.learners], f"learner ranks (loading {ckpt_dir})")[0]


class RemoteMetrics:
    """The metrics actor behind the same interface as an in-process ``MetricsWorker``."""

    def __init__(self, actor, timeout_s: float):
        self.actor, self.timeout_s = actor, timeout_s

    def log_step(self, step: int, rollout: dict, extra: dict[str, float]) -> dict[str, float]:
        return _bounded_get(self.actor.log_step.remote(step, rollout, extra), self.timeout_s, "metrics actor")

    def state_dict(self) -> dict:
        return _bounded_get(self.actor.state_dict.remote(), self.timeout_s, "metrics actor (state)")


def fleet_bundles(rollout_cfg, reward_cfg, cluster_cfg) -> dict[str, dict[str, float]]:
    """Placement-group bundles of the rollout workers and the verifier pool (``cluster.reserve`` input)."""
    gpus = cluster_cfg.gpus_per_rollout_worker * rollout_cfg.tensor_parallel_size
    bundles = {f"rollout{i}": {"CPU": cluster_cfg.cpus_per_actor, "GPU": gpus} for i in range(rollout_cfg.num_workers)}
    bundles.update({f"verifier{i}": {"CPU": 0.25} for i in range(reward_cfg.num_workers)})
    if getattr(reward_cfg, "model", None):  # learned reward models: a GPU fraction each on a cluster
        bundles.update({f"reward_model{i}": {"CPU": 0.25, "GPU": cluster_cfg.gpus_per_reward_model}
                        for i in range(reward_cfg.model_num_workers)})
    return bundles


def verifier_shaping(reward_cfg, max_new_tokens: int) -> dict | None:
    if not (reward_cfg.overlong_penalty or reward_cfg.format_penalty):
        return None
    return dict(overlong_penalty=reward_cfg.overlong_penalty, max_response_tokens=max_new_tokens,
                overlong_buffer_tokens=reward_cfg.overlong_buffer,
                overlong_penalty_factor=reward_cfg.overlong_penalty_factor,
                format_penalty=reward_cfg.format_penalty)


class FleetSession:
    """``with FleetSession(...) as session:`` — Ray connected (or started, and stopped at exit), one
    placement group reserved for the fleet plus ``extra_bundles``, rollout workers and verifiers started
    and ready (``session.fleet``).  ``session.start(name, cls, ...)`` starts another actor in its bundle;
    every actor started here is closed (``close()``) and killed at exit, then the reservation released.

    A rollout worker or verifier that dies is restarted in its own bundle (``restart``); a restarted
    rollout worker then gets its policy weights from the fleet's ``Fleet.after_rollout_restart`` (the
    trainer's ``LearnerGroup.restore_weights``) before it generates again."""

    def __init__(self, *, model_path: str, model_cfg, rollout_cfg, reward_cfg, cluster_cfg, seed: int,
                 extra_bundles: dict[str, dict[str, float]] | None = None, max_lora_rank: int = 0):
        self.model_path, self.model_cfg, self.rollout_cfg = model_path, model_cfg, rollout_cfg
        self.max_lora_rank = max_lora_rank  # > 0: engines with vLLM's LoRA path (transport lora_adapter)
        self.reward_cfg, self.cluster_cfg, self.seed = reward_cfg, cluster_cfg, seed
        self.bundles = {**(extra_bundles or {}), **fleet_bundles(rollout_cfg, reward_cfg, cluster_cfg)}
        self.actors: dict[str, Any] = {}
        self.specs: dict[str, tuple] = {}
        self.identities: dict[str, dict] = {}  # rollout workers: host, pids, shm files (for messages, clean-up)
        self.reservation = None
        self.started_ray = False
        self.fleet: Fleet | None = None
        self.startup_seconds: list[float] = []

    def __enter__(self) -> FleetSession:
        try:
            self._open()
        except BaseException:
            self.close(timeout_s=10)
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # interrupted or failed: do not wait long for actors that may be stuck
        self.close(timeout_s=60 if exc_type is None else 8)

    def _open(self) -> None:
        import ray

        from hicra_rl import cluster
        from hicra_rl.actors import RolloutWorker, VerifierWorker

        cl, r, m = self.cluster_cfg, self.rollout_cfg, self.model_cfg
        self.started_ray = not ray.is_initialized() and not (cl.address or os.environ.get("RAY_ADDRESS"))
        cluster.connect(cl.address, cl.num_cpus)
        self.reservation = cluster.reserve(self.bundles, cl.actor_start_timeout_s)
        # two threads each: ``health`` answers while ``generate``/``score`` is blocked
        rollouts = [self.start(f"rollout{i}", RolloutWorker, self.model_path, dtype=m.dtype,
                               max_model_len=m.max_model_len, seed=self.seed + i,
                               tensor_parallel_size=r.tensor_parallel_size,
                               gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_gib=r.kv_cache_gib,
                               cpu_threads=r.cpu_threads, enforce_eager=r.enforce_eager,
                               logprobs_mode=r.logprobs_mode, max_lora_rank=self.max_lora_rank,
                               _max_concurrency=2)
                    for i in range(r.num_workers)]
        shaping = verifier_shaping(self.reward_cfg, r.max_new_tokens)
        verifiers = [self.start(f"verifier{i}", VerifierWorker, self.reward_cfg.timeout_s,
                                self.reward_cfg.answer_mode, shaping, _max_concurrency=2)
                     for i in range(self.reward_cfg.num_workers)]
        reward_models = []
        if getattr(self.reward_cfg, "model", None):
            from hicra_rl.actors import RewardModelWorker

            rw = self.reward_cfg
            reward_models = [self.start(f"reward_model{i}", RewardModelWorker, os.path.expanduser(rw.model),
                                        dtype=m.dtype, batch_size=rw.model_batch_size, max_tokens=rw.model_max_tokens,
                                        time_limit_s=rw.model_timeout_s,
                                        torch_threads=cl.torch_threads or os.cpu_count(),
                                        _max_concurrency=2)
                             for i in range(rw.model_num_workers)]
        self.fleet = Fleet(rollouts, verifiers, cl.step_timeout_s, r.top_p, list(r.stop),
                           health_every_s=cl.health_check_s, max_restarts=cl.max_restarts_per_call,
                           restart_rollout=self.restart_rollout,
                           restart_verifier=lambda i: self.restart(f"verifier{i}"), reward_models=reward_models,
                           restart_reward_model=lambda i: self.restart(f"reward_model{i}"))
        self.fleet.where = lambda kind, j: self.where(f"{kind}{j}") if kind == "rollout" else ""

    def wait_ready(self) -> None:
        """Block until the vLLM engines and the verifier pool are up (bounded; the error names which)."""
        timeout = self.cluster_cfg.actor_start_timeout_s
        self.startup_seconds = _bounded_get([w.ready.remote() for w in self.fleet.rollouts], timeout,
                                            "rollout workers (vLLM start-up)",
                                            [f"rollout worker {i}" for i in range(len(self.fleet.rollouts))])
        for i, w in enumerate(self.fleet.rollouts):
            self.identities[f"rollout{i}"] = _bounded_get(w.identity.remote(), timeout, f"rollout worker {i}")
        _bounded_get([v.stats.remote() for v in self.fleet.verifiers], timeout, "verifier pool start-up")
        if self.fleet.reward_models:
            _bounded_get([w.ready.remote() for w in self.fleet.reward_models], timeout, "reward models (loading)",
                         [f"reward model {i}" for i in range(len(self.fleet.reward_models))])
        log.info("vLLM engines started in %s s", [round(s, 1) for s in self.startup_seconds])

    def options(self, name: str) -> dict:
        b = self.bundles[name]
        return dict(scheduling_strategy=self.reservation.strategy(name), num_cpus=b.get("CPU", 0),
                    num_gpus=b.get("GPU", 0))

    def start(self, name: str, cls, *args, _max_concurrency: int = 1, _env: dict[str, str] | None = None,
              **kwargs):
        """Start actor ``cls(*args, **kwargs)`` in bundle ``name``; it is closed and killed at exit. ``_env``:
        environment variables of that actor's process only (Ray merges them into the job's)."""
        import ray

        options = self.options(name)
        if _env:
            options["runtime_env"] = {"env_vars": dict(_env)}
        actor = ray.remote(cls).options(max_concurrency=_max_concurrency, **options).remote(*args, **kwargs)
        self.actors[name] = actor
        self.specs[name] = (cls, args, kwargs, _max_concurrency, _env)
        return actor

    def restart(self, name: str):
        """Kill actor ``name`` (whatever state it is in) and start it again in its bundle, ready."""
        import ray

        from hicra_rl.cluster import ComponentDied

        if getattr(self, "closing", False):
            raise ComponentDied(f"{name} died while the session was closing; not restarted")

        old = self.actors.pop(name)
        ray.kill(old, no_restart=True)
        self._clean_up_after(name)
        cls, args, kwargs, conc, env = self.specs[name]
        actor = self.start(name, cls, *args, _max_concurrency=conc, _env=env, **kwargs)
        ready = actor.ready if hasattr(cls, "ready") else actor.health
        _bounded_get(ready.remote(), self.cluster_cfg.actor_start_timeout_s, f"{name} (restart)")
        return actor

    def where(self, name: str) -> str:
        """``host <hostname>, node <id>`` of an actor started here (as recorded when it was ready)."""
        ident = self.identities.get(name, {})
        return f"host {ident.get('host', '?')}, node {str(ident.get('node_id', '?'))[:12]}"

    def restart_rollout(self, i: int):
        """Restart rollout worker ``i`` (a new vLLM engine, the model's initial weights: ``Fleet`` then gives it
        the fleet's policy weights through ``Fleet.after_rollout_restart``)."""
        from hicra_rl.cluster import ComponentDied

        name = f"rollout{i}"
        where = self.where(name)
        if self.rollout_cfg.weight_transport == "broadcast":  # a new engine cannot join the open group
            raise ComponentDied(
                f"rollout worker {i} ({where}) died; with rollout.weight_transport=broadcast a restarted engine "
                "cannot join the open weight group, so the run stops here (a lost node? `ray status`); the same "
                "command resumes from the newest checkpoint (trainer.resume=auto)", i)
        t0 = time.perf_counter()
        actor = self.restart(name)
        self.identities[name] = _bounded_get(actor.identity.remote(), self.cluster_cfg.actor_start_timeout_s, name)
        log.warning("rollout worker %d (%s) restarted in %.0f s", i, where, time.perf_counter() - t0)
        return actor

    def _clean_up_after(self, name: str) -> None:
        """What a killed rollout worker leaves on this host: vLLM engine processes and /dev/shm files."""
        import signal
        import socket

        ident = self.identities.pop(name, None)
        if not ident or ident.get("host") != socket.gethostname():
            return
        for pid in ident.get("engine_pids", []):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for path in ident.get("shm_files", []):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self, timeout_s: float = 60.0) -> None:
        """Ask every actor to ``close()`` (at most ``timeout_s`` in all), kill them, release the
        reservation, stop a Ray this session started."""
        import ray

        t0 = time.perf_counter()
        self.closing = True  # a generation still running in another thread must not restart actors now
        if self.actors:
            refs = {a.close.remote(): name for name, a in list(self.actors.items())}
            try:
                done, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
            except BaseException:  # interrupted again while closing: kill without waiting
                done, late = [], list(refs)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as err:  # shutting down: report, keep going
                    log.warning("closing %s: %s", refs[ref], str(err).splitlines()[0] if str(err) else err)
            for ref in late:
                log.warning("closing %s: no answer within %.0f s; killed", refs[ref], timeout_s)
            for a in list(self.actors.values()):
                ray.kill(a, no_restart=True)
            for name in [n for n in self.identities if n in {refs[r] for r in late}]:
                self._clean_up_after(name)
            self.actors = {}
        if self.reservation is not None:
            try:
                self.reservation.release()
            except Exception as err:
                log.warning("releasing the placement group: %s", err)
            self.reservation = None
        t_actors = time.perf_counter() - t0
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
        log.info("fleet closed in %.1f s (actors %.1f s, Ray %.1f s)", time.perf_counter() - t0, t_actors,
                 time.perf_counter() - t0 - t_actors)
