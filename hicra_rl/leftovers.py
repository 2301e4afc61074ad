"""What a SIGKILLed driver leaves behind, found and stopped by the next run in the same run directory.

A driver killed with SIGKILL cannot clean up: the Ray it started keeps some of its agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) and vLLM worker processes can outlive their engine
(measured by tests/test_chaos.py).  While a run holds its own local Ray, ``record`` writes the processes of
that session (pid + start time, so a recycled pid is never touched) to ``<run_dir>/.processes.json``; a
clean exit deletes it.  The next start in that run directory calls ``reap``: every recorded process still
alive is killed, and vLLM's /dev/shm files that nothing maps any more are removed, as are the policy weight
files the killed learner processes had published (``hicra_weights_<pid>_*``; with ``rollout.staleness=1`` one
stays published between weight syncs).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

log = logging.getLogger("hicra_rl")
FILE = ".processes.json"


def record(run_dir: str | os.PathLike) -> int:
    """Write this process's descendants (pid, start time, name); returns how many."""
    import psutil

    from hicra_rl.iofiles import write_json_atomic

    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            procs.append({"pid": p.pid, "create_time": p.create_time(), "name": p.name()})
        except psutil.NoSuchProcess:
            continue
    me = psutil.Process()
    write_json_atomic(Path(run_dir) / FILE, {"driver": me.pid, "driver_create_time": me.create_time(),
                                             "processes": procs})
    return len(procs)


def forget(run_dir: str | os.PathLike) -> None:
    (Path(run_dir) / FILE).unlink(missing_ok=True)


def remove_weight_files(pids: set[int]) -> list[str]:
    """Delete the weight files (``publish_state_dict``: ``hicra_weights_<pid>_<uuid>.safetensors`` and its
    ``.tmp``) and adapter folders (``publish_adapter``: ``....adapter``) written by the processes ``pids``; returns
    the deleted paths."""
    from hicra_rl.rollout.weight_sync import SHM_FILE_PREFIX, default_shm_dir

    directory, removed = default_shm_dir(), []
    for name in os.listdir(directory):
        pid = name[len(SHM_FILE_PREFIX):].split("_")[0] if name.startswith(SHM_FILE_PREFIX) else ""
        if pid.isdigit() and int(pid) in pids:
            path = os.path.join(directory, name)
            try:
                if os.path.isdir(path):   # an adapter folder (transport lora_adapter)
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def reap(run_dir: str | os.PathLike) -> list[str]:
    """Kill the recorded processes of an earlier run of ``run_dir`` that are still alive (same pid *and*
    start time); returns ``"pid name"`` of each one killed."""
    import psutil

    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        log.warning("%s: unreadable (%s); not cleaning up after the earlier run", path, err)
        return []
    try:  # that run's driver still alive: a second run in the same directory, not a leftover
        driver = psutil.Process(recorded["driver"])
        if driver.pid != os.getpid() and abs(driver.create_time() - recorded["driver_create_time"]) < 0.01:
            raise RuntimeError(f"{run_dir}: another hicra-train (pid {driver.pid}) is running in this run "
                               "directory; stop it or choose another trainer.run_dir")
    except (psutil.NoSuchProcess, KeyError):
        pass
    killed = []
    for entry in recorded.get("processes", []):
        try:
            p = psutil.Process(entry["pid"])
            if abs(p.create_time() - entry["create_time"]) > 0.01:
                continue  # the pid was reused by an unrelated process
            p.send_signal(signal.SIGKILL)
            killed.append(f"{entry['pid']} {entry.get('name', '')}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            continue
    if killed:
        from hicra_rl.rollout.engine import remove_orphaned_shm

        psutil.wait_procs([psutil.Process(int(k.split()[0])) for k in killed if psutil.pid_exists(int(k.split()[0]))],
                          timeout=5)
        removed = remove_orphaned_shm(min_age_s=0) + remove_weight_files({int(k.split()[0]) for k in killed})
        log.warning("stopped %d processes left by an earlier, killed run in %s (%s); removed %d /dev/shm files",
                    len(killed), run_dir, ", ".join(killed), len(removed))
    path.unlink(missing_ok=True)
    return killed
