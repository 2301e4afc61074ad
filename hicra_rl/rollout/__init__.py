"""Rollout: the vLLM engine wrapper and the learner -> vLLM weight-sync transport (no Ray here)."""
from hicra_rl.rollout.engine import (
    SampledResponse,
    VLLMRolloutEngine,
    per_prompt_seeds,
    remove_orphaned_shm,
    to_rollout_batch,
)
from hicra_rl.rollout.weight_sync import SyncStats, WeightHandle, publish_state_dict, release

__all__ = [
    "SampledResponse",
    "SyncStats",
    "VLLMRolloutEngine",
    "WeightHandle",
    "per_prompt_seeds",
    "publish_state_dict",
    "release",
    "remove_orphaned_shm",
    "to_rollout_batch",
]
