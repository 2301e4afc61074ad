"""Run-directory sinks for metrics: JSONL (appended, flushed each step), wandb (offline by default)."""
from __future__ import annotations

import json
import math
import os
from typing import Any

from hicra_rl.iofiles import write_text_atomic


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsSink:
    """Appends one JSON object per step to ``<run_dir>/metrics.jsonl`` and mirrors it to wandb.

    On resume the JSONL keeps the lines of steps <= the resumed step and drops later ones (they
    belonged to the interrupted run and will be recomputed), so the file never holds a step twice.
    """

    def __init__(self, run_dir: str, *, use_wandb: bool, wandb_mode: str, project: str,
                 run_name: str | None, config: dict, resume_step: int = 0):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._wandb = None
        if use_wandb:
            os.environ.setdefault("WANDB_MODE", wandb_mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(
                project=project, name=run_name, dir=run_dir, config=config, mode=wandb_mode,
                resume="allow", id=_stable_wandb_id(run_dir),
            )

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of a killed run
                if row.get("step", 0) <= step:
                    kept.append(json.dumps(row))
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _stable_wandb_id(run_dir: str) -> str:
    import hashlib

    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:12]


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
