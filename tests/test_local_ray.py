"""A local run starts its own Ray whatever Ray's files on the machine say: without ``cluster.address`` (and
without ``RAY_ADDRESS``) ``hicra_rl.cluster.connect`` calls ``ray.init(address="local", ...)``, so a head
started earlier with ``launch/start_head.sh`` (running, or killed with its ``ray_current_cluster`` file
left behind) is not joined (Ray would refuse the local run's ``num_cpus``); one log line says which it did."""
import logging
import os
import subprocess
import sys
import tempfile
import time

import pytest

from hicra_rl import cluster


@pytest.fixture
def init_calls(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    return calls


def test_without_an_address_a_local_run_starts_its_own_cluster(init_calls, caplog):
    with caplog.at_level(logging.INFO, logger="hicra_rl"):
        cluster.connect(None, 2)
    (kw,) = init_calls
    assert kw["address"] == "local" and kw["num_cpus"] == 2 and kw["_node_ip_address"] == "127.0.0.1"
    lines = [r.getMessage() for r in caplog.records if r.name == "hicra_rl"]
    assert len(lines) == 1 and lines[0].startswith("Ray: started a local cluster for this run (127.0.0.1, 2 CPUs")


def test_with_an_address_the_run_joins_it_and_says_so(init_calls, caplog):
    with caplog.at_level(logging.INFO, logger="hicra_rl"):
        cluster.connect("10.0.0.1:6379", 2)
    (kw,) = init_calls
    assert kw["address"] == "10.0.0.1:6379" and "num_cpus" not in kw
    assert [r.getMessage() for r in caplog.records if r.name == "hicra_rl"] == [
        "Ray: joined the cluster at 10.0.0.1:6379 (cluster.address)"]


CHILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
import ray
from hicra_rl import cluster
cluster.connect(None, 1)
print("CPUS", ray.cluster_resources().get("CPU"))
ray.shutdown()
"""


def test_a_stale_ray_current_cluster_file_does_not_capture_a_local_run():
    """A real ``ray.init`` (1 CPU, its own temp dir through RAY_TMPDIR, so the machine's /tmp/ray is not
    touched) with a ``ray_current_cluster`` file naming a dead head: the run starts its own Ray."""
    temp = tempfile.mkdtemp(prefix="hr", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(temp, "ray"))
        with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:1")  # the head that launch/start_head.sh started, killed since
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
        env.update(RAY_TMPDIR=temp, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120,
                             check=False)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert "hicra_rl Ray: started a local cluster for this run" in out.stdout
        assert "CPUS 1.0" in out.stdout
        assert time.monotonic() - t0 < 90
    finally:
        subprocess.run(["rm", "-rf", temp], check=False)
