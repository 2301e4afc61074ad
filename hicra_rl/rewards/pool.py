"""Time-bounded answer verification: each item gets a hard wall-clock limit in a killable worker process.

math-verify can hang on a pathological answer (``\\boxed{9^{9^{9^{9}}}}`` makes sympy build a tower of
powers; a 100k-character answer makes its LaTeX parser crawl), and its own ``signal.alarm`` timeouts only
work in a main thread.  So verification runs in small persistent worker processes; when an item overruns
``time_limit_s`` its worker is killed (SIGKILL), the item scores reward 0 and is counted as a timeout, a
pre-started spare worker takes over, and the rest of the batch goes on.

Workers are forked from a ``forkserver`` that has imported the verifiers once, so a restart costs ~10 ms
rather than re-importing sympy.  Plain synchronous code: call it from a sync Ray actor or a driver.

Verifiers are looked up by task name in a registry: ``"math"``/``"gsm8k"`` -> math-verify,
``"reasoning_gym:<task>"`` -> reasoning-gym's own scorer.  A verifier is a module-level function
``fn(response, gold, task, mode) -> (score in [0, 1], extracted answer | None)``; it is sent to the worker by
reference (pickled as module + name), so register importable functions only.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_connections
from typing import Any, Self

from hicra_rl.rewards.math import RewardShapingConfig, answers_equivalent, extract_answer, shape_reward

__all__ = [
    "TimeBoundedVerifier",
    "VerifyResult",
    "get_verifier",
    "register_verifier",
    "score_item",
    "verify_math",
    "verify_reasoning_gym",
]

Verifier = Callable[[str, Any, str, str], tuple[float, str | None]]


# ---------------------------------------------------------------- verifiers and their registry


def verify_math(response: str, gold: str, task: str, mode: str) -> tuple[float, str | None]:
    """math-verify equivalence of the extracted final answer with ``gold`` (MATH / GSM8K style)."""
    answer = extract_answer(response, mode)
    if answer is None:
        return 0.0, None
    return (1.0 if answers_equivalent(answer, gold) else 0.0), answer


def verify_reasoning_gym(response: str, gold: Any, task: str, mode: str) -> tuple[float, str | None]:
    """reasoning-gym's ``score_answer`` on the extracted final answer (imported lazily: ~0.5 s)."""
    from hicra_rl.rewards.tasks import verify_task

    return verify_task(response, gold, task, mode)


_VERIFIERS: dict[str, Verifier] = {
    "math": verify_math,
    "gsm8k": verify_math,
    "reasoning_gym": verify_reasoning_gym,
}


def register_verifier(name: str, fn: Verifier) -> None:
    """Register ``fn`` for task ``name`` (or for every ``name:<sub-task>``).  ``fn`` must be a module-level
    function: it is pickled by reference into the worker processes."""
    if ":" in name:
        raise ValueError(f"register a verifier under the part before ':', got {name!r}")
    if getattr(fn, "__qualname__", "").count("<locals>") or getattr(fn, "__name__", "") == "<lambda>":
        raise ValueError(f"verifier {fn!r} is not a module-level function; worker processes cannot import it")
    _VERIFIERS[name] = fn


def get_verifier(task: str) -> Verifier:
    """The verifier of a task name: an exact registry key, or the key before ``:`` (``reasoning_gym:chain_sum``)."""
    key = task if task in _VERIFIERS else task.split(":", 1)[0]
    try:
        return _VERIFIERS[key]
    except KeyError:
        raise KeyError(f"no verifier registered for task {task!r}; registered: {sorted(_VERIFIERS)}") from None


def score_item(response: str, gold: Any, task: str = "math", mode: str = "boxed") -> tuple[float, str | None]:
    """One item scored in this process, with no time bound (tests, debugging)."""
    return get_verifier(task)(response, gold, task, mode)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class VerifyResult:
    reward: float               # shaped reward (== score without shaping)
    correct: bool               # score >= 1
    timed_out: bool
    seconds: float              # wall time spent on the item
    extracted: str | None       # the final answer found in the response
    score: float = 0.0          # verifier's score in [0, 1] (reasoning-gym may give partial credit)
    error: str | None = None    # the verifier raised, or its worker died


# ---------------------------------------------------------------- worker process


def _worker_main(conn, memory_limit_bytes: int | None) -> None:
    """Loop: receive (index, verifier, response, gold, task, mode), send (index, score, extracted, s, error)."""
    if memory_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    try:
        verify_math("\\boxed{\\frac{1}{2}}", "0.5", "math", "boxed")  # warm math-verify's lazy parts
        conn.send("ready")
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return
            if message is None:
                return
            index, fn, response, gold, task, mode = message
            start = time.perf_counter()
            try:
                score, extracted = fn(response, gold, task, mode)
                error = None
            except Exception as exc:  # noqa: BLE001 -- a verifier bug or MemoryError must not take the batch down
                score, extracted, error = 0.0, None, f"{type(exc).__name__}: {exc}"[:500]
            conn.send((index, float(score), extracted, time.perf_counter() - start, error))
    except (KeyboardInterrupt, BrokenPipeError):
        return


@contextlib.contextmanager
def _main_module_hidden():
    """While a worker starts: hide ``__main__``'s file and spec, so that a spawn/forkserver child does not
    re-run the parent's script (the worker needs only importable modules).  A script that calls
    :func:`hicra_rl.rewards.math.verify` at top level, without ``if __name__ == "__main__":``, then works."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class _Worker:
    """One verifier process and the indices of the items sent to it, in order."""

    def __init__(self, ctx, memory_limit_bytes: int | None, import_main: bool = True):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, memory_limit_bytes), daemon=True, name="hicra-verifier"
        )
        with contextlib.nullcontext() if import_main else _main_module_hidden():
            self.process.start()
        child_conn.close()
        self.ready = False
        self.outstanding: deque[int] = deque()
        self.outstanding_chars = 0
        self.current_started = 0.0  # when outstanding[0] began (its predecessor's result arrived)

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        if not self.conn.poll(timeout_s):
            self.kill()
            raise TimeoutError(f"verifier worker did not start within {timeout_s} s")
        message = self.conn.recv()
        if message != "ready":
            raise RuntimeError(f"verifier worker sent {message!r} instead of 'ready'")
        self.ready = True

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=2)
        self.kill()


# ---------------------------------------------------------------- the pool


class TimeBoundedVerifier:
    """Scores (response, gold, task) items with a hard per-item wall-clock limit.

    Args:
        time_limit_s: limit per item; an item over it scores 0, counts in ``timeouts``, its worker is killed.
        num_workers: parallel worker processes.
        answer_mode: extraction mode (see :func:`hicra_rl.rewards.math.extract_answer`).
        shaping: optional DAPO-style reward shaping (needs n_tokens/finished in ``score_batch``).
        memory_limit_mb: address-space limit of each worker (a runaway sympy computation fails with
            MemoryError instead of swapping the machine); None for none.
        start_method: "forkserver" (default: restarts in ~10 ms), "spawn" or "fork".
        spare_worker: keep one started worker in reserve so a timeout costs no start-up.
        max_inflight_items, max_inflight_chars: items are pipelined to a worker (hiding the round trip)
            up to this many items and characters of text (at least one item always goes), so the parent's
            send never blocks on a full pipe while the worker waits to send its results.
        import_main: False: the workers do not re-import the parent's ``__main__`` script (as spawn and
            forkserver children otherwise do), so a caller without an ``if __name__ == "__main__":`` guard
            works (used by :func:`hicra_rl.rewards.math.verify`'s own pool).
    """

    def __init__(
        self,
        time_limit_s: float = 5.0,
        num_workers: int = 1,
        answer_mode: str = "boxed",
        shaping: RewardShapingConfig | None = None,
        memory_limit_mb: int | None = 4096,
        start_method: str = "forkserver",
        spare_worker: bool = True,
        startup_timeout_s: float = 120.0,
        max_inflight_items: int = 4,
        max_inflight_chars: int = 16_000,
        import_main: bool = True,
    ):
        if time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0, got {time_limit_s}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        extract_answer("", answer_mode)  # validates the mode name
        self.time_limit_s = float(time_limit_s)
        self.num_workers = num_workers
        self.answer_mode = answer_mode
        self.shaping = shaping or RewardShapingConfig()
        self.memory_limit_bytes = memory_limit_mb * 2**20 if memory_limit_mb else None
        self.spare_worker = spare_worker
        self.startup_timeout_s = startup_timeout_s
        self.max_inflight_items = max_inflight_items
        self.max_inflight_chars = max_inflight_chars
        self.import_main = import_main
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # imported once in the fork server, inherited by every worker it forks
            self._ctx.set_forkserver_preload(["hicra_rl.rewards.pool", "hicra_rl.rewards.tasks"])
        self._workers: list[_Worker] = []
        self._spare: _Worker | None = None
        self._closed = False
        # counters over the verifier's life
        self.items = 0
        self.timeouts = 0
        self.errors = 0
        self.restarts = 0
        self.busy_seconds = 0.0

    # ---- lifecycle

    def start(self) -> TimeBoundedVerifier:
        """Start the workers now (otherwise the first ``score_batch`` does)."""
        if self._closed:
            raise RuntimeError("TimeBoundedVerifier is closed")
        for worker in [w for w in self._workers if not w.process.is_alive()]:
            self._replace(worker)
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.memory_limit_bytes, self.import_main))
        if self.spare_worker and self._spare is None:
            self._spare = _Worker(self._ctx, self.memory_limit_bytes, self.import_main)
        for worker in self._workers:
            worker.wait_ready(self.startup_timeout_s)
        return self

    def close(self) -> None:
        for worker in self._workers + ([self._spare] if self._spare else []):
            worker.stop()
        self._workers, self._spare = [], None
        self._closed = True

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: best effort
            if not self._closed:
                self.close()

    def stats(self) -> dict[str, float]:
        return {
            "verifier/items": self.items,
            "verifier/timeouts": self.timeouts,
            "verifier/errors": self.errors,
            "verifier/restarts": self.restarts,
            "verifier/busy_seconds": self.busy_seconds,
        }

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers] + ([self._spare.process.pid] if self._spare else [])

    # ---- scoring

    def score_batch(
        self,
        items: Sequence[tuple[str, Any, str]],
        n_tokens: Sequence[int] | None = None,
        finished: Sequence[bool] | None = None,
    ) -> list[VerifyResult]:
        """Score ``items`` = [(response, gold, task)], in order.  ``n_tokens``/``finished`` (per item) feed
        the reward shaping; without them no length penalty applies."""
        n = len(items)
        for name, values in (("n_tokens", n_tokens), ("finished", finished)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} items")
        if self.shaping.overlong_penalty and n_tokens is None:
            raise ValueError("reward shaping has overlong_penalty on: pass n_tokens (and finished)")
        jobs = []
        for i, item in enumerate(items):
            if len(item) != 3:
                raise ValueError(f"item {i} must be (response, gold, task), got {len(item)} fields")
            response, gold, task = item
            if not isinstance(response, str):
                raise TypeError(f"item {i}: response must be str, got {type(response).__name__}")
            jobs.append((i, get_verifier(task), response, gold, task, self.answer_mode))
        if n == 0:
            return []
        self.start()
        raw = self._run(jobs)
        results = []
        for i, (score, extracted, seconds, timed_out, error) in enumerate(raw):
            reward = shape_reward(
                score,
                n_tokens[i] if n_tokens is not None else 0,
                finished[i] if finished is not None else True,
                self.shaping,
                has_answer=extracted is not None,
            )
            results.append(VerifyResult(reward, score >= 1.0, timed_out, seconds, extracted, score, error))
        self.items += n
        return results

    def _run(self, jobs: list[tuple]) -> list[tuple]:
        pending = deque(range(len(jobs)))
        raw: list[tuple | None] = [None] * len(jobs)
        chars = [len(job[2]) + (len(job[3]) if isinstance(job[3], str) else 0) for job in jobs]

        def requeue(worker: _Worker) -> None:
            pending.extendleft(reversed(worker.outstanding))
            worker.outstanding.clear()
            worker.outstanding_chars = 0

        while pending or any(w.outstanding for w in self._workers):
            now = time.monotonic()
            for worker in self._workers:
                while pending and (
                    not worker.outstanding
                    or (
                        len(worker.outstanding) < self.max_inflight_items
                        and worker.outstanding_chars + chars[pending[0]] <= self.max_inflight_chars
                    )
                ):
                    i = pending.popleft()
                    if not worker.outstanding:
                        worker.current_started = now
                    worker.outstanding.append(i)
                    worker.outstanding_chars += chars[i]
                    try:
                        worker.conn.send(jobs[i])
                    except (BrokenPipeError, OSError):  # died while idle: resend its items elsewhere
                        requeue(worker)
                        self._replace(worker)
                        break
            busy = [w for w in self._workers if w.outstanding]
            deadline = min(w.current_started for w in busy) + self.time_limit_s
            ready = wait_connections([w.conn for w in busy], timeout=max(0.0, deadline - time.monotonic()))
            for worker in busy:
                if worker.conn not in ready:
                    continue
                try:
                    while worker.outstanding and worker.conn.poll():
                        index, score, extracted, seconds, error = worker.conn.recv()
                        expected = worker.outstanding.popleft()
                        assert index == expected, f"verifier worker answered item {index}, expected {expected}"
                        worker.outstanding_chars -= chars[index]
                        worker.current_started = time.monotonic()
                        raw[index] = (score, extracted, seconds, False, error)
                        self.busy_seconds += seconds
                        if error is not None:
                            self.errors += 1
                except (EOFError, OSError):  # the worker died (e.g. killed for memory)
                    index = worker.outstanding.popleft()
                    worker.outstanding_chars -= chars[index]
                    seconds = time.monotonic() - worker.current_started
                    worker.process.join(timeout=1.0)
                    exitcode = worker.process.exitcode
                    raw[index] = (0.0, self._extract(jobs[index]), seconds, False, f"worker died (exit code {exitcode})")
                    self.errors += 1
                    requeue(worker)
                    self._replace(worker)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.outstanding and now - worker.current_started >= self.time_limit_s and not worker.conn.poll():
                    index = worker.outstanding.popleft()
                    worker.outstanding_chars -= chars[index]
                    raw[index] = (0.0, self._extract(jobs[index]), now - worker.current_started, True, None)
                    self.timeouts += 1
                    self.busy_seconds += now - worker.current_started
                    requeue(worker)
                    self._replace(worker)
        return raw  # type: ignore[return-value]

    def _extract(self, job: tuple) -> str | None:
        """The answer of an item whose verification did not finish (extraction is linear-time)."""
        return extract_answer(job[2], self.answer_mode)

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` and put the spare (or a new worker) in its place; start a new spare."""
        worker.kill()
        self.restarts += 1
        replacement = self._spare or _Worker(self._ctx, self.memory_limit_bytes, self.import_main)
        self._spare = _Worker(self._ctx, self.memory_limit_bytes, self.import_main) if self.spare_worker else None
        replacement.wait_ready(self.startup_timeout_s)
        self._workers[self._workers.index(worker)] = replacement


def default_num_workers() -> int:
    """One worker per two available cores (verification shares the machine with rollout and learner)."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


def verifier_from_config(cfg: Mapping[str, Any]) -> TimeBoundedVerifier:
    """Build from a plain mapping (a Hydra node converted with ``OmegaConf.to_container``)."""
    shaping = cfg.get("shaping")
    return TimeBoundedVerifier(
        time_limit_s=cfg.get("time_limit_s", 5.0),
        num_workers=cfg.get("num_workers") or default_num_workers(),
        answer_mode=cfg.get("answer_mode", "boxed"),
        shaping=RewardShapingConfig(**shaping) if shaping else None,
        memory_limit_mb=cfg.get("memory_limit_mb", 4096),
        start_method=cfg.get("start_method", "forkserver"),
        spare_worker=cfg.get("spare_worker", True),
    )
