"""The learner in a Ray actor (as ``hicra-train`` starts it) against the same learner in this plain process.

    python benchmarks/bench_learner_actor.py [--rounds 6] [--publish] [--keep-freed-memory]
                                             [--actor-env KEY=VALUE ...] [--cold-start DIR] [--rollouts DIR]

Inside a training run the learner's update reaches fewer GFLOP/s than ``bench_learner.py`` measures in a
plain process. This separates the actor shell from the rest of the fleet: a local Ray (as ``cluster=local_cpu``
starts it) runs one ``LearnerWorker`` actor (one CPU of Ray's accounting, torch threads = every core, as the
driver gives a single rank), and this process builds a second learner with the same config and cold start.
No vLLM engine, verifier or metrics actor runs. Each round updates both on the same real batch
(``bench_learner``'s dumped steps, one per round in turn), one after the other, alternating which goes
first, and prints their forward tokens/s, update seconds, ``perf/update_cpu_util``,
``perf/update_page_faults`` and ``perf/update_sys_frac`` (the kernel's share of the learner's CPU); then the
median of actor / plain over the rounds. The two learners take the same optimizer steps on the same batches,
so each round compares the same work. ``--publish``: after each
update the actor also exports its weights as a training step does (``publish_weights``, then
``release_weights``); the plain learner does not. ``--keep-freed-memory``: the actor's process starts with
``cluster.learner_keep_freed_memory``'s glibc settings (the CPU default of a training run); this process keeps
glibc's defaults. ``--actor-env KEY=VALUE`` (repeatable) sets any other environment variable in the actor's
process only, as ``cluster.learner_env`` does in a training run (e.g. another allocator through ``LD_PRELOAD``).
"""
from __future__ import annotations

import argparse
import os
import statistics

from bench_learner import (
    DEFAULT_COLD_START,
    DEFAULT_ROLLOUTS,
    default_batch,
    default_learner,
    default_learner_config,
    dumped_batches,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cold-start", default=DEFAULT_COLD_START)
    parser.add_argument("--rollouts", default=DEFAULT_ROLLOUTS, help="a run's rollouts/ folder (dump_rollouts)")
    parser.add_argument("--publish", action="store_true", help="the actor exports its weights after each update")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="the actor keeps freed memory in glibc's heap (cluster.learner_keep_freed_memory)")
    parser.add_argument("--actor-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the actor's process only (repeatable)")
    args = parser.parse_args()
    bad = [kv for kv in args.actor_env if "=" not in kv]
    if bad:
        parser.error(f"--actor-env takes KEY=VALUE, got {bad[0]!r}")
    from hicra_rl.config import ClusterConfig, learner_process_env

    actor_env = learner_process_env(ClusterConfig(learner_keep_freed_memory=args.keep_freed_memory,
                                                  learner_env=dict(kv.split("=", 1) for kv in args.actor_env)))
    import ray

    from hicra_rl import cluster
    from hicra_rl.actors import LearnerWorker

    cluster.connect(None, 8)   # conf/cluster/local_cpu.yaml: num_cpus 8, cpus_per_actor 1
    threads = os.cpu_count() or 1
    options = dict(num_cpus=1, runtime_env={"env_vars": actor_env}) if actor_env else dict(num_cpus=1)
    actor = ray.remote(LearnerWorker).options(**options).remote(0, 1, threads)
    ray.get(actor.build.remote(default_learner_config(), "127.0.0.1", 29703, 600.0, model_path=args.cold_start))
    plain = default_learner(args.cold_start, 29704)
    batches = dumped_batches(args.cold_start, args.rollouts)
    ray.get(actor.update.remote(default_batch(0)))   # warm-up, both
    plain.update(default_batch(0))
    ratios = []
    print(f"{threads} torch threads each; the dumped steps of {args.rollouts}"
          + (f"; the actor's environment adds {actor_env}" if actor_env else ""))
    for r in range(args.rounds):
        batch = batches[r % len(batches)]
        stats = {}
        for who in (("actor", "plain") if r % 2 == 0 else ("plain", "actor")):
            stats[who] = ray.get(actor.update.remote(batch))[0] if who == "actor" else plain.update(batch)
            if who == "actor" and args.publish:
                ray.get(actor.release_weights.remote(ray.get(actor.publish_weights.remote())))
        rate = {k: v["perf/forward_tokens_per_s"] for k, v in stats.items()}
        ratios.append(rate["actor"] / rate["plain"])
        print(" | ".join(f"{k} {rate[k]:4.0f} forward tokens/s, {stats[k]['perf/update_s']:5.1f} s, util "
                         f"{stats[k]['perf/update_cpu_util']:.2f}, {stats[k]['perf/update_page_faults'] / 1e3:4.0f}k "
                         f"page faults, kernel {stats[k]['perf/update_sys_frac']:.1%}" for k in ("actor", "plain"))
              + f" | actor / plain {ratios[-1]:.3f}", flush=True)
    print(f"actor / plain: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}) "
          f"over {len(ratios)} rounds")
    ray.shutdown()


if __name__ == "__main__":
    main()
