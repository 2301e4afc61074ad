"""``Trainer.train_step`` / ``run`` without Ray: in-process fakes of the actors' interfaces (the fleet's
generate/score, the learner group's log-probs/update/sync/save) around the real tagger, the real HICRA
step function and the real metrics worker.  Expected values are computed by hand below."""
import json

import pytest
import torch

from hicra_rl.actors import MetricsWorker
from hicra_rl.batch import RolloutBatch
from hicra_rl.config import TrainConfig
from hicra_rl.data.prompts import Prompt
from hicra_rl.driver import RunAlreadyComplete, Trainer, prompt_indices
from hicra_rl.rewards.pool import VerifyResult
from hicra_rl.runlog import read_metrics
from hicra_rl.strategic.tagger import PlanningTagger

# toy vocabulary: id -> bytes
VOCAB = [b"<pad>", b"Let's", b" work", b" from", b" left", b" to", b" right", b".", b" 7", b" 8"]
GOOD = [1, 2, 3, 4, 5, 6, 7, 8]  # "Let's work from left to right. 7": 6 planning tokens, then ". 7"
BAD = [9]                        # " 8"
LEXICON = ["let's work from left to right"]


class FakeFleet:
    """The ``Fleet`` interface in process: sample 0 of every prompt is GOOD, sample 1 is BAD; the
    verifier rewards a response that ends in the gold answer."""

    def __init__(self):
        self.generated: list[list[list[int]]] = []

    def generate(self, prompt_ids, n, temperature, max_tokens, seed) -> RolloutBatch:
        self.generated.append([list(p) for p in prompt_ids])
        rows = [(g, GOOD if j == 0 else BAD) for g in range(len(prompt_ids)) for j in range(n)]
        return RolloutBatch(
            prompt_ids=[list(prompt_ids[g]) for g, _ in rows], response_ids=[list(r) for _, r in rows],
            sampling_logprobs=[[-0.5] * len(r) for _, r in rows], finish_reasons=["stop"] * len(rows),
            group_ids=[g for g, _ in rows], response_texts=[b"".join(VOCAB[i] for i in r).decode() for _, r in rows])

    def score(self, batch: RolloutBatch) -> list[VerifyResult]:
        out = []
        for text, gold in zip(batch.response_texts, batch.golds):
            ok = text.endswith(" " + gold)
            out.append(VerifyResult(float(ok), ok, False, 0.0, text.split()[-1], float(ok)))
        return out


class FakeLearners:
    """The ``LearnerGroup`` interface in process: log pi = -1 and entropy 0.5 on every response token;
    records what it is asked to train on."""

    def __init__(self):
        self.updates, self.saves, self.syncs, self.forwards = [], [], 0, 0
        self.loss_masks = []  # the loss_mask of each update (None: every response token counts)

    def log_probs(self, sequences, width):
        self.forwards += 1
        return self._log_probs(sequences, width)

    @staticmethod
    def _log_probs(sequences, width):
        _, _, rm = sequences
        lengths = rm.sum(-1)
        valid = (torch.arange(width)[None, :] < lengths[:, None]).float()
        return -1.0 * valid, 0.5 * valid

    def ref_log_probs(self, sequences, width):
        raise AssertionError("kl_coef is 0: no reference log-probs")

    def update(self, sequences, old_log_probs, advantages, ref_log_probs=None, behaviour_log_probs=None,
               loss_mask=None):
        self.updates.append((sequences, old_log_probs, advantages))
        self.loss_masks.append(loss_mask)
        stats = {"actor/pg_loss": 0.0, "actor/grad_norm": 1.0}
        if old_log_probs is None:  # on-policy: the update's own forward gives the pre-update log-probs
            return (stats, *self._log_probs(sequences, advantages.shape[1]))
        return stats, None, None

    def sync_weights(self, fleet):
        self.syncs += 1
        return {"sync/megabytes": 0.0, "sync/total_s": 0.0}

    def save(self, ckpt_root, step, extra, keep_last):
        self.saves.append((step, extra))
        return f"{ckpt_root}/step-{step}"


def make_trainer(tmp_path, **trainer_kw):
    cfg = TrainConfig()
    cfg.rollout.prompts_per_step, cfg.rollout.group_size = 2, 2
    cfg.trainer.total_steps, cfg.trainer.save_every, cfg.trainer.run_dir = 2, 1, str(tmp_path)
    for k, v in trainer_kw.items():
        setattr(cfg.trainer, k, v)
    prompts = [Prompt(id=f"p{i}", text=f"q{i}", token_ids=[9, i % 9 + 1], answer="7", task="arith") for i in range(5)]
    metrics = MetricsWorker(str(tmp_path), {"wandb": False, "wandb_mode": "offline", "project": "p", "run_name": None},
                            {}, resume_step=0, rel_ppl_state=None, gram_clusters={LEXICON[0]: 0})
    trainer = Trainer.from_parts(cfg, prompts=prompts, tagger=PlanningTagger(LEXICON, token_bytes=VOCAB), pad_id=0,
                                 fleet=FakeFleet(), learners=FakeLearners(), metrics=metrics)
    return trainer, metrics


def test_train_step_orchestration_hand_computed(tmp_path):
    trainer, metrics = make_trainer(tmp_path)
    m = trainer.train_step(0)
    metrics.close()

    # 1. the step's prompts, in the data order
    idx = prompt_indices(0, 5, 2, seed=0, shuffle=True)
    assert trainer.fleet.generated == [[trainer.prompts[i].token_ids for i in idx]]
    # 5-6. the learner trains on prompt + response rows and the HICRA-shaped advantages:
    # each group has rewards [1, 0] -> A = [+0.5, -0.5]; GOOD's 6 planning tokens get 0.5 + 0.2 * 0.5 = 0.6
    (ids, am, rm), old_lp, adv = trainer.learners.updates[0]
    # one epoch, one mini-batch: on-policy, no separate old-log-prob forward
    assert trainer.on_policy and old_lp is None and trainer.learners.forwards == 0
    p0 = trainer.prompts[idx[0]].token_ids
    assert ids[0].tolist() == p0 + GOOD and ids[1].tolist() == p0 + BAD + [0] * 7
    assert rm[1].tolist() == [0, 0, 1] + [0] * 7
    expected_good = [0.6] * 6 + [0.5, 0.5]
    expected_bad = [-0.5] + [0.0] * 7
    torch.testing.assert_close(adv, torch.tensor([expected_good, expected_bad] * 2))
    # 7. weights synced once
    assert trainer.learners.syncs == 1
    # 8. the metrics row: rewards, the planning share (6 + 6 of 18 tokens), one SG used twice -> H = 0
    assert m["reward/mean"] == 0.5 and m["reward/accuracy"] == 0.5
    assert m["strategic/planning_token_frac"] == pytest.approx(12 / 18)
    assert m["strategic/semantic_entropy"] == 0.0
    assert m["strategy/cluster=0"] == 0.5  # half the responses announce the strategy
    assert m["advantage/planning_token_mean"] == pytest.approx(0.6)
    assert m["token_entropy/planning"] == pytest.approx(0.5)
    assert m["rollout/logprob_diff_vllm"] == pytest.approx(0.5)  # |-1 - (-0.5)|
    assert m["rollout/generated_tokens"] == 18
    assert read_metrics(str(tmp_path))[0]["step"] == 1


def test_run_checkpoints_and_refuses_a_finished_run(tmp_path):
    trainer, metrics = make_trainer(tmp_path)
    history = trainer.run()
    metrics.close()
    assert len(history) == 2 and [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    assert [(s, e["step"], e["data_position"]) for s, e in trainer.learners.saves] == [(1, 1, 2), (2, 2, 4)]
    # the second step consumed the next slice of the data order
    assert trainer.fleet.generated[1] == [trainer.prompts[i].token_ids for i in prompt_indices(1, 5, 2, 0, True)]

    # a complete checkpoint at total_steps: refused before anything starts, with what to do
    done = tmp_path / "checkpoints" / "step-2"
    done.mkdir(parents=True)
    (done / "checkpoint.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(RunAlreadyComplete, match=r"run already complete at step 2 of 2 .*raise trainer.total_steps"):
        Trainer(trainer.cfg).resume_checkpoint()
    trainer.cfg.trainer.total_steps = 3
    assert Trainer(trainer.cfg).resume_checkpoint() == done


def test_save_every_zero_still_checkpoints_the_finished_run(tmp_path):
    """docs/operations.md: ``trainer.save_every=0`` means "only at the end", not "never"."""
    trainer, metrics = make_trainer(tmp_path)
    trainer.cfg.trainer.save_every = 0
    trainer.run()
    metrics.close()
    assert [s for s, _ in trainer.learners.saves] == [2]


def test_old_log_probs_are_recomputed_when_not_on_policy(tmp_path):
    trainer, metrics = make_trainer(tmp_path)
    trainer.cfg.learner.old_log_prob_forward = "always"
    assert not trainer.on_policy
    m = trainer.train_step(0)
    metrics.close()
    _, old_lp, _ = trainer.learners.updates[0]
    assert trainer.learners.forwards == 1 and old_lp.shape == (4, 8)
    assert m["rollout/logprob_diff_vllm"] == pytest.approx(0.5)


class NonFiniteLearners(FakeLearners):
    """Updates 2, 3 and 4 (of 1-based calls) report a skipped non-finite update."""

    def update(self, sequences, old_log_probs, advantages, ref_log_probs=None):
        stats, lp, ent = super().update(sequences, old_log_probs, advantages, ref_log_probs)
        stats["actor/nonfinite_skipped"] = 1.0 if len(self.updates) in (2, 3, 4) else 0.0
        return stats, lp, ent


def test_nonfinite_updates_are_counted_and_k_in_a_row_stop_the_run(tmp_path):
    from hicra_rl.driver import NonFiniteUpdates

    trainer, metrics = make_trainer(tmp_path, total_steps=6, save_every=0, max_nonfinite_updates=3)
    trainer.learners = NonFiniteLearners()
    with pytest.raises(NonFiniteUpdates, match=r"step 4: 3 updates in a row .*max_nonfinite_updates=3"):
        trainer.run()
    metrics.close()
    rows = read_metrics(str(tmp_path))
    # steps 1-3 were logged (step 4 raised before its metrics); the counter is cumulative
    assert [r["faults/nonfinite_updates"] for r in rows] == [0.0, 1.0, 2.0]
    # the prompts each step consumed are in its row: the data order, no gap
    assert [r["data/prompt_ids"] for r in rows] == [
        [f"p{i}" for i in prompt_indices(s, 5, 2, 0, True)] for s in range(3)]


def test_a_finite_update_resets_the_nonfinite_streak(tmp_path):
    trainer, metrics = make_trainer(tmp_path, total_steps=6, save_every=0, max_nonfinite_updates=4)
    trainer.learners = NonFiniteLearners()  # 3 skipped in a row, then finite ones: never 4 in a row
    history = trainer.run()
    metrics.close()
    assert len(history) == 6 and history[-1]["faults/nonfinite_updates"] == 3.0
    assert trainer.nonfinite_in_a_row == 0
