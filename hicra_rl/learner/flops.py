"""The learner's arithmetic: useful FLOPs of an update and the GEMMs it runs, for its GFLOP/s readings.

Pure (torch only).  ``useful_flops`` is the usual 6 x weights per token of a forward + backward (2 for the
forward, 4 for the backward; Kaplan et al. 2020, as verl's and Megatron's MFU counters use), with the
vocabulary projection counted at the positions whose logits the learner computes (the response tokens), and
no attention or padding.  ``linear_gemm_shapes`` lists every matrix multiply of the linear layers of one
micro-batch's forward + backward at its padded positions; ``time_gemms`` runs them back to back on random
operands: the time the update would take if it were nothing but its matrix multiplies, on this device, now.
"""
from __future__ import annotations

import time

import torch

Shape = tuple[int, int, int]   # (m, k, n) of an [m x k] @ [k x n] product


def linear_gemm_shapes(model_config, positions: int, head_tokens: int) -> list[Shape]:
    """(m, k, n) of every matrix multiply of one micro-batch's forward and backward through the decoder's
    linear layers (q, k, v, o, gate, up, down per layer) at ``positions`` token positions, and through the
    vocabulary projection at ``head_tokens`` positions.  Per linear ``Y = X W^T``: the forward, the input
    gradient ``dX = dY W`` and the weight gradient ``dW = dY^T X``."""
    c = model_config
    h, inter = c.hidden_size, c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q_out, kv_out = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    linears = [(h, q_out), (h, kv_out), (h, kv_out), (q_out, h), (h, inter), (h, inter), (inter, h)]
    layer = [s for fan_in, fan_out in linears
             for s in ((positions, fan_in, fan_out), (positions, fan_out, fan_in), (fan_out, positions, fan_in))]
    v = c.vocab_size
    return layer * c.num_hidden_layers + [(head_tokens, h, v), (head_tokens, v, h), (v, head_tokens, h)]


def update_gemm_shapes(model_config, work: list[tuple[int, int]]) -> list[Shape]:
    """``linear_gemm_shapes`` of every micro-batch of an update, ``work`` its (padded positions, response
    tokens) pairs (``PolicyLearner.last_gemm_work``)."""
    return [s for positions, head_tokens in work for s in linear_gemm_shapes(model_config, positions, head_tokens)]


def matrix_weights(module: torch.nn.Module, model_config) -> tuple[int, int]:
    """(decoder weights in matrices, vocabulary projection weights): the 2-D parameters other than the token
    embedding and the output head, and vocab x hidden.  ZeRO-3 partitioned parameters count whole."""
    body = sum(getattr(p, "ds_numel", p.numel()) for name, p in module.named_parameters()
               if len(getattr(p, "ds_shape", p.shape)) == 2 and "embed" not in name and "lm_head" not in name)
    return int(body), int(model_config.vocab_size * model_config.hidden_size)


def useful_flops(body_weights: int, head_weights: int, forward_tokens: float, head_tokens: float) -> float:
    """6 x (decoder weights x tokens forwarded + vocabulary projection weights x response tokens)."""
    return 6.0 * (body_weights * forward_tokens + head_weights * head_tokens)


def gemm_flops(shapes: list[Shape]) -> float:
    return float(sum(2 * m * k * n for m, k, n in shapes))


def time_gemms(shapes: list[Shape], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> float:
    """Seconds to run every product in ``shapes`` once, back to back, on random operands of ``dtype`` (each
    distinct shape is run once untimed first; its operands are freed after its last product)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    last_use = {shape: i for i, shape in enumerate(shapes)}
    operands: dict[Shape, tuple[torch.Tensor, torch.Tensor]] = {}
    seconds = 0.0
    for i, shape in enumerate(shapes):
        if shape not in operands:
            m, k, n = shape
            operands[shape] = (torch.randn(m, k, dtype=dtype, device=device),
                               torch.randn(k, n, dtype=dtype, device=device))
            torch.mm(*operands[shape])
        a, b = operands[shape]
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        seconds += time.perf_counter() - t0
        if last_use[shape] == i:   # the vocabulary projection's operands are large: free them when done
            del operands[shape], a, b
    return seconds
