"""Docs that tell the truth (issue 22, item 5): every ``hicra-train`` / ``hicra-sft`` / ``hicra-eval`` / ``hicra-rm`` command
line (also ``python -m hicra_rl.train``, ``make run ARGS=...``, ``launch/submit.sh ...`` and compose's
``HICRA_OVERRIDES="..."``) and every Hydra override shown in README.md, docs/*.md, launch/README.md,
benchmarks/README.md and the comments of conf/**/*.yaml is resolved here, in process, as the entry point would:
Hydra's compose API on conf/ (the command's overrides, after the shell's quoting and ``$VAR`` expansion), then
the project's typed schema and validator (``typed_config``, what ``hydra_entry`` runs before any work starts).

A failure names the file and line of the command. Where a doc shows something that is not meant to resolve as
written, the reason is written down here: ``NOT_HYDRA_OVERRIDES`` (text with ``=`` that is no Hydra override),
``SHOWN_AS_REFUSED`` (shown as what does not work: checked to fail), the ``| input tried |`` tables of
docs/bad-input.md (bad on purpose), ``TEXT_PLACEHOLDERS`` / ``PLACEHOLDERS`` (``<name>``, ``DIR``, ``N``, ...: the
value the test gives them). Paths that the validators require to exist (``trainer.resume=DIR``,
``strategic.lexicon=FILE``: the user's own, made by an earlier step of the doc) are replaced by a temporary
directory / lexicon file, see ``USER_PATHS``. A multirun (``-m a=x,y b=1,2``) resolves every value of every
swept key at least once. Run time: 45-65 s on the 2-core machine beside a training run (~0.3 s a compose).
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from hicra_rl.config import (
    CONF_DIR,
    SHIPPED_LEXICONS,
    ConfigError,
    TrainConfig,
    register_configs,
    store_entry_schema,
    typed_config,
)
from hicra_rl.config import validate as validate_train
from hicra_rl.evaluation import EvalConfig, validate_eval
from hicra_rl.rm import RMPairsConfig, RMTrainConfig, validate_rm, validate_rm_pairs
from hicra_rl.sft import SFTConfig, validate_sft

REPO = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR)
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "launch" / "README.md",
             REPO / "benchmarks" / "README.md"]
YAML_FILES = sorted(CONF.rglob("*.yaml"))

# Hydra config name (conf/<name>.yaml) -> (typed schema, validator), as hicra-train / -eval / -sft run them
ENTRIES = {"config": (TrainConfig, validate_train), "eval": (EvalConfig, validate_eval),
           "sft": (SFTConfig, validate_sft), "rm": (RMTrainConfig, validate_rm),
           "rm_pairs": (RMPairsConfig, validate_rm_pairs)}
PROGRAMS = {"hicra-train": "config", "hicra-sft": "sft", "hicra-eval": "eval", "hicra-rm train": "rm",
            "hicra-rm pairs": "rm_pairs"}
# the shell variables the docs use, with the values a user following them would have
SHELL_VARS = {"HOME": os.environ.get("HOME", "/home/user"), "HICRA_DATA_ROOT": "/shared/data"}
# `make run`'s own command (Makefile): hicra-train trainer.init_checkpoint=$(COLD_START) $(ARGS)
MAKE_RUN_COLD_START = "$HOME/.cache/hicra-rl/cold_start/smollm2_135m-arith-v2"

# text in backticks that has the shape of an override but is not one (a function's argument, a metric key ...)
NOT_HYDRA_OVERRIDES = {
    "role=None": "an argument of hicra_rl.data.setup.load_prompts (docs/data.md)",
    "exclude=": "an argument of load_prompts (docs/data.md)",
    "n=2": "hicra-report's label for the number of seeds (docs/report.md)",
    "x=5": "a MATH-500 answer (benchmarks/README.md)",
    "dynamic=True": "an argument of torch.compile (benchmarks/README.md)",
    'logprobs_mode="processed_logprobs"': "vLLM's sampling argument (docs/metrics.md)",
    "timeout_s=10": "the default of hicra_rl.rewards.math.verify's argument (docs/bad-input.md)",
    "weights_only=True": "torch.load's argument (docs/bad-input.md)",
    '_node_ip_address="127.0.0.1"': "ray.init's argument (docs/bad-input.md)",
    "include_dashboard=False": "ray.init's argument (docs/bad-input.md, launch/README.md)",
}
# placeholders the docs write for a value of the user's (the value given here is a valid one of its kind)
# (``<...>`` ones replaced in the text: the shell would read them as redirections)
TEXT_PLACEHOLDERS = {"+paper=<name>": "+paper=qwen3_4b_base", "+eval_data=<name>": "+eval_data=arith_test",
                     "+experiment=<name>": "+experiment=compare_cpu", "model=<preset>": "model=qwen3_4b_base",
                     "data=<difficulty>": "data=strat_hard", "=<HF model dir>": "=DIR"}
PLACEHOLDERS = {"N": "2048", "C": "2.0"}
DIR_PLACEHOLDERS = ("DIR",)
# shown in the docs as what does NOT work, on a line that says so (checked to fail, so the doc stays true)
SHOWN_AS_REFUSED = {
    "eval_data=null": "docs/operations.md: Hydra refuses null for a config group",
    "~eval_data": "docs/operations.md: cannot delete a preset's eval_data block",
}
REFUSAL_WORDS = re.compile(r"refuse|cannot|does not|doesn't|not work", re.I)  # ... on the span's line
# keys whose validator requires an existing path: a doc's example path (the user's own, made by an earlier
# command of the doc) is replaced by a temporary one of the right kind
USER_PATHS = {"trainer.resume": "dir", "strategic.lexicon": "file", "reward.model": "dir", "train_pairs": "file",
              "eval_pairs": "file"}
KEYWORD_VALUES = {"trainer.resume": ("auto", "never"), "strategic.lexicon": ("auto", *SHIPPED_LEXICONS),
                  "reward.model": (), "train_pairs": (), "eval_pairs": ()}

_KEY = r"[a-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*(?:@[A-Za-z0-9_.]+)?"
OVERRIDE = re.compile(rf"^(?:~{_KEY}(?:=.*)?|(?:\+\+|\+)?{_KEY}=.*)$", re.S)
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}
FLAGS = {"--resolve", "-m", "--multirun", "--info"}
# what stands for "the rest of the overrides" ($HICRA_OVERRIDES: compose's variable holding them, checked
# where the doc sets it)
ELISIONS = {"...", "…", "[overrides]", "<overrides>", "$HICRA_OVERRIDES"}


@dataclass
class DocCommand:
    file: str
    line: int
    text: str                      # as written in the doc
    entry: str | None              # "config" | "eval" | "sft"; None: bare overrides (any entry point)
    words: list[str]               # shell words after the program, unexpanded
    multirun: bool = False
    problems: list[str] = field(default_factory=list)  # found while extracting (an unset variable, ...)
    context: str = ""              # the doc's line around a bare override (is it shown as refused?)

    def where(self) -> str:
        return f"{self.file}:{self.line}"


# ------------------------------------------------------------------------------------------ shell words
def shell_words(text: str):
    """Yield ``(raw_word, start, end)`` of ``text`` split as a POSIX shell would split it (quotes kept in the
    raw word; ``\\`` + newline is a continuation); stop at a comment or a control operator."""
    i, n = 0, len(text)
    while i < n:
        while i < n and (text[i] in " \t\n" or text.startswith("\\\n", i)):
            i += 2 if text.startswith("\\\n", i) else 1
        if i >= n or text[i] in "#;&|<>":
            return
        start, quote = i, None
        while i < n:
            ch = text[i]
            if quote:
                if ch == quote:
                    quote = None
                elif ch == "\\" and quote == '"' and i + 1 < n:
                    i += 1
                i += 1
                continue
            if ch in "'\"":
                quote = ch
            elif ch == "\\" and i + 1 < n and text[i + 1] != "\n":
                i += 1
            elif ch in " \t\n;&|<>" or text.startswith("\\\n", i):
                break
            i += 1
        if quote:  # an unbalanced quote (prose, an apostrophe): no shell word
            return
        yield text[start:i], start, i


def unquote(raw: str, expand: bool = False) -> str:
    """The word after quote removal; with ``expand``, ``$VAR`` / ``${VAR}`` outside single quotes replaced
    from ``SHELL_VARS`` (an unknown or malformed one raises ``ValueError``)."""
    out, i, quote = [], 0, None
    while i < len(raw):
        ch = raw[i]
        if quote == "'":
            if ch == "'":
                quote = None
            else:
                out.append(ch)
        elif ch in "'\"" and (quote is None or quote == ch):
            quote = None if quote else ch
        elif ch == "\\" and i + 1 < len(raw):
            i += 1
            out.append(raw[i])
        elif ch == "$" and expand:
            m = re.match(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))", raw[i:])
            if not m:
                out.append(ch)
            else:
                name = m.group(1) if m.group(1) is not None else m.group(2)
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise ValueError(f"the shell fails on ${{{name}}} (bad substitution): quote the word with '...'")
                if name not in SHELL_VARS:
                    raise ValueError(f"${name} is not a variable the docs set (known: {', '.join(SHELL_VARS)})")
                out.append(SHELL_VARS[name])
                i += len(m.group(0))
                continue
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def is_override(word: str) -> bool:
    return bool(OVERRIDE.match(unquote(word)))


# ------------------------------------------------------------------------------------------ extraction
def _line_of(offsets: list[int], pos: int) -> int:
    """1-based line of character ``pos`` given the start offsets of the lines."""
    lo, hi = 0, len(offsets) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if offsets[mid] <= pos:
            lo = mid
        else:
            hi = mid - 1
    return lo + 1


PROGRAM_RE = re.compile(r"(?:(?<=^)|(?<=[\s(`/]))(hicra-train|hicra-sft|hicra-eval|hicra-rm train|hicra-rm pairs|"
                        r"python -m hicra_rl\.train|"
                        r"make run|launch/submit\.sh|HICRA_OVERRIDES=)(?=[\s`\"]|$)", re.M)


def commands_in(text: str, file: str, line_of, strict: bool) -> list[DocCommand]:
    """The commands in ``text`` (a code line, a backtick span or a comment block).  ``strict``: every word
    after the program must be an override, a flag or an elision (code); else the command ends at the first
    word that is not (prose)."""
    found = []
    text = _fill_placeholders(text)
    for m in PROGRAM_RE.finditer(text):
        prog, rest_at = m.group(1), m.end()
        cmd = DocCommand(file, line_of(m.start()), "", None, [])
        words = list(shell_words(text[rest_at:]))
        end = rest_at
        if prog == "HICRA_OVERRIDES=":
            value, _, _ = next(iter(shell_words(text[rest_at:])), ("", 0, 0))
            cmd.entry, cmd.text = "config", text[m.start():rest_at + len(value)]
            inner = unquote(value)
            cmd.words = [w for w, _, _ in shell_words(inner)]
            found.append(cmd)
            continue
        entry = PROGRAMS.get(prog, "config")
        if prog == "make run":
            make_words = []
            for w, _s, e in words:
                if not re.match(r"^[A-Z_]+=", unquote(w)):
                    break
                make_words.append(unquote(w))
                end = rest_at + e
            cold, args = MAKE_RUN_COLD_START, []
            for w in make_words:
                name, _, value = w.partition("=")
                if name == "COLD_START":
                    cold = value
                elif name == "ARGS":
                    args = [x for x, _, _ in shell_words(value)]
                else:
                    cmd.problems.append(f"make run has no variable {name}")
            cmd.words = [f"trainer.init_checkpoint={cold}", *args]
            cmd.entry, cmd.text = "config", text[m.start():end]
            found.append(cmd)
            continue
        if prog == "launch/submit.sh":  # its own options, then (after an optional --) the overrides
            k = 0
            while k < len(words):
                w = unquote(words[k][0])
                if w in ("--no-wait", "-h", "--help") or w.startswith("--address="):
                    k += 1
                elif w in ("--address", "--submission-id"):
                    k += 2
                elif w == "--":
                    k += 1
                    break
                else:
                    break
            if k:
                end = rest_at + words[min(k, len(words)) - 1][2]
            words = words[k:]
        taken = []
        for w, s, e in words:
            u = unquote(w)
            trimmed = w
            if not strict:  # prose: a sentence's punctuation after the last override is not part of it
                trimmed = re.sub(r"[),;:.]+$", "", w) if re.search(r"[),;:.]$", w) and (
                    w.count(")") > w.count("(") or w[-1] in ",;:.") else w
                u = unquote(trimmed)
            if u in FLAGS or u in FLAGS_WITH_VALUE or (taken and unquote(taken[-1]) in FLAGS_WITH_VALUE):
                taken.append(trimmed)
            elif is_override(trimmed):
                taken.append(trimmed)
            elif u in ELISIONS or u.startswith("..."):
                end = rest_at + e
                break
            else:
                if strict:
                    cmd.problems.append(f"{u!r} is not a Hydra override")
                break
            end = rest_at + s + len(trimmed)
            if trimmed != w:
                break
        cmd.entry, cmd.words = entry, taken
        cmd.multirun = any(unquote(w) in ("-m", "--multirun") for w in taken)
        cmd.text = " ".join(text[m.start():end].replace("\\\n", " ").split())
        found.append(cmd)
    return found


def _fill_placeholders(text: str) -> str:
    """``<name>``-style placeholders (which the shell would read as redirections) replaced by their value."""
    for ph, value in TEXT_PLACEHOLDERS.items():
        text = text.replace(ph, value)
    return text


def _bare_overrides(span: str, file: str, line: int, context: str = "") -> list[DocCommand]:
    """A backtick span made of overrides only (``algorithm=grpo``, ``learner.num_ranks=2
    learner.zero_stage=3``); documentation's ``a|b|c`` alternatives give one command each."""
    text = _fill_placeholders(span.replace("\\|", "\0").replace("|", "\0"))  # `a|b`: alternatives, no pipe
    words = [w for w, _, _ in shell_words(text)]
    if not words or not all(is_override(w) for w in words) or " ".join(words) != " ".join(text.split()):
        return []
    if span in NOT_HYDRA_OVERRIDES:
        return []
    alternatives = [unquote(w).split("=", 1) for w in words]
    choices = [[f"{k}={v}" for v in val.split("\0")] if "=" in unquote(w) else [w]
               for w, (k, *rest) in zip(words, alternatives) for val in [rest[0] if rest else ""]]
    return [DocCommand(file, line, span, None, list(combo), context=context) for combo in itertools.product(*choices)]


SPAN_RE = re.compile(r"(?<!`)`([^`]+?)`(?!`)", re.S)


def _bad_on_purpose(lines: list[str], idx: int, span: str) -> bool:
    """``span`` is in the first cell of row ``idx`` of a table whose first header cell is "input tried" or
    "answer tried" (docs/bad-input.md: bad input on purpose, shown with the error it gives)."""
    row = lines[idx].strip()
    if not row.startswith("|"):
        return False
    j = idx
    while j > 0 and lines[j - 1].lstrip().startswith("|"):
        j -= 1
    first_cell = re.split(r"(?<!\\)\|", row[1:], maxsplit=1)[0]
    return bool(re.match(r"\|\s*(input|answer) tried\s*\|", lines[j].strip())) and f"`{span}`" in first_cell


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def extract_markdown(path: Path) -> list[DocCommand]:
    rel = _rel(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    offsets = list(itertools.accumulate([0] + [len(x) + 1 for x in lines[:-1]]))
    out: list[DocCommand] = []
    prose = list(text)
    in_fence, block = False, []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            if in_fence:  # a code block: logical lines (continuations joined), a shell prompt dropped
                out += _code_block(block, rel)
                block = []
            in_fence = not in_fence
            for k in range(offsets[i], offsets[i] + len(line)):
                prose[k] = " "
            continue
        if in_fence:
            block.append((i + 1, line))
            for k in range(offsets[i], offsets[i] + len(line)):
                prose[k] = " "
    prose_text = "".join(prose)
    for m in SPAN_RE.finditer(prose_text):
        span, line = m.group(1), _line_of(offsets, m.start())
        if _bad_on_purpose(lines, line - 1, span):
            continue
        span_text = span.replace("\\|", "|") if lines[line - 1].lstrip().startswith("|") else span
        cmds = commands_in(span_text, rel, lambda p, ln=line, s=span_text: ln + s[:p].count("\n"), strict=True)
        out += cmds if cmds else _bare_overrides(span, rel, line, lines[line - 1])
    return out


def _code_block(block: list[tuple[int, str]], rel: str) -> list[DocCommand]:
    out, k = [], 0
    while k < len(block):
        first, logical = block[k][0], block[k][1]
        while logical.rstrip().endswith("\\") and k + 1 < len(block):
            k += 1
            logical = logical.rstrip()[:-1] + " " + block[k][1]
        k += 1
        logical = re.sub(r"^\s*[\w.-]*\$ ", "", logical)  # "$ cmd", "node0$ cmd"
        out += commands_in(logical, rel, lambda p, ln=first: ln, strict=True)
    return out


def extract_yaml_comments(path: Path) -> list[DocCommand]:
    """Comment blocks of a YAML file: consecutive comment lines joined (a command may continue on the next
    comment line, with or without ``\\``); backtick spans resolved as in Markdown, the rest as prose."""
    rel = _rel(path)
    out: list[DocCommand] = []
    blocks: list[list[tuple[int, str]]] = []
    prev = -2
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        m = re.search(r"(?:^|\s)#(?: |$)(.*)$", line)
        if not m:
            continue
        if n != prev + 1 or line.lstrip()[:1] != "#":
            blocks.append([])
        blocks[-1].append((n, m.group(1)))
        prev = n
    for block in blocks:
        text = "\n".join(t for _, t in block)
        starts = list(itertools.accumulate([0] + [len(t) + 1 for _, t in block[:-1]]))

        def line_of(pos, block=block, starts=starts):
            return block[_line_of(starts, pos) - 1][0]

        spans = list(SPAN_RE.finditer(text))
        for m in spans:
            at = m.start(1)
            cmds = commands_in(m.group(1), rel, lambda p, at=at: line_of(at + p), strict=True)
            out += cmds if cmds else _bare_overrides(m.group(1), rel, line_of(m.start()), text)
        blanked = SPAN_RE.sub(lambda m: " " * len(m.group(0)), text)
        out += commands_in(blanked, rel, line_of, strict=False)
    return out


@cache
def all_doc_commands() -> tuple[DocCommand, ...]:
    cmds = [c for p in DOC_FILES for c in extract_markdown(p)] + [c for p in YAML_FILES
                                                                    for c in extract_yaml_comments(p)]
    return tuple(cmds)


# ------------------------------------------------------------------------------------------ resolution
def _user_path(kind: str, tmp: Path) -> str:
    if kind == "dir":
        d = tmp / "user-checkpoint"
        d.mkdir(exist_ok=True)
        return str(d)
    f = tmp / "user-lexicon.json"
    if not f.exists():
        shutil.copy(CONF.parent / "hicra_rl" / "resources" / "arith_lexicon.json", f)
    return str(f)


def overrides_of(cmd: DocCommand, tmp: Path) -> tuple[list[str], bool]:
    """Hydra overrides of ``cmd`` (shell-expanded, placeholders filled, flags dropped) and whether it is a
    multirun."""
    out, skip_next = [], False
    for raw in cmd.words:
        if skip_next:
            skip_next = False
            continue
        w = unquote(raw, expand=True)
        if w in FLAGS_WITH_VALUE:
            skip_next = True
            continue
        if w in FLAGS:
            continue
        key, eq, value = w.partition("=")
        bare_key = key.lstrip("+~")
        if eq and value in PLACEHOLDERS:
            value = PLACEHOLDERS[value]
        if eq and value in DIR_PLACEHOLDERS:
            value = _user_path("dir", tmp)
        if eq and bare_key in USER_PATHS and value not in KEYWORD_VALUES[bare_key] and not os.path.exists(value):
            value = _user_path(USER_PATHS[bare_key], tmp)
        out.append(f"{key}{eq}{value}" if eq else key)
    return out, cmd.multirun


def sweep_combinations(overrides: list[str]) -> list[list[str]]:
    """A multirun's jobs, each value of each swept key at least once (the others at their first value)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    lists = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
             else [o.input_line] for o in parsed]
    jobs = [[vals[0] for vals in lists]]
    for i, vals in enumerate(lists):
        for v in vals[1:]:
            job = [x[0] for x in lists]
            job[i] = v
            jobs.append(job)
    return jobs


def _one_line(err: BaseException) -> str:
    msg = f"{type(err).__name__}: {err}"
    if err.__cause__ is not None:
        msg += f" ({type(err.__cause__).__name__}: {err.__cause__})"
    return "; ".join(x.strip() for x in msg.splitlines() if x.strip())[:400]


@cache
def resolve(entry: str, overrides: tuple[str, ...]):
    """Compose ``conf/<entry>.yaml`` with ``overrides`` and run the typed schema + validator; returns the
    typed config or raises."""
    schema, validate_fn = ENTRIES[entry]
    return typed_config(schema, compose(config_name=entry, overrides=list(overrides)), validate_fn)


def check(cmd: DocCommand, tmp: Path) -> list[str]:
    """The errors of ``cmd`` (empty: it resolves)."""
    if cmd.problems:
        return cmd.problems
    try:
        overrides, multirun = overrides_of(cmd, tmp)
        jobs = sweep_combinations(overrides) if multirun else [overrides]
    except Exception as err:  # noqa: BLE001 - reported with the command
        return [_one_line(err)]
    errors = []
    for job in jobs:
        # a bare override resolves under any entry point; one shown as refused is hicra-train's (hicra-rm pairs
        # takes `~eval_data`: its eval_data group has the schema's defaults beneath)
        entries = [cmd.entry] if cmd.entry else ["config"] if cmd.text in SHOWN_AS_REFUSED else list(ENTRIES)
        tried = []
        for entry in entries:
            try:
                resolve(entry, tuple(job))
                tried = []
                break
            except Exception as err:  # noqa: BLE001 - every failure is reported with the command
                tried.append(f"{'hicra-' + {'config': 'train'}.get(entry, entry)} {' '.join(job)}: {_one_line(err)}")
        errors += tried
    if cmd.entry is None and cmd.text in SHOWN_AS_REFUSED and REFUSAL_WORDS.search(cmd.context):
        return [] if errors else [f"shown as refused ({SHOWN_AS_REFUSED[cmd.text]}), but it resolves"]
    return errors


@pytest.fixture(scope="module")
def hydra_conf():
    register_configs()
    for name, (schema, _) in ENTRIES.items():
        store_entry_schema(name, schema)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        yield


# ------------------------------------------------------------------------------------------ the tests
def test_every_documented_command_and_override_resolves(hydra_conf, tmp_path):
    cmds = all_doc_commands()
    failures = []
    for cmd in cmds:
        errs = check(cmd, tmp_path)
        if errs:
            failures.append(f"{cmd.where()}: `{cmd.text}`\n    " + "\n    ".join(errs))
    assert not failures, f"{len(failures)} of {len(cmds)} documented commands do not resolve:\n" + "\n".join(failures)


def test_the_extraction_finds_the_docs_commands():
    """A guard against an extractor that silently finds nothing: the count, and commands of every kind."""
    cmds = all_doc_commands()
    assert len(cmds) >= 150, len(cmds)
    texts = {(c.file, c.text) for c in cmds}
    assert ("README.md", "hicra-train -m +experiment=learning_curve trainer.seed=0,1,2") in texts
    entries = {c.entry for c in cmds}
    assert {"config", "eval", "sft", None} <= entries
    files = {c.file for c in cmds}
    assert {"README.md", "docs/operations.md", "launch/README.md", "benchmarks/README.md",
            "conf/experiment/adaptive_cpu.yaml", "conf/eval_data/arith_test.yaml"} <= files
    assert any(c.text.startswith("make run ARGS=") for c in cmds)
    assert any(c.text.startswith("launch/submit.sh") and c.words for c in cmds)
    assert any(c.multirun for c in cmds)
    # the allow-lists hold only what the docs still show
    docs = "".join(p.read_text(encoding="utf-8") for p in DOC_FILES + YAML_FILES)
    stale = [k for k in (*NOT_HYDRA_OVERRIDES, *SHOWN_AS_REFUSED) if f"`{k}`" not in docs]
    assert not stale, f"allow-list entries no doc shows any more: {stale}"


def test_extractor_on_examples(tmp_path):
    md = ("Run `hicra-eval model.path=$HOME/m\n  data.size=8` then\n\n```bash\n$ hicra-train -m a.b=1,2 \\\n"
          "    'c.d=${x.y}'   # a comment\nhicra-train: an error message\nmake run ARGS=\"e.f=3 g=4\"\n```\n"
          "| input tried | x |\n| --- | --- |\n| `rollout.group_size=1` | `k=8` |\n"
          "Also `trainer.resume=auto|never|DIR`, `n=2`, `strategy/share=<name>` and `role=None`.\n")
    (tmp_path / "example.md").write_text(md)
    cmds = extract_markdown(tmp_path / "example.md")
    got = [(c.line, c.entry, c.words, c.multirun) for c in cmds]
    assert got == [
        (5, "config", ["-m", "a.b=1,2", "'c.d=${x.y}'"], True),
        (8, "config", [f"trainer.init_checkpoint={MAKE_RUN_COLD_START}", "e.f=3", "g=4"], False),
        (1, "eval", ["model.path=$HOME/m", "data.size=8"], False),
        (12, None, ["k=8"], False),
        (13, None, ["trainer.resume=auto"], False), (13, None, ["trainer.resume=never"], False),
        (13, None, ["trainer.resume=DIR"], False),
    ]
    assert unquote("'c.d=${x.y}'", expand=True) == "c.d=${x.y}"
    assert unquote("model.path=$HOME/m", expand=True) == f"model.path={SHELL_VARS['HOME']}/m"
    with pytest.raises(ValueError, match="bad substitution"):
        unquote("c.d=${x.y}", expand=True)
    with pytest.raises(ValueError, match="not a variable"):
        unquote("c.d=$NOPE", expand=True)
    assert sweep_combinations(["a=1,2", "b=x,y,z", "c=3"]) == [
        ["a=1", "b=x", "c=3"], ["a=2", "b=x", "c=3"], ["a=1", "b=y", "c=3"], ["a=1", "b=z", "c=3"]]


def test_operations_md_lists_every_option_of_every_config_group():
    """docs/operations.md's table of config groups names every option in conf/<group>/ (nothing missing, as
    hicra_adaptive, eval_data and experiment once were)."""
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]*) \|", text, re.M)}
    groups = sorted(p.name for p in CONF.iterdir() if p.is_dir())
    missing = [f"{g}: {o}" for g in groups for o in sorted(p.stem for p in (CONF / g).glob("*.yaml"))
               if g not in rows or not re.search(rf"(?<![\w.]){re.escape(o)}(?![\w.])", rows[g])]
    assert not missing, f"docs/operations.md's config-group table lacks {missing}"


def test_file_based_data_presets_read_hicra_data_root(hydra_conf, tmp_path, monkeypatch):
    """launch/README.md: every preset that reads a file finds it under $HICRA_DATA_ROOT (math500 once pinned
    ../shared/data, relative to the working directory)."""
    import yaml

    from hicra_rl.data.datasets import builtin_spec
    from hicra_rl.data.setup import BUILTINS, data_split

    monkeypatch.setenv("HICRA_DATA_ROOT", str(tmp_path))

    def reads_files(p: Path) -> bool:  # procedural (reasoning-gym) groups read no file: not composed (time)
        return (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("source") in BUILTINS

    cases = [(f"data={p.stem}", "data") for p in sorted((CONF / "data").glob("*.yaml")) if reads_files(p)]
    cases += [(f"+eval_data={p.stem}", "eval_data") for p in sorted((CONF / "eval_data").glob("*.yaml"))
              if reads_files(p)]
    cases += [(f"+paper={p.stem}", "eval_data") for p in sorted((CONF / "paper").glob("*.yaml"))]
    checked = []
    for override, key in cases:
        cfg = typed_config(TrainConfig, compose(config_name="config", overrides=[override]), lambda c: None)
        d = getattr(cfg, key)
        if d.source not in BUILTINS:
            continue
        path = builtin_spec(BUILTINS[d.source] or f"gsm8k_{data_split(d)}", path=d.path).path if d.path is None \
            else d.path
        assert Path(path).is_relative_to(tmp_path), (override, key, path)
        checked.append(override)
    assert {"data=gsm8k", "data=math500", "data=dapo_math_17k", "data=deepscaler", "+eval_data=math500",
            "+eval_data=gsm8k_test", "+paper=math_8gpu"} <= set(checked)


def test_hicra_eval_refuses_a_budget_longer_than_the_models_context(hydra_conf):
    """The Qwen3-4B evaluation docs/operations.md once showed: without model=qwen3_4b_base it resolved to the
    SmolLM2 preset (max_model_len 2048 for 512 + 7168 tokens, float32) and hicra-eval accepted it."""
    doc = ["model.path=/shared/runs/q3b-hicra/checkpoints/step-500/hf", "data=math500", "data.size=500", "k=8",
           "rollout.max_new_tokens=7168", "cluster=single_node_gpu"]
    with pytest.raises(ConfigError, match=r"config error at 'model.max_model_len': 2048 .* data.max_prompt_tokens "
                                          r"\(512\) \+ rollout.max_new_tokens \(7168\)"):
        resolve("eval", tuple(doc))
    cfg = resolve("eval", ("model=qwen3_4b_base", *doc))
    assert (cfg.model.max_model_len, cfg.model.dtype, cfg.data.size) == (8192, "bfloat16", 500)
    with pytest.raises(ConfigError, match="config error at 'model.dtype'"):
        resolve("eval", ("model.dtype=float16",))


def test_hicra_sft_refuses_gsm8k_solutions_without_gsm8k_data(hydra_conf):
    """`hicra-sft solutions=gsm8k` (docs/data.md once) ran on the arithmetic default and failed at the first row
    after loading the tokenizer; now one config line names `solutions` before anything loads."""
    with pytest.raises(ConfigError, match=r"config error at 'solutions': solutions=gsm8k .*\(add data=gsm8k\), got "
                                          r"data 'arith' \(source 'reasoning_gym'\)"):
        resolve("sft", ("solutions=gsm8k",))
    cfg = resolve("sft", ("data=gsm8k", "solutions=gsm8k"))
    assert (cfg.data.source, cfg.data.split, cfg.solutions) == ("gsm8k", "train", "gsm8k")
