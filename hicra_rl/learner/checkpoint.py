"""Atomic, resumable checkpoints of a ``PolicyLearner``.

Layout of ``<run_dir>/step-N/`` (the run directory must be shared by all ranks)::

    hf/                   the policy as a Hugging Face model folder (+ tokenizer files of model_path); with
                          LoRA the merged weights W + (alpha / r) * B @ A under the base model's names
    adapter/              LoRA only: the adapters as peft writes them (adapter_config.json,
                          adapter_model.safetensors): ``PeftModel.from_pretrained(base, "adapter")``
    deepspeed/state/      DeepSpeed's module, optimizer (per ZeRO partition) and LR-scheduler state; with LoRA
                          the module state holds the adapters only (the frozen base is not saved: a resume
                          loads it from the model path and checks it against the manifest's fingerprint)
    rng/rank{r}.pt        python, numpy and torch RNG states of every rank
    extra.json            the caller's ``extra`` dict (data position, step, ...)
    checkpoint.json       manifest, written last

Everything is written into ``<run_dir>/.tmp-step-N``, fsynced, then renamed to ``step-N`` with
``os.replace`` (atomic on one filesystem); the ``latest`` marker is written after the rename.  A crash
leaves at worst a ``.tmp-*`` folder, which ``find_latest_complete`` ignores.

Loading never unpickles arbitrary objects: ``rng/*.pt`` and DeepSpeed's own ``*.pt`` files are read with
``torch.load(..., weights_only=True)`` and an allowlist of the few non-tensor classes they hold (numpy's
array reconstruction for the RNG state; ZeroStageEnum, LossScaler, DynamicLossScaler and fragment_address
for DeepSpeed).  DeepSpeed 0.19.8 itself calls ``torch.load(weights_only=False)`` in its
``TorchCheckpointEngine``; :func:`load_checkpoint` swaps in a weights-only engine for the duration of the
load.  A file that needs any other class is refused with a message naming it; set
``HICRA_TRUSTED_CHECKPOINTS=1`` to load such a checkpoint anyway (only one you wrote yourself).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from hicra_rl.iofiles import fsync_dir, write_text_atomic

MANIFEST = "checkpoint.json"
LATEST = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_DS_TAG = "state"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


TRUST_ENV = "HICRA_TRUSTED_CHECKPOINTS"


def _safe_globals() -> list:
    """The non-tensor classes a checkpoint of this project may hold (checked on ZeRO-2 and ZeRO-3 saves)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), ZeroStageEnum, fragment_address,
            LossScaler, DynamicLossScaler]


def safe_torch_load(path: str | os.PathLike, map_location=None):
    """``torch.load`` with ``weights_only=True`` and the allowlist of :func:`_safe_globals`; anything else
    is refused with an error naming the file and the classes it wanted (``$HICRA_TRUSTED_CHECKPOINTS=1``:
    a plain unpickling load instead, for a checkpoint you trust)."""
    if os.environ.get(TRUST_ENV, "").lower() in ("1", "true", "yes"):
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        if "weights_only" not in str(err) and "Unsupported global" not in str(err):
            raise
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 -- only for the message
            wanted = ["?"]
        raise RuntimeError(f"{path}: refusing to unpickle {', '.join(wanted)} (a checkpoint loads with "
                           f"weights_only=True and an allowlist); if you wrote this checkpoint yourself, set "
                           f"{TRUST_ENV}=1 to load it anyway") from None


class _WeightsOnlyCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine: ``load`` is :func:`safe_torch_load`, the rest is delegated."""

    def __init__(self, inner):
        self._inner = inner

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def step_dir_name(step: int) -> str:
    return f"step-{int(step)}"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_hf_model(learner, out_dir: Path) -> None:
    """The policy as an HF folder (rank 0 writes; collective because of ZeRO-3 gathering); with LoRA the
    merged weights (``PolicyLearner.full_state_dict``)."""
    state = learner.full_state_dict()
    if learner.rank != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    module = learner.hf_module() if getattr(learner, "lora", False) else learner.engine.module
    module.save_pretrained(out_dir, state_dict=state)
    src = Path(learner.model_path)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out_dir / name)


def save_adapter(learner, out_dir: Path) -> None:
    """LoRA: the adapters as a peft folder (rank 0 writes; collective because of ZeRO-3 gathering)."""
    state = learner.adapter_state_dict()
    if learner.rank != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    learner.engine.module.save_pretrained(str(out_dir), state_dict=state)


def _frozen_names(module: torch.nn.Module) -> set[str]:
    """Every name of a frozen parameter, aliases included (a tied ``lm_head.weight``)."""
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    return {n for n, p in module.named_parameters(remove_duplicate=False) if id(p) not in trainable}


@contextlib.contextmanager
def _adapters_only_module_state(engine):
    """While active, DeepSpeed's ``module_state_dict`` (what its checkpoint stores as ``module``) leaves out every
    frozen parameter, tied aliases too (its own ``exclude_frozen_parameters`` keeps a tied ``lm_head.weight``)."""
    original = engine.module_state_dict
    frozen = _frozen_names(engine.module)

    def adapters_only(*args, **kwargs):
        state = original(*args, **kwargs)
        for name in frozen & set(state):
            del state[name]
        return state

    engine.module_state_dict = adapters_only
    try:
        yield
    finally:
        del engine.module_state_dict   # the class's method again


def lora_manifest(learner) -> dict | None:
    """The manifest's record of ``learner.lora`` (None: full fine-tuning)."""
    if not getattr(learner, "lora", False):
        return None
    c = learner.cfg.lora
    return {"rank": int(c.rank), "alpha": float(c.alpha), "dropout": float(c.dropout),
            "target_modules": list(c.target_modules), "adapted_layers": len(learner.lora_layers),
            "trainable_params": int(learner.trainable_params), "base_model": str(learner.model_path),
            "base_fingerprint": learner.base_fingerprint()}


def save_checkpoint(learner, run_dir: str | os.PathLike, step: int, extra: dict | None = None,
                    keep_last: int | None = None) -> Path:
    """Write ``<run_dir>/step-<step>`` atomically on all ranks (collective); returns its path.

    ``extra`` must be JSON-serialisable.  ``keep_last`` (>= 1) deletes older complete checkpoints.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    extra_text = json.dumps(extra or {}, indent=2, sort_keys=True)  # fail before any collective work
    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".tmp-{step_dir_name(step)}"
    if learner.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save of the same step
        tmp.mkdir()
    learner.barrier()

    lora = lora_manifest(learner)
    frozen_out = {"exclude_frozen_parameters": True} if lora is not None else {}   # ZeRO-2/3: no frozen fragments
    with _adapters_only_module_state(learner.engine) if lora is not None else contextlib.nullcontext():
        learner.engine.save_checkpoint(str(tmp / "deepspeed"), tag=_DS_TAG, save_latest=False, **frozen_out)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank{learner.rank}.pt")
    save_hf_model(learner, tmp / "hf")
    if lora is not None:
        save_adapter(learner, tmp / "adapter")
    learner.barrier()

    if learner.rank == 0:
        (tmp / "extra.json").write_text(extra_text)
        manifest = {"format": FORMAT_VERSION, "step": int(step), "world_size": learner.world_size,
                    "zero_stage": learner.cfg.zero_stage, "global_steps": learner.global_steps}
        if lora is not None:
            manifest["lora"] = lora
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step: swap the old one out, then drop it
            trash = run_dir / f".trash-{step_dir_name(step)}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
        fsync_dir(run_dir)
        write_text_atomic(run_dir / LATEST, final.name + "\n")
        if keep_last is not None:
            prune_checkpoints(run_dir, keep_last)
    learner.barrier()
    return final


def read_manifest(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; {ckpt_dir} is not a complete checkpoint") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    for key in ("format", "step", "world_size", "zero_stage"):
        if key not in manifest:
            raise ValueError(f"{path}: missing field {key!r}")
    if manifest["format"] != FORMAT_VERSION:
        raise ValueError(f"{path}: field 'format' is {manifest['format']}, this code reads {FORMAT_VERSION}")
    return manifest


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / MANIFEST).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_latest_complete(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None (``.tmp-*`` and folders without a
    manifest are ignored, so an interrupted save never wins)."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints; returns the deleted paths."""
    found = complete_checkpoints(run_dir)
    doomed = [p for _, p in found[:-keep_last]] if keep_last < len(found) else []
    for path in doomed:
        trash = path.with_name(f".trash-{path.name}")
        os.replace(path, trash)  # a half-deleted folder must never look complete
        shutil.rmtree(trash)
    return doomed


_LORA_KEYS = ("rank", "alpha", "dropout", "target_modules")


def _check_lora_resume(learner, manifest: dict, where: Path):
    """A LoRA checkpoint resumes only into a learner with the same adapters on the same base weights (its
    fingerprint: the base was not saved); full fine-tuning and LoRA never mix.  Returns the module-state
    loader for DeepSpeed (LoRA: adapters only, every other key must be a frozen base weight), or None."""
    saved, have = manifest.get("lora"), lora_manifest(learner)
    if (saved is None) != (have is None):
        what = {True: "LoRA adapters (learner.lora.rank > 0)", False: "full fine-tuning (learner.lora.rank 0)"}
        raise ValueError(f"{where}: the checkpoint holds {what[saved is not None]}, this learner uses "
                         f"{what[have is not None]}")
    if saved is None:
        return None
    for key in _LORA_KEYS:
        if saved.get(key) != have[key]:
            raise ValueError(f"{where}: field 'lora.{key}' is {saved.get(key)!r}, this learner has "
                             f"learner.lora.{key}={have[key]!r}")
    from hicra_rl.learner.lora import same_fingerprint

    if not same_fingerprint(saved["base_fingerprint"], have["base_fingerprint"]):
        raise ValueError(f"{where}: the base weights at {learner.model_path} are not those the adapters were trained "
                         f"on (saved from {saved.get('base_model')}; fingerprint {saved['base_fingerprint']} against "
                         f"{have['base_fingerprint']}); resume with the same model.path / trainer.init_checkpoint")
    frozen = _frozen_names(learner.engine.module)

    def load_adapters(src: dict, dst: torch.nn.Module) -> None:
        result = dst.load_state_dict(src, strict=False)
        missing = set(result.missing_keys) - frozen
        if missing or result.unexpected_keys:
            raise ValueError(f"{where}: the adapters do not fit this learner (missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(result.unexpected_keys)[:4]})")

    return load_adapters


def load_checkpoint(learner, ckpt_dir: str | os.PathLike) -> dict:
    """Restore weights, optimizer, LR schedule and RNG states into ``learner`` (collective);
    returns the saved ``extra`` dict.  The learner must be freshly built (ZeRO-3 needs a pristine
    engine) with the same world size and ZeRO stage."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    for key, have in (("world_size", learner.world_size), ("zero_stage", learner.cfg.zero_stage)):
        if manifest[key] != have:
            raise ValueError(f"{ckpt_dir / MANIFEST}: field {key!r} is {manifest[key]}, this learner has {have}")
    custom_load = _check_lora_resume(learner, manifest, ckpt_dir / MANIFEST)
    engine = learner.engine
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(original)  # DeepSpeed's own passes weights_only=False
    try:
        load_path, _ = engine.load_checkpoint(str(ckpt_dir / "deepspeed"), tag=_DS_TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=True,
                                              custom_load_fn=custom_load)
    finally:
        engine.checkpoint_engine = original
    if load_path is None:
        raise RuntimeError(f"{ckpt_dir / 'deepspeed' / _DS_TAG}: DeepSpeed could not load the checkpoint")
    rng_file = ckpt_dir / "rng" / f"rank{learner.rank}.pt"
    set_rng_state(safe_torch_load(rng_file))
    extra = json.loads((ckpt_dir / "extra.json").read_text())
    learner.barrier()
    return extra
