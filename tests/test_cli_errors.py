"""Bad input at the command line: every entry point (``hicra-train``, ``hicra-sft``, ``hicra-eval``,
``hicra-sg``, ``hicra-report``) and every kind of input of docs/bad-input.md's tables (config, data file,
data row, model directory, lexicon, corpus, run directory) prints one line ``<command>: <what is wrong>``
naming the file, row, field or key on stderr and exits 2, with no traceback, at load time (before Ray or
vLLM starts).  ``HYDRA_FULL_ERROR=1`` (Hydra programs) or ``--debug`` (argparse ones) still shows the
traceback.  The console scripts run as subprocesses (a few seconds each: the failures come before
transformers is imported)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hicra_rl.errors import BadInputError, UserInputError, one_line, user_errors_in_one_line

BIN = Path(sys.executable).parent
GOOD_ROW = '{"problem": "What is 1+1?", "answer": "2"}'


# ---------------------------------------------------------------- the helper itself (in process)


def test_a_user_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info, user_errors_in_one_line("hicra-x"):
        raise BadInputError("f.jsonl: row 2: field 'answer': missing\n  more detail")
    assert info.value.code == 2
    assert capsys.readouterr().err == "hicra-x: f.jsonl: row 2: field 'answer': missing; more detail\n"


def test_debug_keeps_the_traceback_and_a_bug_is_not_swallowed():
    with pytest.raises(BadInputError), user_errors_in_one_line("hicra-x", debug=True):
        raise BadInputError("bad row")
    # a plain ValueError / FileNotFoundError is a bug (or not known to be the user's): it passes through
    for bug in (ValueError("internal"), FileNotFoundError("internal"), KeyError("k")):
        with pytest.raises(type(bug)), user_errors_in_one_line("hicra-x"):
            raise bug


def test_user_errors_are_still_the_builtin_types_callers_catch():
    from hicra_rl.config import ConfigError
    from hicra_rl.data.datasets import BadRowError
    from hicra_rl.data.prompts import PromptTooLongError
    from hicra_rl.errors import InputExistsError, InputNotFoundError
    from hicra_rl.strategic.lexicon import LexiconError
    from hicra_rl.strategic.mine import CorpusError

    for cls in (ConfigError, LexiconError, CorpusError, PromptTooLongError, BadRowError, BadInputError):
        assert issubclass(cls, UserInputError) and issubclass(cls, ValueError)
    assert issubclass(InputNotFoundError, FileNotFoundError) and issubclass(InputExistsError, FileExistsError)
    assert one_line(ValueError("a\n\n  b ")) == "a; b"


# ---------------------------------------------------------------- the console scripts


def run_cli(prog: str, *args: str, cwd: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", **env_extra)
    return subprocess.run([str(BIN / prog), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def assert_one_line(out: subprocess.CompletedProcess, prog: str, *names: str) -> None:
    """Exit 2, no traceback, the last stderr line ``<prog>: ...`` naming every one of ``names``, and
    nothing started after the inputs were read (no Ray, no "data: N training prompts" line)."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "HYDRA_FULL_ERROR" not in out.stderr
    assert lines and lines[-1].startswith(f"{prog}: "), out.stderr[-3000:]
    for name in names:
        assert name in lines[-1], (name, lines[-1])
    assert "Ray" not in out.stdout + out.stderr and "training prompts" not in out.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Bad and good inputs: a folder that passes the model-folder check (nothing loads it: every failure
    comes first), a missing / an empty model folder, data files, a lexicon, a corpus, run directories."""
    root = tmp_path_factory.mktemp("cli-inputs")
    model = root / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (model / name).write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    (root / "empty-model").mkdir()
    (root / "rows.jsonl").write_text(GOOD_ROW + '\n{"problem": "What is 2+2?"}\n')
    (root / "lex.json").write_text('{"entries": [')
    (root / "corpus.jsonl").write_text('{"answer": "first find the total"}\n{"answer": }\n')
    (root / "good-corpus.jsonl").write_text('{"answer": "first find the total"}\n')
    (root / "exists").mkdir()
    run = root / "runs" / "grpo-s1"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algorithm": {"name": "grpo"}, "trainer": {"seed": 1}}))
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "rew\n{"step": 3}\n')
    return {"root": root, "model": model, "empty_model": root / "empty-model", "rows": root / "rows.jsonl",
            "lex": root / "lex.json", "corpus": root / "corpus.jsonl", "good_corpus": root / "good-corpus.jsonl",
            "exists": root / "exists", "run": run}


TRAIN = ["model.path={model}", "trainer.run_dir={root}/train-run"]
CASES = {  # id: (program, arguments, what the line must name)
    # hicra-train: config, data file, data row, model directory, lexicon
    "train-config": ("hicra-train", [*TRAIN, "rollout.top_p=1.5"], ["config error at 'rollout.top_p'"]),
    "train-data-file": ("hicra-train", [*TRAIN, "data.source=jsonl", "data.path={root}/nope.jsonl"],
                        ["{root}/nope.jsonl does not exist"]),
    "train-data-row": ("hicra-train", [*TRAIN, "data.source=jsonl", "data.path={rows}"],
                       ["{rows}: row 2: field 'answer': missing"]),
    "train-model-dir": ("hicra-train", ["model.path={empty_model}", "trainer.run_dir={root}/train-run"],
                        ["{empty_model}", "is not a Hugging Face model folder: it lacks config.json"]),
    "train-init-checkpoint": ("hicra-train", [*TRAIN, "trainer.init_checkpoint={root}/no-ckpt"],
                              ["model path '{root}/no-ckpt' is not an existing directory"]),
    "train-lexicon": ("hicra-train", [*TRAIN, "strategic.lexicon={lex}"],
                      ["{lex}: invalid JSON at line 1, column 14"]),
    # hicra-sft: config, data row, model directory, output folder
    "sft-config": ("hicra-sft", ["out_dir={root}/sft-out", "micro_batch_size=3"], ["config error at 'micro_batch_size'"]),
    "sft-data-row": ("hicra-sft", ["model.path={model}", "out_dir={root}/sft-out", "data.source=jsonl",
                                   "data.path={rows}"], ["{rows}: row 2: field 'answer': missing"]),
    "sft-model-dir": ("hicra-sft", ["model.path={root}/no-model", "out_dir={root}/sft-out"],
                      ["model path '{root}/no-model' is not an existing directory"]),
    "sft-out-exists": ("hicra-sft", ["model.path={model}", "out_dir={exists}"],
                       ["{exists} exists; set overwrite=true"]),
    # hicra-eval: config, data file, model directory
    "eval-config": ("hicra-eval", ["out_dir={root}/eval-out", "k=0"], ["config error at 'k'"]),
    "eval-data-file": ("hicra-eval", ["model.path={model}", "out_dir={root}/eval-out", "data.source=jsonl",
                                      "data.path={root}/nope.jsonl"], ["{root}/nope.jsonl does not exist"]),
    "eval-model-dir": ("hicra-eval", ["model.path={root}/no-model", "out_dir={root}/eval-out"],
                       ["model path '{root}/no-model' is not an existing directory"]),
    # hicra-sg: corpus file and line, lexicon, model path, option
    "sg-corpus-file": ("hicra-sg", ["mine", "--corpus", "{root}/nope.jsonl", "--out", "{root}/x.json"],
                       ["{root}/nope.jsonl: corpus file not found"]),
    "sg-corpus-line": ("hicra-sg", ["mine", "--corpus", "{corpus}", "--out", "{root}/x.json"],
                       ["{corpus}:2: invalid JSON"]),
    "sg-lexicon": ("hicra-sg", ["show", "{lex}"], ["{lex}: invalid JSON at line 1, column 14"]),
    "sg-model": ("hicra-sg", ["mine", "--corpus", "{good_corpus}", "--out", "{root}/x.json", "--model",
                              "{root}/no-encoder"], ["model path '{root}/no-encoder' is not an existing directory"]),
    "sg-option": ("hicra-sg", ["mine", "--corpus", "{good_corpus}", "--out", "{root}/x.json",
                               "--top-frac", "2"], ["top_frac must be in (0, 1], got 2.0"]),
    # hicra-report: run directory, metrics line
    "report-run-dir": ("hicra-report", ["{root}/no-runs", "--no-figures"], ["{root}/no-runs: no such directory"]),
    "report-metrics-line": ("hicra-report", ["{run}", "--no-figures", "--out", "{root}/report"],
                            ["{run}/metrics.jsonl: line 2 is not valid JSON"]),
}


def _fill(texts: list[str], inputs: dict[str, Path]) -> list[str]:
    return [t.format_map({k: str(v) for k, v in inputs.items()}) for t in texts]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_it(case, inputs):
    prog, args, names = CASES[case]
    out = run_cli(prog, *_fill(args, inputs), cwd=inputs["root"])
    assert_one_line(out, prog, *_fill(names, inputs))


def test_hydra_full_error_still_shows_the_traceback(inputs):
    args = _fill([*TRAIN, "data.source=jsonl", "data.path={rows}"], inputs)
    out = run_cli("hicra-train", *args, cwd=inputs["root"], HYDRA_FULL_ERROR="1")
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "BadRowError" in out.stderr and "row 2: field 'answer'" in out.stderr


@pytest.mark.parametrize("prog, args, error", [
    ("hicra-sg", ["--debug", "show", "{lex}"], "LexiconError"),
    ("hicra-report", ["--debug", "{root}/no-runs", "--no-figures"], "InputNotFoundError"),
])
def test_debug_flag_still_shows_the_traceback(inputs, prog, args, error):
    out = run_cli(prog, *_fill(args, inputs), cwd=inputs["root"])
    assert out.returncode != 0
    assert "Traceback" in out.stderr and error in out.stderr
