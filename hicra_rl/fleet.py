"""Rollout workers + verifier pool as one unit: prompts in, scored responses out.  Shared by the
training driver, periodic evaluation and ``hicra-eval``."""
from __future__ import annotations

import logging

from hicra_rl.evaluation import split_evenly

log = logging.getLogger("hicra_rl")


class Fleet:
    def __init__(self, rollouts: list, verifiers: list, timeout_s: float, top_p: float = 1.0,
                 stop: list[str] | None = None):
        self.rollouts, self.verifiers = rollouts, verifiers
        self.timeout_s, self.top_p, self.stop = timeout_s, top_p, list(stop or []) or None

    def _get(self, refs, what: str):
        from hicra_rl.cluster import bounded_get

        return bounded_get(refs, self.timeout_s, what)

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int, seed: int) -> list[dict]:
        """Split prompts over the rollout workers; responses come back prompt-major with a global group index."""
        chunks = split_evenly(list(range(len(prompt_ids))), len(self.rollouts))
        refs = [w.generate.remote([prompt_ids[i] for i in chunk], n, temperature, self.top_p, max_tokens, seed + j,
                                  self.stop)
                for j, (w, chunk) in enumerate(zip(self.rollouts, chunks))]
        out = []
        for chunk, responses in zip(chunks, self._get(refs, "rollout workers (generate)")):
            for resp in responses:
                resp["group_index"] = chunk[resp["group_index"]]
                out.append(resp)
        return out

    def score(self, items: list[tuple], n_tokens: list[int], finished: list[bool]) -> list[dict]:
        chunks = split_evenly(list(range(len(items))), len(self.verifiers))
        refs = [v.score.remote([items[i] for i in c], [n_tokens[i] for i in c], [finished[i] for i in c])
                for v, c in zip(self.verifiers, chunks)]
        return [r for part in self._get(refs, "verifier pool (score)") for r in part]


def fleet_bundles(rollout_cfg, reward_cfg, cluster_cfg) -> dict[str, dict[str, float]]:
    """Placement-group bundles of the rollout workers and the verifier pool (``cluster.reserve`` input)."""
    gpus = cluster_cfg.gpus_per_rollout_worker * rollout_cfg.tensor_parallel_size
    bundles = {f"rollout{i}": {"CPU": cluster_cfg.cpus_per_actor, "GPU": gpus} for i in range(rollout_cfg.num_workers)}
    bundles.update({f"verifier{i}": {"CPU": 0.25} for i in range(reward_cfg.num_workers)})
    return bundles


def start_rollout_workers(ray, count: int, model_path: str, model_cfg, rollout_cfg, seed: int, options) -> list:
    from hicra_rl.actors import RolloutWorker

    return [
        ray.remote(RolloutWorker).options(**options(f"rollout{i}")).remote(
            model_path, dtype=model_cfg.dtype, max_model_len=model_cfg.max_model_len, seed=seed + i,
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, kv_cache_gib=rollout_cfg.kv_cache_gib,
            cpu_threads=rollout_cfg.cpu_threads, enforce_eager=rollout_cfg.enforce_eager)
        for i in range(count)
    ]


def start_verifiers(ray, reward_cfg, max_new_tokens: int, options) -> list:
    from hicra_rl.actors import VerifierWorker

    shaping = None
    if reward_cfg.overlong_penalty or reward_cfg.format_penalty:
        shaping = dict(overlong_penalty=reward_cfg.overlong_penalty, max_response_tokens=max_new_tokens,
                       overlong_buffer_tokens=reward_cfg.overlong_buffer,
                       overlong_penalty_factor=reward_cfg.overlong_penalty_factor,
                       format_penalty=reward_cfg.format_penalty)
    return [ray.remote(VerifierWorker).options(**options(f"verifier{i}")).remote(
        reward_cfg.timeout_s, reward_cfg.answer_mode, shaping) for i in range(reward_cfg.num_workers)]
