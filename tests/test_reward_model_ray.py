"""The reward-model actor under a local Ray (1 CPU): ``Fleet.score_model`` returns what the in-process scorer
gives, and an actor whose scoring call runs past ``reward.model_timeout_s`` (its health check says so) is
killed, restarted and its share scored again, counted in ``faults/reward_model_restarts``.  A flag file makes
the next call hang (the pattern of tests/test_faults.py; a dead actor takes the same restart path as a dead
verifier, tested there).  About 30 s alone, 60-90 s on a loaded 2-core machine (two actor starts): slow."""
import os
import time

import pytest
import ray
import torch

from hicra_rl.actors import RewardModelWorker
from hicra_rl.cluster import bounded_get
from hicra_rl.fleet import Fleet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    # the flagged actor class below is imported by module name in the actor processes
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                       "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-rm")
    cfg = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                      pad_token_id=smollm2_tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return str(folder)


class FlaggedRewardModel(RewardModelWorker):
    """The real worker; a ``hang`` flag file makes its next call block (the flag is taken by one call)."""

    def __init__(self, flags: str, path: str, **kwargs):
        super().__init__(path, **kwargs)
        self.flags = flags

    def _take(self, name: str) -> bool:
        try:
            os.remove(os.path.join(self.flags, name))
            return True
        except FileNotFoundError:
            return False

    def score(self, pairs):
        if self._take("hang"):
            self._busy_since = self._clock()
            time.sleep(300)
        return super().score(pairs)


def test_score_model_restarts_a_hung_reward_model(local_ray, tiny_rm, tmp_path):
    from hicra_rl.rewards.model import RewardModelScorer

    kwargs = dict(dtype="float32", batch_size=2, max_tokens=64, time_limit_s=2.0, torch_threads=1)

    def start():
        actor = ray.remote(FlaggedRewardModel).options(max_concurrency=2, num_cpus=0.1).remote(
            str(tmp_path), tiny_rm, **kwargs)
        bounded_get(actor.ready.remote(), 120, "reward model")
        return actor

    actors = [start()]
    restarted = []

    def restart(i):
        ray.kill(actors[i], no_restart=True)
        actors[i] = start()
        restarted.append(i)
        return actors[i]

    fleet = Fleet([], [], timeout_s=120, health_every_s=0.5, max_restarts=2, reward_models=actors,
                  restart_reward_model=restart)
    pairs = [("Question 1: is 1 a number?\n", "yes"), ("Question 2: is 2 a number?\n", "well no"),
             ("Q3\n", "hmm")]
    expected = RewardModelScorer(tiny_rm, batch_size=2, max_tokens=64).score(pairs)
    assert fleet.score_model(pairs) == pytest.approx(expected, abs=1e-5)
    assert fleet.faults["faults/reward_model_restarts"] == 0

    (tmp_path / "hang").touch()
    t0 = time.monotonic()
    assert fleet.score_model(pairs) == pytest.approx(expected, abs=1e-5)
    assert fleet.faults["faults/reward_model_restarts"] == 1 and restarted == [0]
    assert time.monotonic() - t0 < 120  # the time bound, not the 300 s hang, ended the call
