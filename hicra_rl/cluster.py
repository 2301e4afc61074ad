"""Ray plumbing: connect or start a cluster, reserve resources up front, and turn every wait into
a bounded wait whose error names the stuck component (nothing hangs)."""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger("hicra_rl")


class ComponentTimeout(TimeoutError):
    """A remote component did not answer in time; the message names it and the wait."""


class ComponentDied(RuntimeError):
    """A remote component died (its actor, or a process it owns); ``index`` is its position in the wait."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class ComponentFault(RuntimeError):
    """Raised by an actor method whose component is broken beyond this call (a dead vLLM engine): the
    caller may restart the actor and retry, as it would for a dead actor."""


_SECRET = re.compile(r"API_KEY|TOKEN|SECRET|PASSWORD", re.I)


def connect(address: str | None, num_cpus: int | None, runtime_env: dict | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``, set by ``ray job submit``) or start a local cluster."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines drown the step log
    # Inside `ray job submit` the job's runtime env already sets its env vars; repeating one is a merge
    # conflict for Ray, so forward only the others.  OMP_NUM_THREADS=1 that Ray sets for jobs is not ours.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars", {})
    prefixes = ("HF_", "TRANSFORMERS_", "VLLM_", "HICRA_", "WANDB_") + (() if job_env or address else ("OMP_",))
    # secrets (WANDB_API_KEY, HF_TOKEN, ...) are not put into a shared cluster's runtime env, where every
    # holder of the job API token could read them: set them in the nodes' own environment there
    env = {"env_vars": {k: v for k, v in os.environ.items()
                        if k.startswith(prefixes) and k not in job_env and not (address and _SECRET.search(k))}}
    if runtime_env:
        env.update(runtime_env)
    with keep_signal_handlers():  # ray.init replaces SIGTERM's handler (its own aborts the process)
        _init(address, num_cpus, env)


@contextmanager
def keep_signal_handlers():
    """SIGINT's and SIGTERM's handlers are put back as they were at entry (signals are a main-thread
    matter: elsewhere this does nothing)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _init(address: str | None, num_cpus: int | None, env: dict) -> None:
    """Join ``address``, or start this run's own local Ray, and say in one line which it did."""
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        source = "RAY_ADDRESS" if address == os.environ.get("RAY_ADDRESS") else "cluster.address"
        log.info("Ray: joined the cluster at %s (%s)", address, source)
        return
    # address="local": a new cluster whatever Ray's files say.  Without it ray.init joins the latest head
    # started on this machine (/tmp/ray/ray_current_cluster, left behind by launch/start_head.sh even when
    # the head was killed) and refuses num_cpus.  A local Ray listens on the loopback interface only
    # (nothing of it is reachable from the network).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True,
             _node_ip_address="127.0.0.1")
    cpus = f"{num_cpus} CPUs" if num_cpus else "every CPU"
    log.info("Ray: started a local cluster for this run (127.0.0.1, %s); to run on a Ray head started on this "
             "machine instead, set cluster.address=auto", cpus)



POLL_S = 1.0  # longest single wait: Ctrl-C / SIGTERM handlers run between waits


MEMORY_KILL_MARKERS = ("running low on memory", "memory usage threshold")  # Ray's memory monitor's death cause


def killed_for_memory(err: BaseException) -> bool:
    """Did Ray's memory monitor kill this task or actor (node memory above ``RAY_memory_usage_threshold``)?
    Its reason is in the death cause, lines below the error's first one."""
    text = str(err).lower()
    return isinstance(err, ray.exceptions.OutOfMemoryError) or any(m in text for m in MEMORY_KILL_MARKERS)


def _failure(err: BaseException) -> str | None:
    """Why a finished ref failed, when the failure is its component's death (else None: a plain error)."""
    if killed_for_memory(err):
        return ("was killed by Ray's memory monitor: the node ran low on memory (another job on the machine, "
                "or lower rollout.max_num_seqs / learner.micro_batch_size)")
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)):
        return f"died ({type(err).__name__}: {_first_line(err)})"
    cause = getattr(err, "cause", None)
    if isinstance(err, ComponentFault) or isinstance(cause, ComponentFault):
        return f"failed: {cause if isinstance(cause, ComponentFault) else err}"
    return None


def wait_each(refs: list, timeout_s: float, what: str, names: list[str] | None = None, *,
              health: Callable[[list[int]], list[tuple[int, str]]] | None = None, health_every_s: float = 10.0,
              recover: Callable[[int, str], Any] | None = None, max_recoveries: int = 0) -> list:
    """The results of ``refs`` (one per component), waited for with a deadline, failing fast.

    Unlike one ``ray.get(refs)`` this returns to Python every ``POLL_S`` (Ctrl-C and SIGTERM handlers run)
    and notices a component's death the moment it happens, not when the slowest peer is done.  Every
    ``health_every_s`` it calls ``health(pending indices)``, which returns ``(index, reason)`` of the dead
    among them (a dead vLLM engine under a live actor).  A death calls ``recover(index, reason)``, which
    restarts the component and returns the ref of the retried call, at most ``max_recoveries`` times;
    without ``recover`` (or past that) it raises ``ComponentDied`` naming the component and the reason.
    """
    names = names or [f"{what} #{i}" for i in range(len(refs))]
    results: dict[int, Any] = {}
    inflight = {ref: i for i, ref in enumerate(refs)}
    start = last_health = time.monotonic()
    recoveries = 0
    while inflight:
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            stuck = ", ".join(names[i] for i in sorted(inflight.values()))
            raise ComponentTimeout(f"{what} did not finish within {timeout_s:.0f} s (still waiting for {stuck})")
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=min(POLL_S, left))
        dead: list[tuple[int, str]] = []
        for ref in ready:
            i = inflight.pop(ref)
            try:
                results[i] = ray.get(ref)
            except Exception as err:
                reason = _failure(err)
                if reason is None:
                    raise
                dead.append((i, reason))
        if health is not None and inflight and time.monotonic() - last_health >= health_every_s:
            last_health = time.monotonic()
            for i, reason in health(sorted(inflight.values())):
                inflight = {r: j for r, j in inflight.items() if j != i}
                dead.append((i, reason))
        for i, reason in dead:
            detected = time.monotonic() - start
            if recover is None or recoveries >= max_recoveries:
                raise ComponentDied(f"{what}: {names[i]} {reason} (detected after {detected:.0f} s)", i)
            recoveries += 1
            inflight[recover(i, reason)] = i
    return [results[i] for i in range(len(refs))]


def probe_health(actors: dict[int, Any], timeout_s: float = 10.0) -> list[tuple[int, str]]:
    """``(index, reason)`` of each actor whose ``health()`` returns a reason, raises, or does not answer
    within ``timeout_s`` (the actors run their ``health`` on a second thread)."""
    refs = {a.health.remote(): i for i, a in actors.items()}
    ready, late, deadline = [], list(refs), time.monotonic() + timeout_s
    while late and time.monotonic() < deadline:  # in short waits: signal handlers run in between
        done, late = ray.wait(late, num_returns=len(late), timeout=min(POLL_S, deadline - time.monotonic()))
        ready += done
    out = [(refs[r], f"did not answer a health check within {timeout_s:.0f} s") for r in late]
    for r in ready:
        try:
            reason = ray.get(r)
        except Exception as err:
            reason = _failure(err) or f"health check raised {type(err).__name__}: {_first_line(err)}"
        if reason:
            out.append((refs[r], reason))
    return sorted(out)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def bounded_get(refs: Any, timeout_s: float, what: str, names: list[str] | None = None) -> Any:
    """ray.get with a deadline; a timeout or a dead actor becomes an error naming ``what`` (and, for a
    list, which of ``names`` died), raised as soon as one fails."""
    if isinstance(refs, list):
        return wait_each(refs, timeout_s, what, names)
    return wait_each([refs], timeout_s, what, names)[0]


@dataclass
class Reservation:
    """One placement group holding a bundle per actor, reserved before any actor starts."""

    group: Any
    names: list[str]

    def strategy(self, name: str) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=self.names.index(name)
        )

    def release(self) -> None:
        remove_placement_group(self.group)


def reserve(bundles: dict[str, dict[str, float]], timeout_s: float) -> Reservation:
    """Reserve ``{actor name: {"CPU": x, "GPU": y}}``; error if the cluster cannot satisfy it in time."""
    names = list(bundles)
    clean = [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.01} for b in bundles.values()]
    total: dict[str, float] = {}
    for b in clean:
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    have = ray.cluster_resources()
    impossible = {k: (v, have.get(k, 0.0)) for k, v in total.items() if v > have.get(k, 0.0) + 1e-9}
    if impossible:  # fail at once: waiting cannot help when the whole cluster is too small
        detail = ", ".join(f"{k}: need {v:g}, cluster has {h:g}" for k, (v, h) in impossible.items())
        raise ValueError(f"the Ray cluster is too small for {names}: {detail} "
                         "(lower learner.num_ranks / rollout.num_workers or the per-actor GPUs/CPUs in cluster.*)")
    pg = placement_group(clean, strategy="PACK")
    start = time.monotonic()
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise ComponentTimeout(
            f"could not reserve resources for {names} within {time.monotonic() - start:.0f} s: "
            f"need {total}, cluster has {ray.cluster_resources()} (busy with other jobs?)"
        )
    return Reservation(pg, names)
