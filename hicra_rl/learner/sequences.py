"""Sequence layout shared by the learner and its callers (pure torch, no DeepSpeed).

A row is ``prompt + response``, right-padded to a common length T::

    input_ids       [B, T]   p p p r r r r 0 0
    attention_mask  [B, T]   1 1 1 1 1 1 1 0 0
    response_mask   [B, T]   0 0 0 1 1 1 1 0 0   (one contiguous span per row, never at position 0)

Per-response-token tensors (old log-probs, advantages, planning masks, the learner's outputs) are
left-aligned in a [B, W] "response layout": column j is the row's j-th response token, W >= the
longest response, and columns past a row's response length are padding.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def build_sequences(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate ragged prompts and responses into (input_ids, attention_mask, response_mask)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not p:
            raise ValueError(f"row {i}: empty prompt (the first response token needs a prompt token before it)")
        if not r:
            raise ValueError(f"row {i}: empty response")
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    b = len(prompt_ids)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    response_mask = torch.zeros((b, width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.as_tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, len(p) : n] = 1
    return input_ids, attention_mask, response_mask


def response_spans(response_mask: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """(starts, lengths) of each row's response span; checks the layout described above."""
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got shape {tuple(response_mask.shape)}")
    rm = response_mask.bool()
    lengths = rm.sum(-1)
    starts = rm.int().argmax(-1)
    t = rm.shape[1]
    cols = torch.arange(t, device=rm.device)[None, :]
    expected = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
    bad = (expected != rm).any(-1) | (lengths == 0) | (starts == 0)
    if attention_mask is not None:
        bad |= (rm & ~attention_mask.bool()).any(-1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"response_mask row {row}: the response must be one non-empty contiguous span, after at least "
            f"one prompt token and inside attention_mask; got {rm[row].int().tolist()}"
        )
    return starts, lengths


def gather_response(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, width: int, offset: int = 0):
    """Move per-position values into the response layout.

    ``values[:, c]`` belongs to sequence position ``c + offset``; returns [B, width] whose column j
    holds position ``starts + j`` (zero past each row's length).
    """
    cols = torch.arange(width, device=values.device)[None, :]
    index = (starts[:, None] - offset + cols).clamp(0, values.shape[1] - 1)
    out = values.gather(1, index)
    return out * (cols < lengths[:, None]).to(out.dtype)


def response_token_index(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, j) of every response token, row-major: j < ``lengths[row]``."""
    width = int(lengths.max()) if lengths.numel() else 0
    cols = torch.arange(width, device=lengths.device)[None, :]
    return (cols < lengths[:, None]).nonzero(as_tuple=True)


def scatter_response(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, width: int):
    """Per-token ``values`` [N] at (``rows``, ``cols``) into the response layout [n_rows, width], zero elsewhere
    (differentiable w.r.t. ``values``)."""
    out = torch.zeros((n_rows, width), dtype=values.dtype, device=values.device)
    return out.index_put((rows, cols), values)


@contextmanager
def logits_only_at(model, rows: torch.Tensor, cols: torch.Tensor):
    """While active, ``model``'s forward returns logits only at the pairs ``(rows[i], cols[i])`` of the
    positions its output head sees (after ``logits_to_keep``): [N, vocab] instead of [B, T, vocab].

    A forward pre-hook on the output embedding (``lm_head``) selects the hidden states before the vocabulary
    projection, so padding and prompt positions cost no logits, no log-softmax and no [B, T, vocab] gather
    and scatter in the backward.  Works through a DeepSpeed engine (``.module``) and any ZeRO stage: the
    hook changes the head's input only, DeepSpeed's own hooks still gather its weight."""
    inner = model if hasattr(model, "get_output_embeddings") else getattr(model, "module", None)
    head = inner.get_output_embeddings() if inner is not None else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings) to select at")

    def select(module, args):
        return (args[0][rows, cols], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()
