"""Security (issue 10): model output is never evaluated as code, checkpoints load with weights_only=True,
secrets in the environment never reach config.json / metrics.jsonl / checkpoints, and launch/start_head.sh's
dashboard needs token auth.  See docs/bad-input.md ("Security") and launch/README.md ("Security")."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hicra_rl.config import LoggingConfig, TrainConfig, as_plain_dict
from hicra_rl.iofiles import write_json_atomic
from hicra_rl.learner import checkpoint as ckpt
from hicra_rl.runlog import MetricsSink

REPO = Path(__file__).resolve().parents[1]
SECRETS = {"WANDB_API_KEY": "secret-xyz-wandb", "HF_TOKEN": "hf_secret-xyz", "RAY_AUTH_TOKEN": "secret-xyz-ray"}


# ---------------------------------------------------------------- no eval / exec, no unsafe torch.load


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            yield name, node


def test_no_eval_exec_or_unpickling_in_the_package():
    """No builtin eval/exec/compile, pickle.load(s) or yaml.load anywhere in hicra_rl/; every torch.load
    passes weights_only=True except the opt-in branch of checkpoint.safe_torch_load."""
    found = []
    for path in sorted((REPO / "hicra_rl").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for name, node in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                found.append(f"{where} {name}()")
            if isinstance(node.func, ast.Attribute) and name in ("loads", "load") and \
                    getattr(node.func.value, "id", "") in ("pickle", "cPickle", "dill", "yaml", "marshal"):
                found.append(f"{where} {node.func.value.id}.{name}()")
            if isinstance(node.func, ast.Attribute) and name == "load" and getattr(node.func.value, "id", "") == "torch":
                weights_only = {k.arg: k.value for k in node.keywords}.get("weights_only")
                safe = isinstance(weights_only, ast.Constant) and weights_only.value is True
                if not safe and where != f"hicra_rl/learner/checkpoint.py:{_trusted_load_line()}":
                    found.append(f"{where} torch.load without weights_only=True")
    assert found == []


def _trusted_load_line() -> int:
    source = (REPO / "hicra_rl" / "learner" / "checkpoint.py").read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if "weights_only=False" in line and "return torch.load" in line)


class _Evil:
    """Unpickling this would call _record (a stand-in for os.system)."""

    def __reduce__(self):
        return (_record, ("pwned",))


CALLED = []


def _record(what):
    CALLED.append(what)
    return what


def test_safe_torch_load_reads_rng_and_deepspeed_state(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    state = ckpt.safe_torch_load(tmp_path / "rng.pt")
    ckpt.set_rng_state(state)  # numpy's MT19937 array comes back through the allowlist
    ds = {"zero_stage": ZeroStageEnum(2), "loss_scaler": LossScaler(1.0),
          "frag": fragment_address(numel=4, start=0), "w": torch.ones(2)}
    torch.save(ds, tmp_path / "optim_states.pt")
    loaded = ckpt.safe_torch_load(tmp_path / "optim_states.pt")
    assert loaded["zero_stage"] == ZeroStageEnum(2) and loaded["frag"].numel == 4 and loaded["w"].sum() == 2


def test_safe_torch_load_refuses_other_classes_unless_trusted(tmp_path, monkeypatch):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, path)
    CALLED.clear()
    with pytest.raises(RuntimeError, match=rf"{path}: refusing to unpickle .*_record.*HICRA_TRUSTED_CHECKPOINTS=1"):
        ckpt.safe_torch_load(path)
    assert CALLED == []
    monkeypatch.setenv("HICRA_TRUSTED_CHECKPOINTS", "1")
    assert ckpt.safe_torch_load(path) == {"x": "pwned"} and CALLED == ["pwned"]


def _fake_learner(evil_file: Path | None):
    """Enough of a PolicyLearner for load_checkpoint: its DeepSpeed engine reads one file through its
    checkpoint engine, as DeepSpeed's load_checkpoint does."""

    class Engine:
        def __init__(self):
            self.checkpoint_engine = SimpleNamespace(load=lambda path, map_location=None: torch.load(path, weights_only=False))

        def load_checkpoint(self, load_dir, tag, **_):
            self.seen = self.checkpoint_engine.load(str(Path(load_dir) / tag / "optim_states.pt"))
            return load_dir, {}

    return SimpleNamespace(engine=Engine(), world_size=1, rank=0, cfg=SimpleNamespace(zero_stage=2),
                           barrier=lambda: None)


def _write_checkpoint(root: Path, optim_state) -> Path:
    step = root / "step-2"
    (step / "deepspeed" / "state").mkdir(parents=True)
    (step / "rng").mkdir()
    torch.save(optim_state, step / "deepspeed" / "state" / "optim_states.pt")
    torch.save(ckpt.rng_state(), step / "rng" / "rank0.pt")
    (step / "extra.json").write_text(json.dumps({"step": 2}))
    (step / "checkpoint.json").write_text(json.dumps({"format": 1, "step": 2, "world_size": 1, "zero_stage": 2}))
    return step


def test_load_checkpoint_reads_deepspeed_files_weights_only(tmp_path):
    learner = _fake_learner(None)
    original = learner.engine.checkpoint_engine
    assert ckpt.load_checkpoint(learner, _write_checkpoint(tmp_path / "a", {"w": torch.ones(1)})) == {"step": 2}
    assert learner.engine.checkpoint_engine is original  # DeepSpeed's own engine is put back
    CALLED.clear()
    with pytest.raises(RuntimeError, match="refusing to unpickle"):
        ckpt.load_checkpoint(learner, _write_checkpoint(tmp_path / "b", {"w": _Evil()}))
    assert CALLED == [] and learner.engine.checkpoint_engine is original


# ---------------------------------------------------------------- secrets never written


def _no_secret_under(root: Path) -> list[str]:
    leaks = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaks += [f"{path}: {name}" for name, value in SECRETS.items() if value.encode() in data]
    return leaks


def test_secrets_in_the_environment_stay_out_of_config_json_and_metrics(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    cfg = TrainConfig(logging=LoggingConfig(wandb=True, wandb_mode="online", project="p", run_name="r"))
    plain = as_plain_dict(cfg)
    assert plain["logging"] == {"wandb": True, "wandb_mode": "online", "project": "p", "run_name": "r",
                                "console_every": 1}
    write_json_atomic(tmp_path / "config.json", plain, indent=2)   # what the driver writes
    sink = MetricsSink(str(tmp_path), use_wandb=False, wandb_mode="offline", project="p", run_name="r", config=plain)
    sink.log(1, {"reward/mean": 0.5})
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl"]
    assert _no_secret_under(tmp_path) == []


def test_secrets_stay_out_of_checkpoints(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text("{}")

    class Engine:
        module = SimpleNamespace(save_pretrained=lambda out, state_dict: (Path(out) / "config.json").write_text("{}"))

        def save_checkpoint(self, save_dir, tag, save_latest):
            (Path(save_dir) / tag).mkdir(parents=True)
            torch.save({"w": torch.ones(1)}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")

    learner = SimpleNamespace(engine=Engine(), rank=0, world_size=1, cfg=SimpleNamespace(zero_stage=2), global_steps=2,
                              model_path=str(model_dir), barrier=lambda: None, full_state_dict=lambda: {})
    extra = {"step": 2, "data_position": 16, "rel_ppl": None}   # what the driver passes
    path = ckpt.save_checkpoint(learner, tmp_path / "checkpoints", 2, extra=extra)
    assert json.loads((path / "extra.json").read_text()) == extra
    assert _no_secret_under(tmp_path / "checkpoints") == []


# ---------------------------------------------------------------- launch/start_head.sh's dashboard


def _start_head(tmp_path, **env):
    fake = tmp_path / "fake_ray"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    full = {**{k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "DASHBOARD_HOST")},
            "RAY_CLI": str(fake), "HEAD_IP": "10.0.0.5", "HOME": str(tmp_path), **env}
    return subprocess.run([str(REPO / "launch" / "start_head.sh")], capture_output=True, text=True, env=full,
                          timeout=30, check=False)


def _ray_start_argv(out) -> list[str]:
    return next(json.loads(line) for line in out.stdout.splitlines() if line.startswith('["start"'))


def test_start_head_dashboard_host_defaults_to_all_interfaces_with_token_auth(tmp_path):
    out = _start_head(tmp_path, RAY_AUTH_TOKEN="t")
    assert out.returncode == 0, out.stderr
    argv = _ray_start_argv(out)
    assert argv[argv.index("--dashboard-host") + 1] == "0.0.0.0"
    assert "auth: token" in out.stdout   # cluster_env.sh's default mode


def test_start_head_dashboard_host_can_be_restricted(tmp_path):
    out = _start_head(tmp_path, RAY_AUTH_TOKEN="t", DASHBOARD_HOST="127.0.0.1")
    assert out.returncode == 0, out.stderr
    argv = _ray_start_argv(out)
    assert argv[argv.index("--dashboard-host") + 1] == "127.0.0.1"


def test_start_head_refuses_an_open_dashboard_without_token_auth(tmp_path):
    out = _start_head(tmp_path, RAY_AUTH_MODE="disabled")
    assert out.returncode == 2 and "would listen on 0.0.0.0 without token auth" in out.stderr
    assert out.stdout == ""   # ray was never called
    assert _start_head(tmp_path, RAY_AUTH_MODE="disabled", DASHBOARD_HOST="127.0.0.1").returncode == 0
    assert _start_head(tmp_path, RAY_AUTH_MODE="disabled", HICRA_ALLOW_OPEN_DASHBOARD="1").returncode == 0


# ---------------------------------------------------------------- reasoning-gym scorers never run the answer

# modules that eval / exec only their own generated data (never a model answer), checked by reading them
RG_CONTROLLED = {
    "reasoning_gym.arithmetic.basic_arithmetic",          # eval of the generated expression
    "reasoning_gym.arithmetic.bitwise_arithmetic",        # eval of the generated problem (the answer: int(x, 0))
    "reasoning_gym.arithmetic.gsm_symbolic.generators_00_49",
    "reasoning_gym.arithmetic.gsm_symbolic.generators_50_99",
    "reasoning_gym.code.codeio",                           # exec of the dataset's own code
    "reasoning_gym.logic.propositional_logic",             # its own parse_expr, not sympy's
}
EXPLOIT = "__import__('os').environ.setdefault('HICRA_PWNED', '1')"


def test_every_reasoning_gym_module_that_evaluates_strings_is_hardened_or_controlled():
    import re

    import reasoning_gym

    from hicra_rl.rewards import tasks

    root = Path(reasoning_gym.__file__).parent
    risky = set()
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"(?<![\w.])(eval|exec)\(|parse_expr\(|sympify\(", text):
            risky.add("reasoning_gym." + ".".join(path.relative_to(root).with_suffix("").parts))
    assert risky == set(tasks.EVAL_MODULES) | set(tasks.PARSE_EXPR_MODULES) | RG_CONTROLLED


@pytest.mark.parametrize("task", ["string_insertion", "spiral_matrix", "binary_matrix", "n_queens", "number_sorting",
                                  "polynomial_multiplication", "countdown", "puzzle24", "simple_integration",
                                  "intermediate_integration"])
def test_reasoning_gym_scorers_do_not_execute_the_answer(task, monkeypatch):
    from hicra_rl.rewards.tasks import generate_task_items, score_task_answer

    monkeypatch.delenv("HICRA_PWNED", raising=False)
    item = generate_task_items(task, 2, seed=0)[0]
    entry = {"answer": item.answer, "metadata": item.metadata}
    for answer in (EXPLOIT, f"[{EXPLOIT}]", "x.__class__", "().__class__.__bases__[0]"):
        assert score_task_answer(task, answer, entry) <= 0.01, answer   # countdown, puzzle24: 0.01 for any wrong answer
    assert "HICRA_PWNED" not in os.environ
    assert score_task_answer(task, item.answer, entry) == 1.0           # real answers still score


def test_list_answers_still_get_reasoning_gyms_partial_credit():
    from hicra_rl.rewards.tasks import generate_task_items, score_task_answer

    item = generate_task_items("string_insertion", 1, seed=0)[0]
    as_list = repr(list(item.answer))   # "['D', 'A', ...]": reasoning-gym gives 0.1 for the right letters as a list
    assert score_task_answer("string_insertion", as_list, {"answer": item.answer, "metadata": item.metadata}) == 0.1


def test_safe_parse_expr_accepts_arithmetic_and_refuses_the_rest():
    from hicra_rl.rewards.tasks import safe_parse_expr

    assert str(safe_parse_expr("6*(98 - 54) - 34 - 66")) == "164"
    assert str(safe_parse_expr("-exp(x)*sin(x) + C")) == "C - exp(x)*sin(x)"
    for bad in (EXPLOIT, "open(x)", "x.func", "lambda: 1", "chr(95)*2", "eval(x)", "a[0]", "x" * 3000):
        with pytest.raises(ValueError, match="expression refused"):
            safe_parse_expr(bad)


def test_secrets_are_not_put_into_a_shared_clusters_runtime_env(monkeypatch):
    import ray

    from hicra_rl import cluster

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster, "_init", lambda address, num_cpus, env: seen.update(address=address, env=env))
    monkeypatch.setenv("WANDB_API_KEY", "secret-xyz")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cluster.connect("10.0.0.1:6379", None)
    forwarded = seen["env"]["env_vars"]
    assert forwarded.get("WANDB_PROJECT") == "proj"
    assert "WANDB_API_KEY" not in forwarded and "HF_TOKEN" not in forwarded
    # a local Ray (loopback only, this user's own processes) gets them: the metrics actor logs to wandb
    cluster.connect(None, 2)
    assert seen["env"]["env_vars"]["WANDB_API_KEY"] == "secret-xyz"


def test_a_local_ray_listens_on_loopback_only(monkeypatch):
    import ray

    from hicra_rl import cluster

    calls = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.update(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster.connect(None, 2)
    assert calls["_node_ip_address"] == "127.0.0.1" and calls["include_dashboard"] is False
