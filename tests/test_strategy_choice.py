"""The strategy-choice experiment's plumbing: its config composes for every arm with the eval set following the
data, and benchmarks/strategy_choice.py runs a balanced grid in priority order, skips finished runs and
publishes what the report reads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark
from hydra import compose, initialize_config_dir

from hicra_rl.config import register_configs, to_schema

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _grid_module():
    return load_benchmark("strategy_choice.py")


@pytest.mark.parametrize("data", ["strat_hard", "strat_easy"])
@pytest.mark.parametrize("arm", [["algorithm=grpo"], ["algorithm=hicra", "algorithm.hicra_alpha=1.0"]])
def test_experiment_composes_with_eval_on_the_same_task(data, arm):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = to_schema(compose(config_name="config",
                                overrides=["+experiment=strategy_choice", f"data={data}", *arm, "trainer.seed=3"]))
    alpha = 0.0 if arm == ["algorithm=grpo"] else 1.0
    assert cfg.trainer.run_dir == f"runs/strategy_choice/{data}/{cfg.algorithm.name}-a{alpha}-s3"
    assert cfg.algorithm.hicra_alpha == alpha
    # held out on the run's own task and strategies: same generator config, role eval, fixed problems
    assert cfg.eval_data.name == f"{data}_test" and cfg.eval_data.task_config == cfg.data.task_config
    assert cfg.eval_data.strategies == cfg.data.strategies == {"left_to_right": "work from left to right",
                                                              "direct": "add it all up in one step"}
    assert cfg.eval_data.split == "test" and cfg.eval_data.size == 128
    assert cfg.trainer.eval_every == cfg.trainer.total_steps and cfg.data.lexicon == "strat"


def test_grid_order_keeps_every_prefix_balanced():
    grid = _grid_module().grid(seeds=3, extra_seeds=2)
    assert len(grid) == 3 * 2 * 2 + 3 * 2 + 2 * 2 == len(set(grid))
    # seed 0 of the alpha 0 / 1.0 arms of hard, then of easy, then seed 1 ...
    assert grid[:4] == [("strat_hard", 0.0, 0), ("strat_hard", 1.0, 0), ("strat_easy", 0.0, 0),
                        ("strat_easy", 1.0, 0)]
    for n in (2, 6, 10):  # every prefix ending on a difficulty's pair compares alpha 0 and 1.0 on the same seeds
        assert [a for _, a, _ in grid[n - 2:n]] == [0.0, 1.0] and grid[n - 2][::2] == grid[n - 1][::2]
    for n in (4, 8, 12):  # after each seed block, every (difficulty, alpha in {0, 1}) cell has n/4 seeds
        cells = [(d, a) for d, a, _ in grid[:n]]
        assert all(cells.count((d, a)) == n // 4 for d in ("strat_hard", "strat_easy") for a in (0.0, 1.0))
    assert grid[12:18] == [(d, 0.2, s) for s in range(3) for d in ("strat_hard", "strat_easy")]
    assert grid[18:] == [("strat_hard", a, s) for s in (3, 4) for a in (0.0, 1.0)]


def test_arm_names_match_the_experiments_run_dirs():
    mod = _grid_module()
    assert mod.arm(0.0) == ("grpo-a0.0", ["algorithm=grpo"])
    assert mod.arm(1.0) == ("hicra-a1.0", ["algorithm=hicra", "algorithm.hicra_alpha=1.0"])
    assert mod.arm(0.2)[0] == "hicra-a0.2"


def test_finished_runs_are_skipped_and_published(tmp_path, monkeypatch, capsys):
    mod = _grid_module()
    monkeypatch.chdir(tmp_path)
    for d, a, s in mod.grid(1, 0):
        run = tmp_path / mod.RUNS / d / f"{mod.arm(a)[0]}-s{s}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"trainer": {"init_checkpoint": str(tmp_path / "cold")}}))
        (run / "metrics.jsonl").write_text("{}\n")
        (run / "eval-step16.json").write_text(json.dumps({"metrics": {"eval/pass@1": 0.5}}))
        (run / "checkpoints").mkdir()  # not published
    monkeypatch.setattr(mod, "total_steps", lambda overrides: 16)
    (tmp_path / "cold").mkdir()
    (tmp_path / "cold" / "model.safetensors").write_bytes(b"abc")
    assert mod.main(["--seeds", "1", "--extra-seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count(" done") == 6 and "hicra-train" not in out
    published = sorted(p.relative_to(tmp_path / mod.RESULTS).as_posix() for p in (tmp_path / mod.RESULTS).rglob("*")
                       if p.is_file())
    assert len(published) == 6 * 4 and "strat_hard/hicra-a1.0-s0/eval-step16.json" in published
    fingerprint = json.loads((tmp_path / mod.RESULTS / "strat_easy/grpo-a0.0-s0/cold_start.json").read_text())
    assert fingerprint == {"init_checkpoint": str(tmp_path / "cold"),  # sha256 of b"abc" (FIPS 180-2 example)
                           "model_safetensors_sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert not any("checkpoints" in p for p in published)


def test_unfinished_run_is_started_with_the_arms_overrides(tmp_path, monkeypatch, capsys):
    mod = _grid_module()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mod, "total_steps", lambda overrides: 16)
    assert mod.main(["--seeds", "1", "--extra-seeds", "0", "--dry-run", "--", "trainer.total_steps=16"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "hicra-train" in ln]
    assert len(lines) == 6
    assert lines[1].endswith("+experiment=strategy_choice data=strat_hard algorithm=hicra algorithm.hicra_alpha=1.0 "
                             "trainer.seed=0 trainer.total_steps=16")


def test_published_runs_are_not_rerun_on_a_fresh_clone_and_data_filters(tmp_path, monkeypatch, capsys):
    """A fresh clone has benchmarks/results but no runs/: a published run is not trained again; --data keeps
    only that difficulty's arms, in the grid's order."""
    mod = _grid_module()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mod, "total_steps", lambda overrides: 16)
    dest = tmp_path / mod.RESULTS / "strat_hard" / "grpo-a0.0-s0"
    dest.mkdir(parents=True)
    (dest / "eval-step16.json").write_text(json.dumps({"metrics": {"eval/pass@1": 0.5}}))
    assert mod.main(["--seeds", "2", "--extra-seeds", "0", "--data", "strat_hard", "--dry-run"]) == 0
    out = capsys.readouterr().out
    runs = [ln.split("data=")[1].split()[0] + " " + ln.split("trainer.seed=")[1].split()[0]
            for ln in out.splitlines() if "hicra-train" in ln]
    assert "strat_hard/grpo-a0.0-s0 published" in out
    assert runs == ["strat_hard 0", "strat_hard 1", "strat_hard 1", "strat_hard 0", "strat_hard 1"]
    assert "strat_easy" not in out
