"""``trainer.eval_before_after`` (what ``make run`` sets): evaluate before step 1 and after the last step, then
print held-out Pass@1 before -> after.  The loop's order of evaluations and the summary line, on hand-made
files and a Trainer whose fleet calls are replaced (the evaluation itself is tested in test_evaluation)."""
import json
from types import SimpleNamespace

from hicra_rl.driver import Trainer, before_after_line


def _eval_file(path, p1, p4, n):
    path.write_text(json.dumps({"metrics": {"eval/pass@1": p1, "eval/pass@4": p4, "eval/n_problems": float(n),
                                            "eval/pass@1/strategy=direct": 0.1}, "rows": []}))


def test_before_after_line_from_the_two_evaluations(tmp_path):
    assert before_after_line(tmp_path, 6) is None
    _eval_file(tmp_path / "eval-step0.json", 0.498046875, 0.65625, 128)
    assert before_after_line(tmp_path, 6) is None  # no final evaluation yet
    _eval_file(tmp_path / "eval-step6.json", 0.5, 0.6484375, 128)
    assert before_after_line(tmp_path, 6) == (
        "held-out Pass@1 0.498 -> 0.500 (+0.002; Pass@4 0.656 -> 0.648), k=4 on 128 eval-role problems, "
        "before step 1 and after step 6")


def _trainer(tmp_path, total_steps, eval_every, start_step=0, before_after=True):
    t = object.__new__(Trainer)
    t.cfg = SimpleNamespace(
        algorithm=SimpleNamespace(name="hicra"), logging=SimpleNamespace(console_every=0),
        trainer=SimpleNamespace(total_steps=total_steps, save_every=0, eval_every=eval_every,
                                eval_before_after=before_after))
    t.run_dir, t.start_step, t.eval_prompts = tmp_path, start_step, ["p"]
    t.evals, passes = [], iter([0.25, 0.5, 0.75])

    def run_eval(step):
        t.evals.append(step + 1)
        p = next(passes)
        _eval_file(tmp_path / f"eval-step{step + 1}.json", p, p + 0.1, 64)
        return {"eval/pass@1": p, "timing/eval_s": 1.0}

    def train_step(step):  # the periodic evaluation, as the real step does it
        return run_eval(step) if eval_every and (step + 1) % eval_every == 0 else {}

    t.run_eval, t.train_step, t.save = run_eval, train_step, lambda done: f"ckpt-{done}"
    return t


def test_loop_evaluates_before_and_after_once_each(tmp_path, capsys):
    t = _trainer(tmp_path, total_steps=3, eval_every=0)
    t.run()
    assert t.evals == [0, 3]
    out = capsys.readouterr().out
    assert "held-out before training: Pass@1 0.250 (1 s)" in out
    assert "held-out Pass@1 0.250 -> 0.500 (+0.250; Pass@4 0.350 -> 0.600), k=4 on 64 eval-role problems" in out


def test_periodic_evaluation_at_the_last_step_is_not_repeated(tmp_path):
    t = _trainer(tmp_path, total_steps=4, eval_every=2)
    t.run()
    assert t.evals == [0, 2, 4]


def test_resumed_run_skips_the_before_and_off_means_off(tmp_path, capsys):
    t = _trainer(tmp_path, total_steps=4, eval_every=0, start_step=2)
    t.run()
    assert t.evals == [4] and "held-out Pass@1" not in capsys.readouterr().out  # no eval-step0.json here
    t = _trainer(tmp_path / "x", total_steps=2, eval_every=0, before_after=False)
    (tmp_path / "x").mkdir()
    t.run()
    assert t.evals == []
