"""The learner in a Ray actor (as ``hicra-train`` starts it) against the same learner in this plain process.

    python benchmarks/bench_learner_actor.py [--rounds 6] [--publish] [--cold-start DIR] [--rollouts DIR]

Inside a training run the learner's update reaches fewer GFLOP/s than ``bench_learner.py`` measures in a
plain process. This separates the actor shell from the rest of the fleet: a local Ray (as ``cluster=local_cpu``
starts it) runs one ``LearnerWorker`` actor (one CPU of Ray's accounting, torch threads = every core, as the
driver gives a single rank), and this process builds a second learner with the same config and cold start.
No vLLM engine, verifier or metrics actor runs. Each round updates both on the same real batch
(``bench_learner``'s dumped steps, one per round in turn), one after the other, alternating which goes
first, and prints their forward tokens/s, update seconds, ``perf/update_cpu_util`` and
``perf/update_page_faults``; then the median of actor / plain over the rounds. The two learners take the
same optimizer steps on the same batches, so each round compares the same work. ``--publish``: after each
update the actor also exports its weights as a training step does (``publish_weights``, then
``release_weights``); the plain learner does not.
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
    args = parser.parse_args()
    import ray

    from hicra_rl import cluster
    from hicra_rl.actors import LearnerWorker

    cluster.connect(None, 8)   # conf/cluster/local_cpu.yaml: num_cpus 8, cpus_per_actor 1
    threads = os.cpu_count() or 1
    actor = ray.remote(LearnerWorker).options(num_cpus=1).remote(0, 1, threads)
    ray.get(actor.build.remote(default_learner_config(), "127.0.0.1", 29703, 600.0, model_path=args.cold_start))
    plain = default_learner(args.cold_start, 29704)
    batches = dumped_batches(args.cold_start, args.rollouts)
    ray.get(actor.update.remote(default_batch(0)))   # warm-up, both
    plain.update(default_batch(0))
    ratios = []
    print(f"{threads} torch threads each; the dumped steps of {args.rollouts}")
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
                         "page faults" for k in ("actor", "plain"))
              + f" | actor / plain {ratios[-1]:.3f}", flush=True)
    print(f"actor / plain: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}) "
          f"over {len(ratios)} rounds")
    ray.shutdown()


if __name__ == "__main__":
    main()
