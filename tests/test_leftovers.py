"""``hicra_rl.leftovers``: the processes a SIGKILLed driver leaves are stopped by the next start, and only
those (a recycled pid is left alone; a live run in the same directory is refused)."""
import json
import subprocess
import sys
import time

import psutil
import pytest

from hicra_rl import leftovers


def test_record_then_reap_kills_only_what_is_still_the_same_process(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert leftovers.record(tmp_path) >= 1
        data = json.loads((tmp_path / leftovers.FILE).read_text())
        # a dead driver (pid 0 is never one) and one entry with a recycled pid (other start time)
        data["driver"] = 0
        data["processes"].append({"pid": psutil.Process().pid, "create_time": 1.0, "name": "pytest"})
        (tmp_path / leftovers.FILE).write_text(json.dumps(data))
        killed = leftovers.reap(tmp_path)
        assert [k.split()[0] for k in killed] == [str(child.pid)]  # not this process (recycled-pid entry)
        child.wait(timeout=10)  # (reap already collected its exit status)
        assert not psutil.pid_exists(child.pid)
        assert not (tmp_path / leftovers.FILE).exists()
        assert leftovers.reap(tmp_path) == []  # nothing recorded any more
    finally:
        if child.poll() is None:
            child.kill()


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
    leftovers.record(tmp_path)
    leftovers.forget(tmp_path)
    assert not (tmp_path / leftovers.FILE).exists()
