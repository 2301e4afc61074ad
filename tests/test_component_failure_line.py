"""A run stopped by a dead or hung component (Ray's memory monitor included) ends with one line, not Ray's traceback."""
import types

import pytest
import ray

from hicra_rl import cluster, train
from hicra_rl.cluster import ComponentDied, ComponentTimeout

# what Ray's ActorDiedError says when the memory monitor killed the actor's worker (the cause is below line 1)
OOM_TEXT = ("The actor died unexpectedly before finishing this task.\n\tclass_name: RolloutWorker\n"
            "Task was killed due to the node running low on memory.\nMemory on the node (IP: 127.0.0.1) was "
            "22.51GB / 23.47GB (0.959), which exceeds the memory usage threshold of 0.95.")


def test_memory_kill_is_named_even_when_its_cause_is_below_the_first_line():
    oom_actor = ray.exceptions.RayActorError(error_msg=OOM_TEXT)
    assert cluster.killed_for_memory(oom_actor)
    assert cluster.killed_for_memory(ray.exceptions.OutOfMemoryError("task evicted"))
    assert "Ray's memory monitor" in cluster._failure(oom_actor)
    plain = ray.exceptions.RayActorError(error_msg="The actor died unexpectedly before finishing this task.")
    assert not cluster.killed_for_memory(plain)
    assert cluster._failure(plain) == ("died (RayActorError: The actor died unexpectedly before finishing this "
                                       "task.)")
    assert cluster._failure(ValueError("a bug")) is None


@pytest.mark.parametrize("err", [
    ComponentDied("rollout step: rollout #0 was killed by Ray's memory monitor: the node ran low on memory "
                  "(detected after 3 s)", 0),
    ComponentTimeout("learner update did not finish within 600 s (still waiting for learner #0)"),
])
def test_hicra_train_prints_one_line_and_how_to_resume(monkeypatch, capsys, tmp_path, err):
    import hicra_rl.driver as driver

    def failing_train(cfg):
        raise err

    monkeypatch.setattr(driver, "train", failing_train)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = types.SimpleNamespace(trainer=types.SimpleNamespace(run_dir=str(tmp_path / "run")))
    with pytest.raises(SystemExit) as stop:
        train.run(cfg)
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"hicra-train: {err}. The run stopped")
    assert lines[0].endswith(f"resumes from the newest checkpoint in {tmp_path / 'run'}/checkpoints")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")   # asked for tracebacks: the error itself
    with pytest.raises(type(err)):
        train.run(cfg)
