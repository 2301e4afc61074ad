"""The step pipeline's switches without Ray (the in-process fakes of ``test_trainer_step``): one-step
off-policy rollout (``rollout.staleness``), DAPO dynamic sampling (``rollout.filter_groups``), the
behaviour log-probs handed to the learner, and ``algorithm=hicra_adaptive``'s alpha in the advantages."""
import dataclasses
import json
import threading

import pytest
import torch
from test_trainer_step import GOOD, VOCAB, FakeFleet, FakeLearners, make_trainer

from hicra_rl.driver import extra_prompt_indices, prompt_indices
from hicra_rl.runlog import read_metrics


class Recorder:
    """One event log shared by the fake fleet and learners: what ran, and what overlapped."""

    def __init__(self):
        self.events: list[str] = []
        self.generating = threading.Event()
        self.update_started = threading.Event()


class OverlapFleet(FakeFleet):
    """Generation takes a while and records itself; the second generation waits until an update has begun
    (so with staleness 1 it provably runs while the learner trains)."""

    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def generate(self, prompt_ids, n, temperature, max_tokens, seed):
        self.rec.events.append(f"generate {len(self.generated) + 1} begins")
        self.rec.generating.set()
        if len(self.generated) == 1 and self.rec.staleness == 1:
            assert self.rec.update_started.wait(10), "generation of step 2 never overlapped an update"
        out = super().generate(prompt_ids, n, temperature, max_tokens, seed)
        self.rec.events.append(f"generate {len(self.generated)} ends")
        self.rec.generating.clear()
        return out


class OverlapLearners(FakeLearners):
    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec, self.behaviour = rec, []

    def update(self, sequences, old_log_probs, advantages, ref_log_probs=None, behaviour_log_probs=None,
               loss_mask=None):
        if self.rec.staleness == 1 and not self.updates:  # the background thread may start late on a busy machine
            assert self.rec.generating.wait(10), "step 2's generation never began"
        self.rec.events.append(f"update {len(self.updates) + 1}")
        self.rec.update_started.set()
        self.behaviour.append(behaviour_log_probs)
        return super().update(sequences, old_log_probs, advantages, ref_log_probs, loss_mask=loss_mask)

    def sync_weights(self, fleet):
        assert not self.rec.generating.is_set(), "weights must not change while vLLM generates"
        self.rec.events.append(f"sync {self.syncs + 1}")
        return super().sync_weights(fleet)


def _run(tmp_path, staleness: int, steps: int = 3):
    rec = Recorder()
    rec.staleness = staleness
    trainer, metrics = make_trainer(tmp_path, total_steps=steps, save_every=0)
    trainer.cfg.rollout.staleness = staleness
    trainer.fleet, trainer.learners = OverlapFleet(rec), OverlapLearners(rec)
    history = trainer.run()
    metrics.close()
    return trainer, rec, history


def test_staleness_0_is_the_synchronous_loop(tmp_path):
    trainer, rec, history = _run(tmp_path, 0)
    assert rec.events == [e for s in (1, 2, 3) for e in (f"generate {s} begins", f"generate {s} ends",
                                                         f"update {s}", f"sync {s}")]
    assert [h["rollout/policy_lag"] for h in history] == [0.0, 0.0, 0.0]
    # no rollout correction and on-policy: the learner gets no behaviour log-probs (today's call)
    assert trainer.learners.behaviour == [None, None, None]


def test_staleness_1_overlaps_generation_with_the_update_and_syncs_between(tmp_path):
    trainer, rec, history = _run(tmp_path / "off", 1)
    ev = rec.events
    # step 2's generation starts before step 1's update and ends before step 1's sync; step 3's after that sync
    assert ev.index("generate 2 begins") < ev.index("update 1") < ev.index("generate 2 ends") < ev.index("sync 1")
    assert ev.index("sync 1") < ev.index("generate 3 begins") < ev.index("sync 2")
    assert ev.count("sync 3") == 1 and "generate 4 begins" not in ev  # nothing generated past the last step
    # step 1 trains on what the initial weights sampled; steps 2, 3 on samples one sync older (every response)
    assert [h["rollout/policy_lag"] for h in history] == [0.0, 1.0, 1.0]
    assert [h["rollout/policy_lag_max"] for h in history] == [0.0, 1.0, 1.0]
    assert [h["rollout/mixed_policy_versions"] for h in history] == [0.0, 0.0, 0.0]
    # the same prompts and advantages as the synchronous run (the fakes do not depend on the weights)
    sync_trainer, _, _ = _run(tmp_path / "sync", 0)
    assert trainer.fleet.generated == sync_trainer.fleet.generated
    for (seq_a, _, adv_a), (seq_b, _, adv_b) in zip(trainer.learners.updates, sync_trainer.learners.updates):
        assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b)) and torch.equal(adv_a, adv_b)
    # the learner gets vLLM's sampling log-probs, response layout: -0.5 on the 8 GOOD / 1 BAD tokens
    behaviour = trainer.learners.behaviour[1]
    assert behaviour.shape == (4, 8)
    assert behaviour[0].tolist() == [-0.5] * 8 and behaviour[1].tolist() == [-0.5] + [0.0] * 7


def test_policy_lag_is_the_mean_over_the_responses_of_their_own_versions():
    """Four responses, the update starting from version 2: two sampled by version 1 (lag 1), two by a restarted
    worker given version 2 (lag 0): mean 0.5, max 1, mixed.  One version: lag 1, not mixed."""
    from hicra_rl.batch import RolloutBatch
    from hicra_rl.driver import policy_lag_stats

    keys = ("rollout/policy_lag", "rollout/policy_lag_max", "rollout/mixed_policy_versions")
    assert tuple(policy_lag_stats([1, 1, 2, 2], 2)[k] for k in keys) == (0.5, 1.0, 1.0)
    assert tuple(policy_lag_stats([1, 1, 1, 1], 2)[k] for k in keys) == (1.0, 1.0, 0.0)
    assert tuple(policy_lag_stats([0, 0], 0)[k] for k in keys) == (0.0, 0.0, 0.0)
    # the versions travel with their responses through dynamic sampling's take_groups / join
    batch = RolloutBatch([[1]] * 4, [[2]] * 4, [[-0.5]] * 4, ["stop"] * 4, [0, 0, 1, 1], ["x"] * 4,
                         policy_versions=[1, 1, 2, 2])
    assert RolloutBatch.join([batch.take_groups([1]), batch.take_groups([0])]).policy_versions == [2, 2, 1, 1]


def test_a_failed_background_generation_fails_the_step_that_needs_it(tmp_path):
    trainer, metrics = make_trainer(tmp_path, total_steps=3, save_every=0)
    trainer.cfg.rollout.staleness = 1

    class Failing(FakeFleet):
        def generate(self, *args):
            if len(self.generated) == 1:
                raise RuntimeError("rollout worker 0 died")
            return super().generate(*args)

    trainer.fleet = Failing()
    trainer.train_step(0)
    with pytest.raises(RuntimeError, match="rollout worker 0 died"):
        trainer.train_step(1)
    metrics.close()


class MixedFleet(FakeFleet):
    """Prompts whose last token id is in ``flat`` get GOOD for every sample (all rewards 1: no signal);
    the others GOOD then BAD (informative)."""

    def __init__(self, flat=frozenset({3, 5})):
        super().__init__()
        self.flat = flat

    def generate(self, prompt_ids, n, temperature, max_tokens, seed):
        batch = super().generate(prompt_ids, n, temperature, max_tokens, seed)
        for i, g in enumerate(batch.group_ids):
            if prompt_ids[g][-1] in self.flat:
                batch.response_ids[i] = list(GOOD)
                batch.sampling_logprobs[i] = [-0.5] * len(GOOD)
                batch.response_texts[i] = b"".join(VOCAB[t] for t in GOOD).decode()
        return batch


def test_dynamic_sampling_keeps_informative_groups_from_extra_rounds(tmp_path):
    trainer, metrics = make_trainer(tmp_path, total_steps=1, save_every=0)
    r = trainer.cfg.rollout
    r.filter_groups, r.filter_groups_max_rounds = True, 3
    trainer.fleet = MixedFleet(flat={1, 3, 5})  # p0, p2, p4 (token ids [9, 1], [9, 3], [9, 5]): no signal
    m = trainer.train_step(0)
    metrics.close()
    # by hand: the main prompts [2, 4] are both flat; round 1 draws 2 of the other three by the
    # (seed, step, round) key: [0, 3], one informative; round 2 draws the one left, [1]: informative -> done
    assert prompt_indices(0, 5, 2, 0, True) == [2, 4]
    assert extra_prompt_indices(0, 1, 5, 2, 0, exclude=[2, 4]) == [0, 3]
    assert extra_prompt_indices(0, 2, 5, 2, 0, exclude=[2, 4, 0, 3]) == [1]
    assert trainer.fleet.generated == [[[9, 3], [9, 5]], [[9, 1], [9, 4]], [[9, 2]]]
    assert m["data/prompt_ids"] == ["p3", "p1"]
    assert m["dynamic_sampling/rounds"] == 2.0
    assert m["dynamic_sampling/filtered_frac"] == pytest.approx(3 / 5)  # 3 of the 5 groups generated dropped
    assert m["dynamic_sampling/filled_groups"] == 0.0
    # accuracy over all 10 responses generated (flat groups 2 + 2 + 2 right, mixed 1 + 1): 8 / 10, while the
    # kept batch's own accuracy is 2 / 4
    assert m["dynamic_sampling/accuracy_before_filter"] == pytest.approx(0.8)
    assert m["reward/accuracy"] == pytest.approx(0.5)
    # every group the learner trains on has rewards [1, 0]: advantages +-0.5, none all-zero
    _, _, adv = trainer.learners.updates[0]
    assert adv.shape[0] == 4 and torch.count_nonzero(adv.abs().sum(-1)) == 4


def test_dynamic_sampling_fills_up_with_uninformative_groups_after_the_last_round(tmp_path):
    trainer, metrics = make_trainer(tmp_path, total_steps=1, save_every=0)
    r = trainer.cfg.rollout
    r.filter_groups, r.filter_groups_max_rounds = True, 2
    trainer.fleet = MixedFleet(flat={1, 2, 3, 4, 5})  # no prompt carries signal
    m = trainer.train_step(0)
    metrics.close()
    assert len(trainer.fleet.generated) == 3  # the main round and two extra rounds
    assert m["dynamic_sampling/rounds"] == 2 and m["dynamic_sampling/filled_groups"] == 2.0
    assert m["dynamic_sampling/filtered_frac"] == 1.0
    # the step keeps its shape: the main round's groups, advantage 0
    assert m["data/prompt_ids"] == [f"p{i}" for i in prompt_indices(0, 5, 2, 0, True)]
    _, _, adv = trainer.learners.updates[0]
    assert adv.shape[0] == 4 and torch.count_nonzero(adv) == 0


def test_dynamic_sampling_leaves_the_filled_up_groups_out_of_the_loss(tmp_path):
    """DAPO averages the loss over the kept groups only: the uninformative groups added to keep the
    batch's shape get a loss mask of 0 (no token in the token-mean denominator, no entropy / KL term),
    the kept groups 1 on every response token (tests/test_learner.py: such a mask gives exactly the
    gradient of the kept rows alone)."""
    trainer, metrics = make_trainer(tmp_path, total_steps=1, save_every=0)
    r = trainer.cfg.rollout
    r.filter_groups, r.filter_groups_max_rounds = True, 2
    trainer.fleet = MixedFleet(flat={2, 3, 4, 5})  # only p0 ([9, 1]) carries signal
    m = trainer.train_step(0)
    metrics.close()
    # main round [2, 4] flat; round 1 [0, 3]: p0 kept; round 2 [1]: flat. p0's group, then p2's to fill up
    assert m["data/prompt_ids"] == ["p0", "p2"] and m["dynamic_sampling/filled_groups"] == 1.0
    (_, _, adv), mask = trainer.learners.updates[0], trainer.learners.loss_masks[0]
    assert mask is not None and mask.shape == adv.shape
    assert mask[:2].tolist() == [[1.0] * 8, [1.0] * 8] and mask[2:].sum() == 0  # p0's 2 responses, p2's 2
    assert trainer.learners.loss_masks == [mask]


def test_dynamic_sampling_without_fill_up_masks_nothing(tmp_path):
    trainer, metrics = make_trainer(tmp_path, total_steps=1, save_every=0)
    trainer.cfg.rollout.filter_groups = True
    trainer.fleet = MixedFleet(flat=frozenset())  # every group informative
    trainer.train_step(0)
    metrics.close()
    assert trainer.learners.loss_masks == [None]


class ShapedFleet(MixedFleet):
    """Every response of the ``flat`` prompts is right, but (as with length or format shaping) their
    rewards differ: 1.0 for the first, 0.9 for the others."""

    def score(self, batch):
        out = super().score(batch)
        for i, g in enumerate(batch.group_ids):
            if batch.prompt_ids[i][-1] in self.flat and i != batch.group_ids.index(g):
                out[i] = dataclasses.replace(out[i], reward=0.9)
        return out


def test_dynamic_sampling_judges_groups_by_correctness_not_by_shaped_reward(tmp_path):
    """DAPO keeps a group when its responses differ in correctness: an all-correct group whose shaped
    rewards differ (lengths, format) carries no correctness signal and is dropped."""
    trainer, metrics = make_trainer(tmp_path, total_steps=1, save_every=0)
    r = trainer.cfg.rollout
    r.filter_groups, r.filter_groups_max_rounds = True, 3
    trainer.fleet = ShapedFleet(flat={1, 3, 5})  # p0, p2, p4 all correct (rewards 1.0, 0.9)
    m = trainer.train_step(0)
    metrics.close()
    # as in test_dynamic_sampling_keeps_informative_groups_from_extra_rounds: p2, p4 dropped in the main
    # round, p0 in round 1; p3 and p1 kept
    assert m["data/prompt_ids"] == ["p3", "p1"] and m["dynamic_sampling/rounds"] == 2.0
    assert m["dynamic_sampling/filtered_frac"] == pytest.approx(3 / 5)


def test_generate_tokens_per_s_counts_every_rounds_tokens(tmp_path):
    """Under dynamic sampling, perf/generate_tokens_per_s is every token generated (all rounds, dropped
    groups too) over the generation time of all rounds, not the kept batch's tokens over that time."""
    trainer, metrics = make_trainer(tmp_path, total_steps=1, save_every=0)
    r = trainer.cfg.rollout
    r.filter_groups, r.filter_groups_max_rounds = True, 3
    trainer.fleet = MixedFleet(flat={1, 3, 5})
    m = trainer.train_step(0)
    metrics.close()
    # 5 groups generated over 3 rounds: 3 flat (GOOD, GOOD: 16 tokens) and 2 mixed (GOOD, BAD: 9 tokens)
    assert m["dynamic_sampling/generated_tokens"] == 3 * 16 + 2 * 9
    assert m["rollout/generated_tokens"] == 2 * 9  # the trained batch
    assert m["perf/generate_tokens_per_s"] * m["timing/generate_s"] == pytest.approx(66.0)


def test_dynamic_sampling_data_position_is_a_function_of_the_step(tmp_path):
    """A resumed run (a new trainer starting at step 2) draws exactly the prompts the straight run drew."""
    def ids(run_dir, steps):
        trainer, metrics = make_trainer(run_dir, total_steps=3, save_every=0)
        trainer.cfg.rollout.filter_groups = True
        trainer.fleet = MixedFleet()
        out = [trainer.train_step(s)["data/prompt_ids"] for s in steps]
        metrics.close()
        return out, trainer.fleet.generated

    straight, gen_straight = ids(tmp_path / "a", [0, 1, 2])
    resumed, gen_resumed = ids(tmp_path / "b", [2])
    assert straight[2] == resumed[0]
    assert gen_straight[-len(gen_resumed):] == gen_resumed


def test_hicra_adaptive_uses_the_gates_alpha_and_logs_it(tmp_path):
    trainer, metrics = make_trainer(tmp_path, total_steps=1, save_every=0)
    trainer.cfg.algorithm.name = "hicra_adaptive"
    from hicra_rl.algo.adaptive_alpha import AdaptiveAlphaGate

    trainer.alpha_gate = AdaptiveAlphaGate(trainer.cfg.algorithm)
    m = trainer.train_step(0)
    # warm-up: the gate is shut, alpha 0: GRPO's advantages (+-0.5 on every token of a response)
    _, _, adv = trainer.learners.updates[0]
    assert m["algorithm/alpha"] == 0.0 and m["algorithm/gate"] == 0.0
    torch.testing.assert_close(adv[0, :8], torch.full((8,), 0.5))
    # forced open (gate 1): HICRA's 0.5 + 0.2 * 0.5 = 0.6 on the 6 planning tokens
    trainer.alpha_gate.gate = 1.0
    m = trainer.train_step(1)
    metrics.close()
    _, _, adv = trainer.learners.updates[1]
    torch.testing.assert_close(adv[0, :8], torch.tensor([0.6] * 6 + [0.5, 0.5]))
    assert read_metrics(str(tmp_path))[1]["algorithm/alpha"] == pytest.approx(0.2)
    # the gate's state goes into the checkpoint's extra (JSON), so a resume continues the same alpha sequence
    trainer.save(2)
    step, extra = trainer.learners.saves[-1]
    restored = AdaptiveAlphaGate(trainer.cfg.algorithm)
    restored.load_state_dict(json.loads(json.dumps(extra["adaptive_gate"])))
    assert step == 2 and restored.state_dict() == trainer.alpha_gate.state_dict()


def test_no_restart_once_the_session_is_closing():
    """A generation still running in the off-policy thread while the run stops must not start new actors
    in a session that is closing: the restart fails at once, naming the actor, and nothing is touched."""
    from hicra_rl.cluster import ComponentDied
    from hicra_rl.config import TrainConfig
    from hicra_rl.fleet import FleetSession

    cfg = TrainConfig()
    session = FleetSession(model_path="m", model_cfg=cfg.model, rollout_cfg=cfg.rollout, reward_cfg=cfg.reward,
                           cluster_cfg=cfg.cluster, seed=0)
    session.actors = {"verifier0": "the old actor"}
    session.closing = True
    with pytest.raises(ComponentDied, match="verifier0 died while the session was closing; not restarted"):
        session.restart("verifier0")
    assert session.actors == {"verifier0": "the old actor"}
