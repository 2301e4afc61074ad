"""``hicra_rl.leftovers``: the processes a SIGKILLed driver leaves are stopped by the next start, and only
those (a recycled pid is left alone; a live run in the same directory is refused)."""
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from hicra_rl import leftovers

DRIVER = """
import os, subprocess, sys
from hicra_rl import leftovers
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
leftovers.record(sys.argv[1])
print(child.pid, flush=True)
os._exit(0)  # like a SIGKILLed driver: nothing cleaned up, the child lives on
"""


def test_record_then_reap_kills_only_what_is_still_the_same_process(tmp_path):
    out = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path)], capture_output=True, text=True, check=True)
    orphan = int(out.stdout.split()[0])
    try:
        assert psutil.pid_exists(orphan)
        data = json.loads((tmp_path / leftovers.FILE).read_text())
        assert [p["pid"] for p in data["processes"]] == [orphan]
        # an entry whose pid now belongs to another process (this one; other start time) is left alone
        data["processes"].append({"pid": psutil.Process().pid, "create_time": 1.0, "name": "pytest"})
        (tmp_path / leftovers.FILE).write_text(json.dumps(data))
        killed = leftovers.reap(tmp_path)
        assert [k.split()[0] for k in killed] == [str(orphan)]
        time.sleep(0.5)
        assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
        assert not (tmp_path / leftovers.FILE).exists()
        assert leftovers.reap(tmp_path) == []  # nothing recorded any more
    finally:
        if psutil.pid_exists(orphan):
            psutil.Process(orphan).kill()


def test_a_live_run_in_the_same_directory_is_refused(tmp_path):
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.2)
        p = psutil.Process(driver.pid)
        (tmp_path / leftovers.FILE).write_text(json.dumps(
            {"driver": driver.pid, "driver_create_time": p.create_time(), "processes": []}))
        with pytest.raises(RuntimeError, match=r"another hicra-train \(pid \d+\) is running in this run directory"):
            leftovers.reap(tmp_path)
    finally:
        driver.kill()


def test_forget_after_a_clean_exit(tmp_path):
    (tmp_path / leftovers.FILE).write_text("{}")
    leftovers.forget(tmp_path)
    assert not (tmp_path / leftovers.FILE).exists()


def test_the_weight_files_of_killed_learner_processes_are_removed(tmp_path, monkeypatch):
    """``publish_state_dict`` names its file ``hicra_weights_<pid>_<uuid>.safetensors``: those of the killed pids
    go (also a half-written ``.tmp``), another process's and other files stay."""
    from hicra_rl.rollout import weight_sync

    monkeypatch.setattr(weight_sync, "default_shm_dir", lambda: str(tmp_path))
    names = ["hicra_weights_4242_ab.safetensors", "hicra_weights_4242_cd.safetensors.tmp",
             "hicra_weights_42_ef.safetensors", "psm_4242", "hicra_weights_x_1.safetensors"]
    for name in names:
        (tmp_path / name).touch()
    removed = leftovers.remove_weight_files({4242})
    assert sorted(removed) == sorted(str(tmp_path / n) for n in names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_the_adapter_folders_of_killed_learner_processes_are_removed(tmp_path, monkeypatch):
    """Transport lora_adapter publishes folders ``hicra_weights_<pid>_<uuid>.adapter`` (and ``.adapter.tmp`` while
    writing): a killed pid's go with their contents."""
    from hicra_rl.rollout import weight_sync

    monkeypatch.setattr(weight_sync, "default_shm_dir", lambda: str(tmp_path))
    for name in ("hicra_weights_4242_ab.adapter", "hicra_weights_4242_cd.adapter.tmp", "hicra_weights_7_ef.adapter"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"x")
    removed = leftovers.remove_weight_files({4242})
    assert sorted(removed) == [str(tmp_path / "hicra_weights_4242_ab.adapter"),
                               str(tmp_path / "hicra_weights_4242_cd.adapter.tmp")]
    assert [p.name for p in tmp_path.iterdir()] == ["hicra_weights_7_ef.adapter"]


def test_publish_adapter_renames_a_whole_folder_into_place_and_release_removes_it(tmp_path):
    from hicra_rl.rollout import weight_sync

    seen = []

    def save(folder):
        seen.append(os.path.exists(folder.removesuffix(".tmp")))   # the final name appears only after the write
        os.makedirs(folder)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            f.write("{}")

    handle = weight_sync.publish_adapter(save, num_tensors=3, nbytes=120, directory=str(tmp_path))
    assert seen == [False] and handle.transport == "lora_adapter" and (handle.num_tensors, handle.nbytes) == (3, 120)
    assert os.path.basename(handle.path).startswith(f"hicra_weights_{os.getpid()}_") and handle.path.endswith(".adapter")
    assert os.listdir(handle.path) == ["adapter_config.json"] and os.listdir(tmp_path) == [os.path.basename(handle.path)]
    weight_sync.release(handle)
    weight_sync.release(handle)   # idempotent
    assert os.listdir(tmp_path) == []

    def fails(folder):
        os.makedirs(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        weight_sync.publish_adapter(fails, 1, 1, directory=str(tmp_path))
    assert os.listdir(tmp_path) == []   # no half-written folder left
