"""Prefix-grouped attention for packed prompt groups (Prefix Grouper, arXiv 2506.05433): no [L x L] mask.

A packed group (``prefix_sharing.PackedGroups``) is ``prompt | r1 | r2 | ...``, one per row (right-padded)
or all of a micro-batch's groups one after another in one unpadded row. Its masked attention computes every
query against every key of the row and masks most of them out: (P + G·R)² scores for a prompt of P tokens
and G responses of R, of which about P² / 2 + G·R·(P + R / 2) are needed, and the [L x L] mask itself grows
with the square of the row (1 GiB in fp32 at 16k tokens).

Here each layer's attention is two ``scaled_dot_product_attention`` calls on the same q, k, v:
- the prompts: causal attention over each group's ``P_max`` columns from its start, gathered into one batch
  entry per group (a shorter prompt's extra columns are computed and dropped: causality keeps them out of
  the real prompt queries);
- the responses: one batch entry per response, its queries against ``[its prompt | itself]`` gathered
  into ``P_max + R_max`` keys, with a small [n, 1, R_max, P_max + R_max] mask (prompt padding, causality
  within the response).
The outputs are scattered back to the packed columns; padding columns get zeros. Values and gradients
equal the masked attention's within fp32 rounding (``tests/test_grouped_attention.py``).

It plugs into transformers' attention interface under ``GROUPED_ATTENTION`` and falls back to ``sdpa``
for any forward that does not pass a ``prefix_groups`` layout, so the same model serves unpacked
forwards too. It bypasses model-specific attention features (sliding windows, logit soft-capping, sinks),
so ``enable_grouped_attention`` accepts only the architectures listed in ``GROUPED_MODEL_TYPES``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUPED_ATTENTION = "hicra_prefix_grouped"
GROUPED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class GroupedLayout:
    """Index maps of one packed micro-batch (rows ``n_rows`` x ``length`` columns, ``n_groups`` groups,
    ``n_responses`` responses)."""

    n_rows: int
    length: int
    n_groups: int
    prompt_max: int
    response_max: int
    n_responses: int
    prompt_index: torch.Tensor    # [n_groups * P_max] flat (row * length + column) of each group's prompt columns
    kv_index: torch.Tensor        # [n * (P_max + R_max)] flat position of each response's keys
    q_index: torch.Tensor         # [n * R_max] flat position of each response's queries (0 past its length)
    mask: torch.Tensor            # [n, 1, R_max, P_max + R_max] additive
    prompt_source: torch.Tensor   # rows of the flattened prompt output [n_groups * P_max] that are real prompt tokens
    response_source: torch.Tensor  # rows of the flattened response output [n * R_max] that are real tokens
    destination: torch.Tensor     # flat packed position of each prompt_source row, then of each response_source row


def grouped_layout(packed, dtype: torch.dtype = torch.float32) -> GroupedLayout:
    """The ``GroupedLayout`` of a ``PackedGroups`` (on its device; the mask in ``dtype``, the compute dtype)."""
    device = packed.input_ids.device
    n_rows, length = packed.input_ids.shape
    rows, p_len, r_len = packed.row_index, packed.prompt_lengths, packed.response_lengths
    n, r_max = int(rows.shape[0]), int(packed.token_index.shape[1])
    n_groups, p_max = int(packed.group_start.shape[0]), int(p_len.max())
    last = n_rows * length - 1
    # each group's first P_max positions (past the end of the row: its last position; never a real query)
    prompt_index = (packed.group_start[:, None] + torch.arange(p_max, device=device)[None, :]).clamp_(max=last)
    j = torch.arange(r_max, device=device)
    in_response = j[None, :] < r_len[:, None]                                     # [n, R_max]
    prompt_cols = torch.arange(p_max, device=device)[None, :].expand(n, p_max)
    response_cols = torch.where(in_response, packed.token_index, torch.zeros_like(packed.token_index))
    kv_index = torch.cat([prompt_index[packed.group_index], rows[:, None] * length + response_cols], 1)
    q_index = rows[:, None] * length + response_cols
    # key k of response i's query j: a real prompt token, or a token of the response at or before j
    key_ok = torch.cat([prompt_cols < p_len[:, None], in_response], 1)            # [n, P_max + R_max]
    causal = torch.cat([torch.ones(r_max, p_max, dtype=torch.bool, device=device),
                        j[None, :] <= j[:, None]], 1)                               # [R_max, P_max + R_max]
    allowed = key_ok[:, None, :] & causal[None]
    allowed[:, :, 0] = True   # a padding query still sees the first prompt token: no all-masked row (NaN)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    group_prompt = torch.zeros(n_groups, dtype=torch.long, device=device).index_copy(0, packed.group_index, p_len)
    prompt_real = (torch.arange(p_max, device=device)[None, :] < group_prompt[:, None]).flatten()
    prompt_source = prompt_real.nonzero()[:, 0]
    prompt_dest = prompt_index.flatten()[prompt_source]
    response_source = in_response.flatten().nonzero()[:, 0]
    destination = torch.cat([prompt_dest, q_index.flatten()[response_source]])
    return GroupedLayout(n_rows=n_rows, length=length, n_groups=n_groups, prompt_max=p_max, response_max=r_max,
                         n_responses=n, prompt_index=prompt_index.flatten(),
                         kv_index=kv_index.flatten(), q_index=q_index.flatten(), mask=mask[:, None],
                         prompt_source=prompt_source, response_source=response_source, destination=destination)


def prefix_grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: GroupedLayout,
                             scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Attention of packed rows, [B, T, H, D] (transformers' attention output layout), from
    query [B, H, T, D] and key / value [B, KV, T, D] (grouped-query attention when KV < H)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    b, h, t, d = query.shape
    kv = key.shape[1]
    if (b, t) != (layout.n_rows, layout.length):
        raise ValueError(f"prefix_groups layout is for {layout.n_rows} x {layout.length}, the forward has {b} x {t}")
    n, g, p, r = layout.n_responses, layout.n_groups, layout.prompt_max, layout.response_max
    # GQA inside SDPA on a CPU (its flash kernel takes a mask); elsewhere the repeated heads keep the fused kernels
    gqa = query.device.type == "cpu"
    rep = 1 if gqa else h // kv
    kw = {"enable_gqa": True} if gqa and kv != h else {}
    q_flat = query.transpose(1, 2).reshape(b * t, h, d)
    k_flat = key.transpose(1, 2).reshape(b * t, kv, d)
    v_flat = value.transpose(1, 2).reshape(b * t, kv, d)

    def gather(flat: torch.Tensor, index: torch.Tensor, entries: int, heads: int) -> torch.Tensor:
        return flat.index_select(0, index).view(entries, -1, heads, d).transpose(1, 2)

    out_prompt = F.scaled_dot_product_attention(
        gather(q_flat, layout.prompt_index, g, h), repeat_kv(gather(k_flat, layout.prompt_index, g, kv), rep),
        repeat_kv(gather(v_flat, layout.prompt_index, g, kv), rep), is_causal=True, dropout_p=dropout, scale=scale,
        **kw)
    out_resp = F.scaled_dot_product_attention(
        gather(q_flat, layout.q_index, n, h), repeat_kv(gather(k_flat, layout.kv_index, n, kv), rep),
        repeat_kv(gather(v_flat, layout.kv_index, n, kv), rep),
        attn_mask=layout.mask.to(query.dtype), dropout_p=dropout, scale=scale, **kw)
    source = torch.cat([out_prompt.transpose(1, 2).reshape(g * p, h, d).index_select(0, layout.prompt_source),
                        out_resp.transpose(1, 2).reshape(n * r, h, d).index_select(0, layout.response_source)])
    out = query.new_zeros(b * t, h, d).index_copy(0, layout.destination, source)
    return out.view(b, t, h, d)


def _attention_interface_fn(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    layout = kwargs.pop("prefix_groups", None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return prefix_grouped_attention(query, key, value, layout, scale=scaling, dropout=dropout), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_ATTENTION, _attention_interface_fn)
    AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)


def enable_grouped_attention(model) -> None:
    """Switch an HF causal LM to the prefix-grouped attention (``sdpa`` for forwards without a layout)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in GROUPED_MODEL_TYPES:
        raise ValueError(f"learner.shared_prefix_attention=grouped supports model types {GROUPED_MODEL_TYPES}, "
                         f"the model is {model_type!r}; use learner.shared_prefix_attention=masked")
    _register()
    model.set_attn_implementation(GROUPED_ATTENTION)


def uses_grouped_attention(config) -> bool:
    return getattr(config, "_attn_implementation", None) == GROUPED_ATTENTION
