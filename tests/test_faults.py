"""Fault handling of the Ray side without vLLM: a local Ray, small actors that die, hang or report a dead
engine on cue (flag files), and the real ``cluster.wait_each`` / ``Fleet`` / ``probe_health`` around them.
The full-stack versions (a real vLLM engine killed, a DeepSpeed rank killed, Ctrl-C of ``hicra-train``)
are in ``test_chaos.py``."""
import os
import signal
import time

import pytest
import ray

from hicra_rl.batch import RolloutBatch
from hicra_rl.cluster import ComponentDied, ComponentTimeout, bounded_get, probe_health, wait_each
from hicra_rl.fleet import Fleet
from hicra_rl.rewards.pool import VerifyResult


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # the toy actor classes below are imported by module name in the actor processes
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=6, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


class ToyRollout:
    """``generate`` answers each prompt with [seed, prompt token]: a restarted worker given the same seed
    returns the same batch.  Flags (files) make the next call die, hang, or report a dead engine."""

    def __init__(self, flags: str):
        self.flags = flags

    def _flag(self, name):
        return os.path.exists(os.path.join(self.flags, name))

    def generate(self, prompt_ids, n, temperature, top_p, max_tokens, seed, stop=None):
        try:
            os.remove(os.path.join(self.flags, "die"))  # one worker takes the flag, and dies
        except FileNotFoundError:
            pass
        else:
            os._exit(1)
        while self._flag("hang"):  # a dead engine under a live actor: blocks (health reports it)
            time.sleep(0.1)
        rows = [(g, [seed, p[0], j]) for g, p in enumerate(prompt_ids) for j in range(n)]
        return RolloutBatch(prompt_ids=[list(prompt_ids[g]) for g, _ in rows], response_ids=[r for _, r in rows],
                            sampling_logprobs=[[0.0] * 3 for _ in rows], finish_reasons=["stop"] * len(rows),
                            group_ids=[g for g, _ in rows], response_texts=[str(r) for _, r in rows])

    def health(self):
        return "vLLM engine process 4242 exited" if self._flag("hang") else None

    def pid(self):
        return os.getpid()


class ToyVerifier:
    def score(self, items, n_tokens, finished):
        return [VerifyResult(1.0, True, False, 0.0, text) for text, _, _ in items]

    def health(self):
        return None

    def pid(self):
        return os.getpid()


def _actor(cls, *args):
    return ray.remote(cls).options(max_concurrency=2, num_cpus=0.1).remote(*args)


def _ready(actor):
    bounded_get(actor.pid.remote(), 60, "toy actor")
    return actor


def _fleet(flags, restarts, n_workers=2, **kw):
    rollouts = [_actor(ToyRollout, str(flags)) for _ in range(n_workers)]

    def restart_rollout(i):
        ray.kill(rollouts[i])
        for f in ("hang",):  # the restarted engine is healthy
            if (flags / f).exists():
                (flags / f).unlink()
        restarts.append(i)
        fresh = _actor(ToyRollout, str(flags))
        bounded_get(fresh.pid.remote(), 60, "restarted toy worker")  # as FleetSession.restart: ready first
        return fresh

    return Fleet(rollouts, [_actor(ToyVerifier)], timeout_s=60, health_every_s=1.0,
                 restart_rollout=restart_rollout, restart_verifier=lambda i: _ready(_actor(ToyVerifier)), **kw)


PROMPTS = [[11], [12], [13]]


def test_a_rollout_worker_that_dies_mid_call_is_restarted_and_its_share_regenerated(tmp_path):
    restarts = []
    fleet = _fleet(tmp_path, restarts)
    clean = fleet.generate(PROMPTS, 2, 1.0, 8, seed=100)
    (tmp_path / "die").touch()  # the first worker to start a call dies in it
    t0 = time.monotonic()
    faulted = fleet.generate(PROMPTS, 2, 1.0, 8, seed=100)
    assert time.monotonic() - t0 < 30
    assert len(restarts) == 1 and fleet.faults["faults/rollout_restarts"] == 1
    # same seeds: the retried share is exactly what a fault-free call returns
    assert faulted.response_ids == clean.response_ids and faulted.group_ids == clean.group_ids
    assert clean.response_ids[0] == [100, 11, 0] and clean.response_ids[4] == [101, 13, 0]


def test_a_dead_engine_under_a_live_actor_is_found_by_the_health_check(tmp_path):
    restarts = []
    fleet = _fleet(tmp_path, restarts)
    (tmp_path / "hang").touch()
    t0 = time.monotonic()
    batch = fleet.generate(PROMPTS, 1, 1.0, 8, seed=7)
    took = time.monotonic() - t0
    # detected by the health check (every 1 s here; 10 s by default), not by the 60 s call deadline; the restart
    # itself (a new Ray actor) took 10-21 s on the 2-core VM with other work running, so the bound is half the
    # deadline rather than a tight figure
    assert took < 30, took
    assert len(restarts) >= 1 and fleet.faults["faults/rollout_restarts"] == len(restarts)
    assert batch.response_ids == [[7, 11, 0], [7, 12, 0], [8, 13, 0]]


def test_without_a_restart_hook_the_error_names_the_worker_and_the_reason(tmp_path):
    fleet = _fleet(tmp_path, [], n_workers=2)
    fleet.restart_rollout = None
    (tmp_path / "hang").touch()
    with pytest.raises(ComponentDied, match=r"rollout workers \(generate\): rollout worker \d "
                                            r"vLLM engine process 4242 exited \(detected after \d+ s\)"):
        fleet.generate(PROMPTS, 1, 1.0, 8, seed=7)
    (tmp_path / "hang").unlink()


def test_a_verifier_that_stops_answering_is_replaced_and_the_items_scored(tmp_path):
    fleet = _fleet(tmp_path, [])
    batch = fleet.generate(PROMPTS, 1, 1.0, 8, seed=1)
    batch.attach_problems(["x"] * 3, ["math"] * 3)
    stuck = fleet.verifiers[0]
    os.kill(bounded_get(stuck.pid.remote(), 30, "verifier pid"), signal.SIGSTOP)  # hangs: answers nothing
    scores = fleet.score(batch)
    assert [s.correct for s in scores] == [True] * 3
    assert fleet.faults["faults/verifier_restarts"] == 1 and fleet.verifiers[0] is not stuck
    ray.kill(stuck)


def test_a_killed_verifier_is_replaced(tmp_path):
    fleet = _fleet(tmp_path, [])
    batch = fleet.generate(PROMPTS, 1, 1.0, 8, seed=1)
    batch.attach_problems(["x"] * 3, ["math"] * 3)
    ray.kill(fleet.verifiers[0])
    assert len(fleet.score(batch)) == 3 and fleet.faults["faults/verifier_restarts"] == 1


def test_wait_each_fails_fast_on_a_death_while_a_peer_is_still_busy(tmp_path):
    @ray.remote(num_cpus=0.1)
    class Rank:
        def work(self, seconds, die=False):
            if die:
                os._exit(1)
            time.sleep(seconds)
            return seconds

    ranks = [Rank.remote(), Rank.remote()]
    assert bounded_get([r.work.remote(0.1) for r in ranks], 30, "ranks") == [0.1, 0.1]
    t0 = time.monotonic()
    with pytest.raises(ComponentDied, match=r"learner ranks \(update\): learner rank 1 died \(ActorDiedError"):
        wait_each([ranks[0].work.remote(120), ranks[1].work.remote(0, die=True)], 300, "learner ranks (update)",
                  ["learner rank 0", "learner rank 1"])
    assert time.monotonic() - t0 < 15  # not when rank 0's 120 s call (a stuck collective) ends
    with pytest.raises(ComponentTimeout, match=r"ranks did not finish within 1 s \(still waiting for learner rank 0\)"):
        bounded_get([ranks[0].work.remote(30)], 1, "ranks", ["learner rank 0"])


def test_probe_health_reports_silence_errors_and_reasons(tmp_path):
    (tmp_path / "hang").touch()
    sick, fine, frozen = (_actor(ToyRollout, str(tmp_path)) for _ in range(3))
    bounded_get([a.pid.remote() for a in (sick, fine)], 30, "start")
    (tmp_path / "hang").unlink()
    frozen_pid = bounded_get(frozen.pid.remote(), 30, "pid")
    os.kill(frozen_pid, signal.SIGSTOP)
    (tmp_path / "hang").touch()
    report = probe_health({0: sick, 1: fine, 2: frozen}, timeout_s=3)
    (tmp_path / "hang").unlink()
    # "fine" reads the same flag: re-probe it alone once the flag is gone
    assert report[0] == (0, "vLLM engine process 4242 exited")
    assert (2, "did not answer a health check within 3 s") in report
    assert probe_health({1: fine}) == []
    ray.kill(frozen)


class MemoryProbe:
    """Frees a 64 MiB tensor, then touches a 48 MiB one: the minor page faults that second tensor costs
    (glibc's default maps both blocks afresh: 48 MiB / 4 KiB = 12,288 faults; with freed memory kept in the
    heap, the second reuses the first's pages: none), and the allocator variables this process was given."""

    def faults_of_a_reused_block(self):
        import resource

        import torch

        def touch(mib):
            x = torch.empty(mib * 2**20 // 4)
            x.fill_(1.0)
            return x

        touch(64)   # allocated, touched, freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        touch(48)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        return faults, {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}

    def health(self):
        return None

    def close(self):
        return None


def test_learner_env_of_the_cpu_default_reaches_the_learner_only_and_keeps_freed_memory(tmp_path):
    """The CPU default's learner environment (conf/cluster/local_cpu.yaml: ``cluster.learner_keep_freed_memory``)
    is set in the process of an actor started with it, also after a restart, and not in another actor's; in the
    first a freed block's pages are reused, in the other they are mapped afresh."""
    from omegaconf import OmegaConf

    from hicra_rl.cluster import reserve
    from hicra_rl.config import CONF_DIR, ClusterConfig, TrainConfig, learner_process_env
    from hicra_rl.fleet import FleetSession

    cpu_default = OmegaConf.merge(OmegaConf.structured(ClusterConfig),
                                  OmegaConf.load(os.path.join(CONF_DIR, "cluster", "local_cpu.yaml")))
    learner_env = learner_process_env(OmegaConf.to_object(cpu_default))
    assert learner_env == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    bundles = {"learner0": {"CPU": 0.1}, "rollout0": {"CPU": 0.1}}
    cfg = TrainConfig()
    session = FleetSession(model_path="", model_cfg=cfg.model, rollout_cfg=cfg.rollout, reward_cfg=cfg.reward,
                           cluster_cfg=cfg.cluster, seed=0)
    session.bundles, session.reservation = bundles, reserve(bundles, 60)
    try:
        learner = session.start("learner0", MemoryProbe, _env=learner_env)
        other = session.start("rollout0", MemoryProbe)
        faults, env = bounded_get(learner.faults_of_a_reused_block.remote(), 60, "probe")
        assert env == learner_env and faults < 100, faults
        faults, env = bounded_get(other.faults_of_a_reused_block.remote(), 60, "probe")
        assert env == {} and faults >= 12288, faults
        restarted = session.restart("learner0")
        assert bounded_get(restarted.faults_of_a_reused_block.remote(), 60, "probe")[1] == learner_env
    finally:
        session.close(timeout_s=10)


# ------------------------------------------------- one-step off-policy: a rollout worker killed mid-update
class ToyPolicyRollout:
    """A rollout worker whose responses show which weights sampled them: sample 0 of a prompt is GOOD, 1 is
    BAD (``test_trainer_step``'s toy vocabulary), and every sampling log-prob is -(1 + v), v the version of the
    weights it loaded last (the toy learner writes the version into its weights file).  Flag ``die``: the first
    worker to start a call once an update runs (flag ``updating``) takes it and dies."""

    def __init__(self, flags: str):
        self.flags, self.held = flags, 0

    def receive_weights(self, handle) -> dict:
        with open(handle.path) as f:
            self.held = int(f.read())
        return {"megabytes": 0.0, "load_seconds": 0.0}

    def generate(self, prompt_ids, n, temperature, top_p, max_tokens, seed, stop=None):
        from test_trainer_step import BAD, GOOD, VOCAB

        if os.path.exists(os.path.join(self.flags, "die")):
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(self.flags, "updating")) and time.monotonic() < deadline:
                time.sleep(0.05)
            try:
                os.remove(os.path.join(self.flags, "die"))
            except FileNotFoundError:
                pass  # the other worker took it
            else:
                os._exit(1)
        rows = [(g, GOOD if j == 0 else BAD) for g in range(len(prompt_ids)) for j in range(n)]
        return RolloutBatch(
            prompt_ids=[list(prompt_ids[g]) for g, _ in rows], response_ids=[list(r) for _, r in rows],
            sampling_logprobs=[[-1.0 - self.held] * len(r) for _, r in rows], finish_reasons=["stop"] * len(rows),
            group_ids=[g for g, _ in rows], response_texts=[b"".join(VOCAB[i] for i in r).decode() for _, r in rows])

    def health(self):
        return None

    def pid(self):
        return os.getpid()


class ToyAnswerVerifier:
    """Correct when the response ends in the gold answer (``test_trainer_step.FakeFleet.score``)."""

    def score(self, items, n_tokens, finished):
        return [VerifyResult(float(ok), ok, False, 0.0, text.split()[-1], float(ok))
                for text, gold, _ in items for ok in [text.endswith(" " + gold)]]

    def health(self):
        return None

    def pid(self):
        return os.getpid()


class ToyLearner:
    """Rank 0 of a one-rank ``LearnerGroup``: its "weights" are the count of updates, published as a file.
    An update sets flag ``updating`` while it runs; with flag ``chaos`` it also waits (at most 60 s) until the
    killed rollout worker's replacement is up (flag ``restarted``): the restart provably falls inside it."""

    def __init__(self, flags: str):
        self.flags, self.version, self.behaviour = flags, 0, []

    def update(self, batch):
        import torch

        open(os.path.join(self.flags, "updating"), "w").close()
        try:
            deadline = time.monotonic() + 60
            while (os.path.exists(os.path.join(self.flags, "chaos"))
                   and not os.path.exists(os.path.join(self.flags, "restarted")) and time.monotonic() < deadline):
                time.sleep(0.05)
            self.behaviour.append(batch.get("behaviour_log_probs"))
            self.version += 1
            zeros = torch.zeros_like(batch["advantages"])
            return {"actor/pg_loss": 0.0, "actor/grad_norm": 1.0}, zeros, zeros
        finally:
            os.remove(os.path.join(self.flags, "updating"))

    def publish_weights(self, adapters_only=False):
        import uuid

        from hicra_rl.rollout.weight_sync import WeightHandle

        path = os.path.join(self.flags, f"weights-{uuid.uuid4().hex}")
        with open(path, "w") as f:
            f.write(str(self.version))
        return WeightHandle("shm_file", path, 1, 0, 0.0)

    def release_weights(self, handle):
        os.remove(handle.path)

    def behaviour_log_probs(self):
        return self.behaviour

    def health(self):
        return None

    def pid(self):
        return os.getpid()


def _off_policy_trainer(tmp_path, keep_fleet_weights: bool):
    """A ``Trainer`` (``rollout.staleness=1``, 2 prompts x 2 samples a step, 3 steps) around the real ``Fleet``
    and ``LearnerGroup`` with two toy rollout workers, a toy verifier and a toy learner rank."""
    from test_trainer_step import make_trainer

    from hicra_rl.driver import Trainer
    from hicra_rl.fleet import LearnerGroup

    flags = tmp_path / "flags"
    flags.mkdir()
    base, metrics = make_trainer(tmp_path / "run", total_steps=3, save_every=0)
    base.cfg.rollout.staleness = 1
    rollouts, restarts = [_actor(ToyPolicyRollout, str(flags)) for _ in range(2)], []

    def started(actor):  # a new actor took over 60 s on the 2-core VM under a parallel experiment's load
        bounded_get(actor.pid.remote(), 240, "toy actor")
        return actor

    def restart_rollout(i):
        ray.kill(rollouts[i])
        fresh = started(_actor(ToyPolicyRollout, str(flags)))
        restarts.append((i, fresh))
        (flags / "restarted").touch()
        return fresh

    # the killed worker is noticed at once (its call fails); a rare health check spares a busy VM false alarms
    fleet = Fleet(rollouts, [started(_actor(ToyAnswerVerifier))], timeout_s=300, health_every_s=120.0,
                  restart_rollout=restart_rollout)
    learner = started(_actor(ToyLearner, str(flags)))
    learners = LearnerGroup([learner], 300, keep_fleet_weights=keep_fleet_weights)
    trainer = Trainer.from_parts(base.cfg, prompts=base.prompts, tagger=base.tagger, pad_id=0, fleet=fleet,
                                 learners=learners, metrics=metrics)
    bounded_get([r.pid.remote() for r in rollouts], 240, "toy rollout workers")
    learners.sync_weights(fleet)  # as Trainer.setup: vLLM starts from the learner's weights (version 0)
    return trainer, metrics, flags, learner, restarts


LAG_KEYS = ("rollout/policy_lag", "rollout/policy_lag_max", "rollout/mixed_policy_versions")


@pytest.mark.parametrize("keep_fleet_weights", [True, False], ids=["kept-weights", "current-weights"])
def test_a_rollout_worker_killed_during_the_overlapped_generation(tmp_path, keep_fleet_weights):
    """``rollout.staleness=1``: step 3's batch is generated while step 2's update runs (fleet at version 1, the
    update makes version 2).  A worker killed in that generation and restarted during the update must sample
    with version 1 like the other worker (the weights kept from the last sync); given the update's version 2
    instead (no kept weights), the step records the mix: its 2 responses have lag 0, the other worker's 2 lag 1."""
    trainer, metrics, flags, learner, restarts = _off_policy_trainer(tmp_path, keep_fleet_weights)
    history = [trainer.train_step(0)]
    (flags / "chaos").touch()
    (flags / "die").touch()  # taken in step 3's generation, which starts in train_step(1), during its update
    history.append(trainer.train_step(1))
    history.append(trainer.train_step(2))
    metrics.close()
    assert len(restarts) == 1 and history[2]["faults/rollout_restarts"] == 1
    i, _ = restarts[0]
    # steps 1, 2: no fault; lag 0 (the first step), then 1 (the one-step off-policy lag), one version
    assert [tuple(h[k] for k in LAG_KEYS) for h in history[:2]] == [(0.0, 0.0, 0.0), (1.0, 1.0, 0.0)]
    # what sampled step 3's rows (vLLM's log-probs: -(1 + version)), worker i's two rows being rows 2i, 2i + 1
    behaviour = bounded_get(learner.behaviour_log_probs.remote(), 30, "toy learner")[2]
    first_tokens = behaviour[:, 0].tolist()
    if keep_fleet_weights:
        assert first_tokens == [-2.0] * 4  # all four rows by version 1: the restart changed nothing
        assert tuple(history[2][k] for k in LAG_KEYS) == (1.0, 1.0, 0.0)
        # one copy of the weights stays published between syncs (the last sync's, version 3), never two
        assert [p.read_text() for p in flags.glob("weights-*")] == ["3"]
    else:
        assert first_tokens == [-3.0 if r // 2 == i else -2.0 for r in range(4)]
        # lags (0, 0, 1, 1): mean 0.5, max 1, two versions
        assert tuple(history[2][k] for k in LAG_KEYS) == (0.5, 1.0, 1.0)
        assert list(flags.glob("weights-*")) == []
