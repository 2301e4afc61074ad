"""LoRA adapters on the policy (``peft``): the config mapping, and the merge the weight sync and checkpoints use.

With ``learner.lora.rank`` r > 0 the learner wraps its HF causal LM in a ``peft`` LoRA model: every targeted
linear layer computes ``W x + (alpha / r) * B (A dropout(x))`` with ``W`` frozen, ``A`` [r x in] (Kaiming-uniform)
and ``B`` [out x r] (zeros, so the policy starts as the base model).  Only ``A`` and ``B`` train, so only they
have gradients and optimizer state.

Rollout engines and checkpoints' ``hf/`` folders get the *merged* weights under the base model's own names:
``W + scaling * B @ A`` (``merged_state_dict``), computed in fp32 and cast back to the weights' dtype, so vLLM
and every HF consumer load a plain model.  ``hicra_rl.learner.engine`` gathers the parameters (ZeRO-3 too); the
functions here work on plain CPU tensors.

A reward model (``task_type="SEQ_CLS"``, ``hicra-rm train lora.rank=...``) also trains its new scalar head in full:
peft keeps it in ``modules_to_save`` (a trainable copy ``score.modules_to_save.default`` beside the frozen
``score.original_module``); the merged weights carry the trained copy as ``score.weight``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

ADAPTER = "default"               # peft's adapter name; the learner has one adapter
PEFT_PREFIX = "base_model.model."  # peft's prefix before the base model's own parameter names


@dataclass(frozen=True)
class LoraLayerInfo:
    """What the merge needs of one adapted layer: its scaling (alpha / r) and weight layout."""

    scaling: float
    fan_in_fan_out: bool = False   # the base weight is [in x out] (GPT-2's Conv1D): the delta is transposed


def peft_config(c, base_model_path: str | None = None, task_type: str = "CAUSAL_LM"):
    """``learner.lora`` as a ``peft.LoraConfig`` (``["all-linear"]`` is peft's special string).  ``task_type``
    ``SEQ_CLS`` (a reward model): "all-linear" leaves the head out and peft trains it in full (modules_to_save)."""
    from peft import LoraConfig

    targets = list(c.target_modules)
    return LoraConfig(r=int(c.rank), lora_alpha=float(c.alpha), lora_dropout=float(c.dropout),
                      target_modules="all-linear" if targets == ["all-linear"] else targets, bias="none",
                      task_type=task_type, base_model_name_or_path=base_model_path)


def add_lora(model: torch.nn.Module, c, base_model_path: str | None = None, task_type: str = "CAUSAL_LM"):
    """``model`` wrapped in a ``peft`` LoRA model (base weights frozen); returns (peft model, layer infos by
    the adapted module's name in the base model).  A target that names no module, or one that is not a linear
    layer, is a ``ValueError`` naming ``learner.lora.target_modules``."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    try:
        wrapped = get_peft_model(model, peft_config(c, base_model_path, task_type))
    except ValueError as err:
        raise ValueError(f"config error at 'learner.lora.target_modules': {list(c.target_modules)}: {err}") from None
    layers: dict[str, LoraLayerInfo] = {}
    for name, module in wrapped.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear):
            raise ValueError(f"config error at 'learner.lora.target_modules': {list(c.target_modules)} selects "
                             f"{name} ({type(module).__name__}); only linear layers can take adapters here")
        base_name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        layers[base_name] = LoraLayerInfo(float(module.scaling[ADAPTER]), bool(module.fan_in_fan_out))
    if not layers:
        raise ValueError(f"config error at 'learner.lora.target_modules': {list(c.target_modules)} matched no layer")
    return wrapped, layers


def is_lora_weight(name: str) -> bool:
    """A low-rank factor A or B (merged into its layer, never a weight of its own in the HF model)."""
    return ".lora_A." in name or ".lora_B." in name


SAVED_COPY = f".modules_to_save.{ADAPTER}."   # peft's trainable copy of a module trained in full (a reward head)
FROZEN_ORIGINAL = ".original_module."        # ... and the frozen original beside it


def is_adapter_param(name: str) -> bool:
    """What the adapter folder and the optimizer hold: the factors and any module peft trains in full."""
    return is_lora_weight(name) or SAVED_COPY in name


def hf_name(peft_name: str) -> str:
    """A peft parameter name as the base model's: prefix off, ``.base_layer.`` out, a trained full copy under
    the module's own name."""
    name = peft_name[len(PEFT_PREFIX):] if peft_name.startswith(PEFT_PREFIX) else peft_name
    return name.replace(".base_layer.", ".").replace(SAVED_COPY, ".")


def lora_delta(a: torch.Tensor, b: torch.Tensor, info: LoraLayerInfo) -> torch.Tensor:
    """``scaling * B @ A`` in fp32, in the base weight's layout."""
    delta = info.scaling * (b.float() @ a.float())
    return delta.T if info.fan_in_fan_out else delta


def merged_state_dict(named: Mapping[str, torch.Tensor], layers: Mapping[str, LoraLayerInfo]) -> dict[str, torch.Tensor]:
    """The policy's weights under the base model's names, adapters merged: ``W + scaling * B @ A`` for every
    adapted layer (fp32 sum, cast to ``W``'s dtype), a module trained in full as its trained copy, every other
    tensor as it is.  ``named``: the peft model's parameters and buffers by name (CPU tensors)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in named.items():
        if is_lora_weight(name) or FROZEN_ORIGINAL in name:
            continue
        base = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        module, sep, leaf = base.rpartition(".base_layer.")
        if sep and leaf == "weight" and module in layers:
            a = named[f"{PEFT_PREFIX}{module}.lora_A.{ADAPTER}.weight"]
            b = named[f"{PEFT_PREFIX}{module}.lora_B.{ADAPTER}.weight"]
            tensor = (tensor.float() + lora_delta(a, b, layers[module])).to(tensor.dtype)
        out[hf_name(name)] = tensor
    return out


def weights_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """Elements, L1 and L2 norms (float64) of the frozen base weights: a checkpoint records them, a resume that
    loads the base from the model path checks them (``same_fingerprint``).  Norms rather than a hash of the
    bytes: summation order (thread count) moves them by ~1e-16 relative, a different base by far more."""
    numel, l1, sq = 0, 0.0, 0.0
    for _, t in tensors:
        numel += t.numel()
        l1 += float(torch.linalg.vector_norm(t, ord=1, dtype=torch.float64))
        sq += float(torch.linalg.vector_norm(t, ord=2, dtype=torch.float64)) ** 2
    return {"numel": numel, "l1": l1, "l2": math.sqrt(sq)}


def same_fingerprint(a: Mapping, b: Mapping, rel: float = 1e-9) -> bool:
    return (int(a["numel"]) == int(b["numel"])
            and all(math.isclose(float(a[k]), float(b[k]), rel_tol=rel, abs_tol=0.0) for k in ("l1", "l2")))
