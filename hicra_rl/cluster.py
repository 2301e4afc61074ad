"""Ray plumbing: connect or start a cluster, reserve resources up front, and turn every wait into
a bounded wait whose error names the stuck component (nothing hangs)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class ComponentTimeout(TimeoutError):
    """A remote component did not answer in time; the message names it and the wait."""


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
    env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(prefixes) and k not in job_env}}
    if runtime_env:
        env.update(runtime_env)
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)


def bounded_get(refs: Any, timeout_s: float, what: str) -> Any:
    """ray.get with a deadline; a timeout or a dead actor becomes an error naming ``what``."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ComponentTimeout(f"{what} did not finish within {timeout_s:.0f} s") from None
    except ray.exceptions.ActorDiedError as err:
        raise RuntimeError(f"{what}: actor died ({err})") from None


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
