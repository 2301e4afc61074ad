"""Thin Ray actor shells.  Each owns one resource and delegates to the pure / engine modules.

The classes are plain Python (tested without Ray); the fleet session wraps them with
``ray.remote(...).options(...)`` (``hicra_rl.fleet.FleetSession.start``) so resources and placement are
decided in one place.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)


class RolloutWorker:
    """Owns one vLLM engine (``tensor_parallel_size`` devices)."""

    def __init__(self, model_path: str, *, dtype: str, max_model_len: int, seed: int, tensor_parallel_size: int,
                 gpu_memory_utilization: float, kv_cache_gib: float | None, cpu_threads: str | None,
                 enforce_eager: bool, logprobs_mode: str = "raw_logprobs", max_lora_rank: int = 0):
        from hicra_rl.rollout.engine import VLLMRolloutEngine

        self.engine = VLLMRolloutEngine(
            model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_gib=None if kv_cache_gib is None else max(1, int(kv_cache_gib)),
            cpu_threads=cpu_threads, enforce_eager=enforce_eager, logprobs_mode=logprobs_mode,
            max_lora_rank=max_lora_rank,
        )

    def ready(self) -> float:
        return self.engine.startup_seconds

    def identity(self) -> dict:
        """Where this worker runs and what it owns (for messages, and to clean up after a kill)."""
        return dict(host=socket.gethostname(), node_id=_node_id(), pid=os.getpid(),
                    engine_pids=sorted(self.engine.engine_pids), shm_files=sorted(self.engine.shm_files))

    def health(self) -> str | None:
        """Why this worker can no longer generate (its vLLM engine process died), or None.  The actor runs
        with two threads so this answers while ``generate`` is blocked on a dead engine."""
        return self.engine.dead_reason()

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float, max_tokens: int,
                 seed: int | None, stop: list[str] | None = None):
        """A ``RolloutBatch`` (group ids index ``prompt_ids``); ``ComponentFault`` if the engine died."""
        from hicra_rl.cluster import ComponentFault
        from hicra_rl.rollout.engine import to_rollout_batch

        try:
            responses = self.engine.generate(prompt_ids, n=n, temperature=temperature, top_p=top_p,
                                             max_tokens=max_tokens, seed=seed, stop=stop)
        except Exception as err:
            reason = self.engine.dead_reason()
            if reason:
                raise ComponentFault(f"{reason} ({type(err).__name__})") from None
            raise
        return to_rollout_batch(responses)

    def receive_weights(self, handle) -> dict:
        return dataclasses.asdict(self.engine.receive_weights(handle))

    def join_weight_group(self, host: str, port: int, world_size: int, rank_offset: int, backend: str,
                          timeout_s: float) -> list[int]:
        return self.engine.join_weight_group(host, port, world_size, rank_offset=rank_offset, backend=backend,
                                             timeout_s=timeout_s)

    def prompt_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        return self.engine.prompt_logprobs(prompt_ids, response_ids)

    def close(self) -> None:
        self.engine.close()


class LearnerWorker:
    """One data-parallel rank of the DeepSpeed policy learner.

    Built in two calls so that rank 0 can pick the rendezvous address first:
    ``address()`` on rank 0, then ``build(...)`` on every rank concurrently.
    """

    def __init__(self, rank: int, world_size: int, torch_threads: int | None = None):
        self.rank, self.world_size = rank, world_size
        self.learner = None
        self._sender, self._pending = None, None
        self._published: dict[str, object] = {}  # rank 0, shm_file: weight files written and not yet released
        _set_threads(torch_threads)

    def node_id(self) -> str:
        return _node_id()

    def address(self) -> tuple[str, int]:
        host = socket.gethostbyname(socket.gethostname()) if self.world_size > 1 else "127.0.0.1"
        with socket.socket() as s:
            s.bind(("", 0))
            return host, s.getsockname()[1]

    def build(self, learner_cfg, master_addr: str, master_port: int, timeout_s: float, **learner_kwargs) -> bool:
        """``learner_cfg``: ``hicra_rl.config.LearnerConfig``; ``learner_kwargs``: the rest of
        ``PolicyLearner``'s arguments (model path, dtype, loss, ...)."""
        from hicra_rl.learner.engine import PolicyLearner

        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so the rank's device is always cuda:0
        self.learner = PolicyLearner(learner_cfg, rank=self.rank, world_size=self.world_size,
                                     master_addr=master_addr, master_port=master_port, local_rank=0,
                                     timeout_s=timeout_s, **learner_kwargs)
        return True

    def compute_log_probs(self, input_ids, attention_mask, response_mask, width: int):
        return self.learner.compute_log_probs(input_ids, attention_mask, response_mask, width)

    def compute_ref_log_probs(self, input_ids, attention_mask, response_mask, width: int):
        return self.learner.compute_ref_log_probs(input_ids, attention_mask, response_mask, width)

    def update(self, batch: dict):
        """(stats, log-probs, entropies): the last two are the pre-update policy's, from the update's own
        forward, when the batch has no old log-probs (on-policy); else None."""
        stats = self.learner.update(batch)
        return stats, self.learner.forward_log_probs, self.learner.forward_entropy

    def publish_weights(self, adapters_only: bool = False):
        """Collective (ZeRO-3 gathers on every rank).  Rank 0: transport ``shm_file`` writes the file and
        returns its handle; transport ``broadcast`` keeps the weights for ``send_weights`` and returns the
        manifest the rollout workers receive by; ``adapters_only`` (transport ``lora_adapter``) writes the LoRA
        adapters as a peft folder and returns its handle."""
        from hicra_rl.rollout.weight_sync import publish_adapter, publish_state_dict

        if adapters_only:
            adapters = self.learner.adapter_state_dict()   # collective (ZeRO-3 gathers); {} off rank 0
            if self.rank != 0:
                return None
            module = self.learner.engine.module   # the peft model: writes adapter_config.json beside the tensors
            handle = publish_adapter(lambda folder: module.save_pretrained(folder, state_dict=adapters), len(adapters),
                                     sum(t.numel() * t.element_size() for t in adapters.values()))
            self._published[handle.path] = handle
            return handle
        state = self.learner.full_state_dict()
        if self.rank != 0:
            return None
        if self._sender is None:
            handle = publish_state_dict(state)
            self._published[handle.path] = handle
            return handle
        self._pending = state
        return self._sender.manifest(state)

    def open_weight_group(self, world_size: int, backend: str, timeout_s: float) -> tuple[str, int]:
        """Rank 0: start the rendezvous of a broadcast group with every vLLM worker (transport ``broadcast``,
        for rollout workers on other nodes); ``connect_weight_group`` then blocks until they all joined."""
        from hicra_rl.rollout.weight_sync import BroadcastWeightSender

        host = socket.gethostbyname(socket.gethostname())
        self._sender = BroadcastWeightSender(world_size, host=host, backend=backend, timeout_s=timeout_s)
        return self._sender.address

    def connect_weight_group(self) -> None:
        self._sender.connect()

    def send_weights(self) -> float:
        seconds = self._sender.send(self._pending)
        self._pending = None
        return seconds

    def release_weights(self, handle) -> None:
        from hicra_rl.rollout.weight_sync import release

        if handle.transport in ("shm_file", "lora_adapter"):
            release(handle)
            self._published.pop(handle.path, None)

    def save(self, ckpt_root: str, step: int, extra: dict, keep_last: int) -> str:
        from hicra_rl.learner.checkpoint import save_checkpoint

        return str(save_checkpoint(self.learner, ckpt_root, step, extra=extra, keep_last=keep_last))

    def load(self, ckpt_dir: str) -> dict:
        from hicra_rl.learner.checkpoint import load_checkpoint

        return load_checkpoint(self.learner, ckpt_dir)

    def close(self) -> None:
        from hicra_rl.rollout.weight_sync import release

        for handle in list(self._published.values()):  # e.g. the weights LearnerGroup kept (keep_fleet_weights)
            release(handle)
        self._published.clear()
        if self.learner is not None:
            self.learner.close()


class VerifierWorker:
    """Scores (response, gold, task) items under a hard per-item time limit (killable processes)."""

    def __init__(self, time_limit_s: float, answer_mode: str, shaping: dict | None):
        from hicra_rl.rewards.math import RewardShapingConfig
        from hicra_rl.rewards.pool import TimeBoundedVerifier

        self.verifier = TimeBoundedVerifier(
            time_limit_s=time_limit_s, num_workers=1, answer_mode=answer_mode,
            shaping=RewardShapingConfig(**shaping) if shaping else None,
        ).start()

    def score(self, items: list[tuple[str, Any, str]], n_tokens: list[int], finished: list[bool]) -> list:
        """One ``VerifyResult`` per item."""
        return self.verifier.score_batch(items, n_tokens, finished)

    def health(self) -> str | None:
        """None while this actor answers (it runs with two threads: answers during ``score`` too)."""
        return None

    def stats(self) -> dict[str, float]:
        return self.verifier.stats()

    def close(self) -> None:
        self.verifier.close()


class RewardModelWorker:
    """Owns one learned reward model (``hicra_rl.rewards.model.RewardModelScorer``): scores batches of
    (prompt, response) texts.  Time-bounded: while one ``score`` call has run longer than ``time_limit_s``,
    ``health`` reports it, so the fleet's health check kills and restarts this actor and scores its share
    again (``faults/reward_model_restarts``), as for a dead one.  Runs with two threads (``health`` answers
    during ``score``)."""

    def __init__(self, path: str, *, dtype: str, batch_size: int, max_tokens: int, time_limit_s: float,
                 torch_threads: int | None = None):
        import time

        from hicra_rl.rewards.model import RewardModelScorer

        _set_threads(torch_threads)
        self.time_limit_s = time_limit_s
        self.scorer = RewardModelScorer(path, dtype=dtype, batch_size=batch_size, max_tokens=max_tokens)
        self._busy_since: float | None = None
        self._clock = time.monotonic

    def ready(self) -> float:
        return self.scorer.load_seconds

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """The raw score of each (prompt, response); NaN / inf stay as they are (the driver counts them)."""
        self._busy_since = self._clock()
        try:
            return self.scorer.score(pairs)
        finally:
            self._busy_since = None

    def health(self) -> str | None:
        since = self._busy_since
        if since is not None and self._clock() - since > self.time_limit_s:
            return (f"has been scoring one batch for {self._clock() - since:.0f} s, over reward.model_timeout_s="
                    f"{self.time_limit_s:g}")
        return None

    def stats(self) -> dict[str, float]:
        return self.scorer.stats()

    def close(self) -> None:
        self.scorer = None


class MetricsWorker:
    """Computes each step's metrics (hicra_rl.metrics.step) and writes them: JSONL, wandb, and back to
    the driver for the console line."""

    def __init__(self, run_dir: str, logging_cfg: dict, config: dict, resume_step: int, rel_ppl_state: dict | None,
                 gram_clusters: dict[str, int] | None = None, strategies: dict[str, str] | None = None):
        from hicra_rl.metrics.perplexity import RelativePerplexity
        from hicra_rl.runlog import MetricsSink

        self.sink = MetricsSink(run_dir, use_wandb=logging_cfg["wandb"], wandb_mode=logging_cfg["wandb_mode"],
                                project=logging_cfg["project"], run_name=logging_cfg["run_name"], config=config,
                                resume_step=resume_step)
        self.rel_ppl = RelativePerplexity()
        self.gram_clusters = gram_clusters  # SG -> lexicon cluster: per-cluster usage metrics
        self.strategies = strategies        # strategy name -> announcing phrase: per-strategy share and accuracy
        if rel_ppl_state:
            self.rel_ppl.load_state_dict(rel_ppl_state)

    def log_step(self, step: int, rollout: dict, extra: dict[str, float]) -> dict[str, float]:
        from hicra_rl.metrics.step import step_metrics

        metrics = step_metrics(rel_ppl=self.rel_ppl, gram_clusters=self.gram_clusters, strategies=self.strategies,
                               **rollout)
        metrics.update(extra)
        self.sink.log(step, metrics)
        return metrics

    def state_dict(self) -> dict:
        return self.rel_ppl.state_dict()

    def close(self) -> None:
        self.sink.close()
