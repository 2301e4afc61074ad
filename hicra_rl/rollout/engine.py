"""A vLLM rollout engine: sample G responses per prompt with their log-probs, score fixed sequences, take
new weights from the learner.

No Ray here: a Ray actor shell owns one ``VLLMRolloutEngine``.  vLLM starts its engine-core process
itself (also from inside a Ray actor or any non-main process); a script that builds one at import time
needs the ``if __name__ == "__main__":`` guard.

Log-probs: the engine runs with vLLM's ``logprobs_mode="raw_logprobs"`` by default, so every reported
value is ``log softmax(logits)[token]`` of the *unmodified* model, i.e. log pi_theta(token | prefix) at
temperature 1 with no top-p/top-k truncation, whatever temperature/top_p sampled the token.  That is what
a learner computes from its own logits without dividing by a temperature, so the two agree for the
PPO/GRPO ratio pi_theta / pi_old (measured: within 1e-6 in fp32).  With
``logprobs_mode="processed_logprobs"`` they are the log-probs of the distribution actually sampled from
(after temperature and top-p); a learner must then apply the same temperature.  Prompt log-probs are
always raw.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np
import torch

from hicra_rl.batch import RolloutBatch
from hicra_rl.rollout import weight_sync

_LOGPROB_MODES = ("raw_logprobs", "processed_logprobs")


@dataclass
class SampledResponse:
    """One sampled response; ``group_index`` is the index of the prompt it answers."""

    group_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]      # log-prob of each sampled token (see module docstring for which one)
    finish_reason: str         # "stop" (EOS or stop string) | "length" (hit max_tokens) | "abort"
    text: str


def to_rollout_batch(responses: Sequence[SampledResponse], prompt_texts: Sequence[str] | None = None) -> RolloutBatch:
    """Pack ``generate``'s output into the step's ``RolloutBatch`` (same order; ``group_ids`` = prompt index).

    ``prompt_texts`` (one per prompt, optional) is expanded to one per response."""
    batch = RolloutBatch(
        prompt_ids=[list(r.prompt_ids) for r in responses],
        response_ids=[list(r.token_ids) for r in responses],
        sampling_logprobs=[list(r.logprobs) for r in responses],
        finish_reasons=[r.finish_reason for r in responses],
        group_ids=[r.group_index for r in responses],
        response_texts=[r.text for r in responses],
        prompt_texts=[prompt_texts[r.group_index] for r in responses] if prompt_texts is not None else [],
    )
    batch.validate()
    return batch


@contextlib.contextmanager
def _environ(updates: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the engine processes vLLM spawns, then restore ours."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cpu_bind(cpu_threads: int | str) -> str:
    """``4`` -> ``"0-3"`` (first cores); a string such as ``"2-3"`` or ``"auto"`` passes through."""
    if isinstance(cpu_threads, int):
        if cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {cpu_threads}")
        return f"0-{cpu_threads - 1}"
    if cpu_threads == "all":  # every core this process may run on (vLLM's own default takes one fewer)
        cores = sorted(os.sched_getaffinity(0))
        contiguous = cores == list(range(cores[0], cores[-1] + 1))
        return f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores))
    return cpu_threads


def per_prompt_seeds(seed: int, num_prompts: int) -> list[int]:
    """Distinct 31-bit seeds per prompt.  vLLM gives sample i of a request the seed ``seed + i``, so one
    shared seed would give every prompt the same noise; these are independent streams of ``seed``."""
    state = np.random.SeedSequence(seed).generate_state(num_prompts, dtype=np.uint32)
    return [int(s) >> 1 for s in state]


def _child_pids() -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process().children(recursive=True)]


def _shm_files_of(pids: Sequence[int], prefix: str = "/dev/shm/psm_") -> set[str]:
    """Python shared-memory files (``psm_*``) the given processes have mapped or open (Linux /proc)."""
    found: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
                if path.startswith(prefix):
                    found.add(path.removesuffix(" (deleted)"))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(prefix):
                        found.add(target.removesuffix(" (deleted)"))
    return found


def remove_orphaned_shm(min_age_s: float = 60.0, directory: str = "/dev/shm") -> list[str]:
    """Delete ``psm_*`` shared-memory files that no process maps or holds open and that are older than
    ``min_age_s``: what vLLM leaves when its processes are killed (e.g. a Ray actor killed without
    ``close()``; 170-250 MB each).  Returns the deleted paths.  Reads every process's /proc entries, so it
    sees only processes this user may inspect: run it where that is all of them (a container, CI)."""
    import psutil

    now = time.time()
    candidates = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        path = os.path.join(directory, name)
        with contextlib.suppress(FileNotFoundError):
            if name.startswith("psm_") and now - os.stat(path).st_mtime >= min_age_s:
                candidates.append(path)
    if not candidates:
        return []
    in_use = _shm_files_of(psutil.pids(), prefix=os.path.join(directory, "psm_"))
    removed = []
    for path in candidates:
        if path not in in_use:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


class VLLMRolloutEngine:
    """Wraps ``vllm.LLM`` for RL rollouts (one engine, ``tensor_parallel_size`` workers)."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        max_model_len: int = 2048,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        kv_cache_gib: int | None = None,
        cpu_threads: int | str | None = None,
        enforce_eager: bool | None = None,
        logprobs_mode: str = "raw_logprobs",
        weight_transport: str = "shm_file",
        max_lora_rank: int = 0,
        engine_kwargs: Mapping | None = None,
    ) -> None:
        """``max_lora_rank`` > 0 turns on vLLM's own LoRA path (``enable_lora``, one adapter at a time): the policy
        is then the base model plus the peft adapter folder last given to ``load_adapter``."""
        if logprobs_mode not in _LOGPROB_MODES:
            raise ValueError(f"logprobs_mode must be one of {_LOGPROB_MODES}, got {logprobs_mode!r}")
        weight_sync.check_transport(weight_transport)
        from vllm import LLM
        from vllm.platforms import current_platform

        self.model_path = model_path
        self.seed = seed
        self.logprobs_mode = logprobs_mode
        self.weight_transport = weight_transport
        self.is_cpu = current_platform.is_cpu()
        # weight sync ships a Python function through collective_rpc: pickle must be allowed both here
        # (encoding) and in the engine processes (decoding), which inherit our environment
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        env: dict[str, str] = {}
        if self.is_cpu:
            if kv_cache_gib is not None:
                env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
            if cpu_threads is not None:
                env["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_bind(cpu_threads)
        if enforce_eager is None:
            # on CPU compiling costs ~45-65 s at start-up for ~10 % faster decoding of the CPU default's batch
            # (benchmarks/results/bench_rollout_compile.txt): more than it saves in runs under ~50 steps
            enforce_eager = self.is_cpu
        kwargs = {
            "model": model_path,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": seed,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            "logprobs_mode": logprobs_mode,
        }
        if self.is_cpu:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a request with its own
            # seed is in a partial (chunked) prefill, which happens once a batch's prompts exceed
            # max_num_batched_tokens.  Whole-prompt prefills avoid that path.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(max_model_len, 4096)
        if max_lora_rank:
            # room for the next adapter beside the one in use (load_adapter removes the old one after)
            kwargs.update(enable_lora=True, max_lora_rank=int(max_lora_rank), max_loras=1, max_cpu_loras=2)
        kwargs.update(engine_kwargs or {})
        shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        children_before = set(_child_pids())
        t0 = time.perf_counter()
        with _environ(env):  # read by the engine processes vLLM starts now
            self.llm = LLM(**kwargs)
        self.startup_seconds = time.perf_counter() - t0
        self.tokenizer = self.llm.get_tokenizer()
        self._shm_before = {f"/dev/shm/{name}" for name in shm_before}
        self._engine_pids = set(_child_pids()) - children_before
        self._shm_files = self._engine_shm_files()
        self.sync_history: list[weight_sync.SyncStats] = []
        self.lora_enabled = bool(max_lora_rank)
        self._adapter = None        # the LoRARequest every call samples with (vLLM's LoRA path), or None
        self._adapter_ids = 0

    # ------------------------------------------------------------------ sampling
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        n: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> list[SampledResponse]:
        """Sample ``n`` responses per prompt.  Returned prompt-major: prompt 0's n samples, then prompt 1's.

        ``seed`` makes the call reproducible (each prompt gets its own stream, see ``per_prompt_seeds``);
        ``None`` draws from the engine's RNG.  ``stop`` strings end a response (finish_reason "stop");
        EOS always does.
        """
        from vllm import SamplingParams

        self._check_prompts(prompt_ids)
        if n < 1 or max_tokens < 1:
            raise ValueError(f"n and max_tokens must be >= 1, got n={n}, max_tokens={max_tokens}")
        seeds = per_prompt_seeds(seed, len(prompt_ids)) if seed is not None else [None] * len(prompt_ids)
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                seed=s,
                stop=list(stop) if stop else None,
                logprobs=0,  # 0 = only the sampled token's log-prob
            )
            for s in seeds
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False, lora_request=self._adapter
        )
        responses: list[SampledResponse] = []
        for group, out in enumerate(outputs):
            for sample, completion in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                token_ids = list(completion.token_ids)
                logprobs = [step[tok].logprob for tok, step in zip(token_ids, completion.logprobs or [])]
                if len(logprobs) != len(token_ids):
                    raise RuntimeError(
                        f"vLLM returned {len(logprobs)} log-probs for {len(token_ids)} tokens "
                        f"(prompt {group}, sample {sample})"
                    )
                responses.append(
                    SampledResponse(
                        group_index=group,
                        sample_index=sample,
                        prompt_ids=list(prompt_ids[group]),
                        token_ids=token_ids,
                        logprobs=logprobs,
                        finish_reason=str(completion.finish_reason),
                        text=completion.text,
                    )
                )
        return responses

    def prompt_logprobs(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """log pi(response_t | prompt, response_<t) for each fixed response token (raw, temperature 1)."""
        from vllm import SamplingParams

        self._check_prompts(prompt_ids)
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        full = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        if self._adapter is None:
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in full], params, use_tqdm=False)
        else:  # vllm-cpu 0.32's LoRA logits path fails on a batch of prompt-logprob requests (einsum size
            # mismatch in punica_cpu.add_lora_logits): one sequence a call
            outputs = [self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False,
                                         lora_request=self._adapter)[0] for ids in full]
        result = []
        for p, r, ids, out in zip(prompt_ids, response_ids, full, outputs):
            steps = out.prompt_logprobs[len(p):]
            result.append([step[tok].logprob for tok, step in zip(ids[len(p):], steps)])
            assert len(result[-1]) == len(r)
        return result

    def _check_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> None:
        if not prompt_ids:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")

    # ------------------------------------------------------------------ weights
    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> weight_sync.SyncStats:
        """Load a full HF state dict (names as in the HF checkpoint) into every worker; returns timing."""
        stats = weight_sync.push_state_dict(self.llm, state_dict, transport=self.weight_transport)
        self.sync_history.append(stats)
        return stats

    def load_adapter(self, path: str) -> float:
        """vLLM's LoRA path: the peft adapter folder at ``path`` (written by ``save_pretrained``) becomes the
        policy of every later call, under a new adapter id (vLLM caches adapters by id); the previous adapter is
        removed.  Returns the seconds the engine took to load it."""
        from vllm.lora.request import LoRARequest

        if not self.lora_enabled:
            raise RuntimeError("this engine was started without vLLM's LoRA path (max_lora_rank=0)")
        self._adapter_ids += 1
        request = LoRARequest(f"policy-{self._adapter_ids}", self._adapter_ids, str(path))
        t0 = time.perf_counter()
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the adapter at {path}")
        seconds = time.perf_counter() - t0
        previous, self._adapter = self._adapter, request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
        return seconds

    def join_weight_group(
        self, host: str, port: int, world_size: int, *, rank_offset: int = 1, backend: str = "gloo",
        timeout_s: float = 600.0,
    ) -> list[int]:
        """Join a ``weight_sync.BroadcastWeightSender``'s group (call while the sender runs ``connect``).
        Worker ``i`` of this engine becomes rank ``rank_offset + i``; returns those ranks."""
        return self.llm.collective_rpc(
            weight_sync._join_worker_group, args=(host, port, world_size, rank_offset, backend, timeout_s)
        )

    def receive_weights(self, handle: weight_sync.WeightHandle) -> weight_sync.SyncStats:
        """Load weights another process published: a ``weight_sync.publish_state_dict`` file (the publisher
        releases it once all engines loaded it), a ``weight_sync.publish_adapter`` folder (vLLM's LoRA path) or a
        ``BroadcastWeightSender.manifest`` (the sender must ``send`` at the same time)."""
        if handle.transport == "lora_adapter":
            if not os.path.isdir(handle.path):
                raise FileNotFoundError(f"published adapters {handle.path} not found: released already, or the "
                                        "learner is on another node (transport 'lora_adapter' works within one node)")
            load_seconds = self.load_adapter(handle.path)
            stats = weight_sync.SyncStats(handle.transport, handle.write_seconds + load_seconds, handle.write_seconds,
                                          load_seconds, handle.nbytes / 1e6, handle.num_tensors)
        else:
            stats = weight_sync.load_published(self.llm, handle)
        self.sync_history.append(stats)
        return stats

    # ------------------------------------------------------------------ lifecycle
    @property
    def engine_pids(self) -> set[int]:
        """The processes vLLM started for this engine (engine core, workers)."""
        return set(self._engine_pids)

    @property
    def shm_files(self) -> set[str]:
        """The /dev/shm files this engine's processes created (deleted by ``close``)."""
        return set(self._shm_files)

    def dead_reason(self) -> str | None:
        """Why the engine can no longer generate (one of its processes exited), or None while it can."""
        import psutil

        if self.llm is None:
            return "engine closed"
        for pid in sorted(self._engine_pids):
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return f"vLLM engine process {pid} exited"
            except psutil.NoSuchProcess:
                return f"vLLM engine process {pid} exited"
        return None

    def _engine_shm_files(self) -> set[str]:
        """``psm_*`` files mapped by this engine's processes that did not exist before it started."""
        return _shm_files_of(sorted(self._engine_pids)) - self._shm_before

    def close(self) -> None:
        """Stop vLLM's processes and delete the /dev/shm files they used.  Idempotent."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        shm_files = self._shm_files | self._engine_shm_files()
        self.llm = None
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()
        for path in shm_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
