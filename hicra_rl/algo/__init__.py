"""The HICRA algorithm as pure tensor functions."""
from hicra_rl.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    StepAdvantages,
    compute_advantages,
    dr_grpo_advantages,
    hicra_advantages,
    hicra_step_advantages,
    mean_centred_advantages,
    std_normalised_advantages,
)
from hicra_rl.algo.logprobs import logprobs_and_entropy
from hicra_rl.algo.losses import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    ROLLOUT_CORRECTIONS,
    PolicyLossConfig,
    aggregate_loss,
    kl_penalty,
    masked_mean,
    ppo_clip_loss,
    rollout_correction,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "KL_ESTIMATORS",
    "ROLLOUT_CORRECTIONS",
    "StepAdvantages",
    "hicra_step_advantages",
    "PolicyLossConfig",
    "aggregate_loss",
    "compute_advantages",
    "dr_grpo_advantages",
    "hicra_advantages",
    "kl_penalty",
    "logprobs_and_entropy",
    "masked_mean",
    "mean_centred_advantages",
    "ppo_clip_loss",
    "rollout_correction",
    "std_normalised_advantages",
]
