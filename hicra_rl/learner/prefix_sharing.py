"""Shared-prefix forward for GRPO groups (pure torch; no DeepSpeed / Ray / vLLM).

GRPO samples every prompt G times, so a per-row forward of ``prompt + response`` computes each prompt
G times. Here one packed row per group holds the prompt once and then the group's responses one after
another (the idea of Prefix Grouper, arXiv 2506.05433); with ``one_row`` all groups of a micro-batch
follow each other in a single unpadded row (for the prefix-grouped attention)::

    input_ids      p0 p1 p2 | a0 a1 a2 | b0 b1 | pad
    position_ids    0  1  2 |  3  4  5 |  3  4 |  0      (every response continues from len(prompt))

and a block attention mask: a prompt token sees the prompt causally; a response token sees the whole
prompt and the earlier tokens of its own response, never another response's. Each response token
therefore sees exactly the keys, at exactly the positions, it sees in its own unshared row, so its
logits (and the gradients through them) are those of the unshared forward up to float rounding.

The logit that predicts a response's j-th token sits at the column before it; for j = 0 that is the
last prompt token's column, which is shared by all G responses of the group (each with its own target).

Passing the mask to Hugging Face (checked against transformers 5.x): ``create_causal_mask`` returns
a 4D ``attention_mask`` unchanged, and both the "sdpa" and the "eager" attention add a float 4D mask
to the attention scores, so ``model(input_ids, attention_mask=<[n, 1, L, L] additive mask in the
model's dtype>, position_ids=..., use_cache=False)`` runs the block mask. "flash_attention_*" and
"flex_attention" do not take such a tensor and are rejected. The mask is O(L^2) per packed row.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from hicra_rl.algo.logprobs import logprobs_and_entropy
from hicra_rl.learner.grouped_attention import GROUPED_ATTENTION, grouped_layout, uses_grouped_attention
from hicra_rl.learner.sequences import logits_only_at, response_token_index, scatter_response

SUPPORTED_ATTENTION = ("sdpa", "eager", GROUPED_ATTENTION)


@dataclass
class PackedGroups:
    """The packed groups, plus the maps from packed columns back to each response.

    B responses (in the caller's order), G = ``n_groups`` groups, W = longest response. Each group is its
    prompt once, then its responses: ``pack_groups`` puts one group per row (``n_rows`` = G, right-padded
    to the longest, length L), or with ``one_row`` every group one after another in a single row of
    L = all their tokens (no padding at all; ``n_rows`` = 1).

    input_ids        [n_rows, L]          the groups' tokens, right-padded with pad_id
    position_ids     [n_rows, L]          each prompt 0..P-1; each response P..P+len-1; padding 0
    segment          [n_rows, L]          0 prompt, m + 1 the group's m-th response, -(column + 1) padding
    column_group     [n_rows, L]          the group (0..G-1, packing order) of each column; -1 padding
    attention_mask   [n_rows, 1, L, L]    (a property, built on demand from ``segment`` and ``column_group``:
                                          O(L^2), the grouped attention never builds it) additive float32: 0
                                          where a query (dim 2) may see a key (dim 3), ``finfo(float32).min``
                                          elsewhere; a padding column sees only itself (so no softmax row is
                                          empty) and no real token sees padding or another group
    row_index        [B]                  packed row of response i
    group_index      [B]                  group (0..G-1) of response i
    group_start      [G]                  flat position (row x L + column) of each group's first prompt token
    token_index      [B, W]               column of response i's j-th token (0 past its length)
    logit_index      [B, W]               column whose logit predicts that token: token_index - 1, except
                                          j = 0 -> the last prompt column (0 past its length)
    targets          [B, W]               the response tokens (pad_id past each length)
    response_lengths [B], prompt_lengths [B], seq_lengths [G] (real tokens per group)
    group_order      the group id of each packed group (order of first appearance)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    column_group: torch.Tensor
    row_index: torch.Tensor
    group_index: torch.Tensor
    group_start: torch.Tensor
    token_index: torch.Tensor
    logit_index: torch.Tensor
    targets: torch.Tensor
    response_lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    seq_lengths: torch.Tensor
    group_order: list[int]
    pad_id: int

    # ------------------------------------------------------------------ sizes
    @property
    def n_groups(self) -> int:
        return len(self.group_order)

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_responses(self) -> int:
        return int(self.row_index.shape[0])

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens in the packed rows."""
        return int(self.seq_lengths.sum())

    @property
    def n_unshared_tokens(self) -> int:
        """Real tokens of the unshared layout: sum over responses of len(prompt) + len(response)."""
        return int((self.prompt_lengths + self.response_lengths).sum())

    @property
    def padded_tokens(self) -> int:
        """Positions the packed forward computes: n_rows x L."""
        return int(self.input_ids.numel())

    @property
    def unshared_padded_tokens(self) -> int:
        """Positions of the unshared, right-padded [B, T] forward (``build_sequences``)."""
        return self.n_responses * int((self.prompt_lengths + self.response_lengths).max())

    def stats(self) -> dict[str, float]:
        return {
            "n_groups": self.n_groups,
            "n_rows": self.n_rows,
            "n_responses": self.n_responses,
            "packed_len": int(self.input_ids.shape[1]),
            "n_tokens": self.n_tokens,
            "n_unshared_tokens": self.n_unshared_tokens,
            "padded_tokens": self.padded_tokens,
            "unshared_padded_tokens": self.unshared_padded_tokens,
            "token_ratio": self.n_tokens / self.n_unshared_tokens,
            "padded_ratio": self.padded_tokens / self.unshared_padded_tokens,
        }

    # ------------------------------------------------------------------ helpers
    def to(self, device) -> PackedGroups:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device)
        return PackedGroups(**kw)

    def allowed(self) -> torch.Tensor:
        """[n_rows, L, L] bool: query (dim 1) may attend to key (dim 2): causal, within its group, keys of its
        own segment, or the group's prompt when it is a response token."""
        length = self.segment.shape[1]
        seg_q, seg_k = self.segment[:, :, None], self.segment[:, None, :]
        same_group = self.column_group[:, :, None] == self.column_group[:, None, :]
        causal = torch.ones((length, length), dtype=torch.bool, device=self.segment.device).tril_()
        return causal & same_group & ((seg_q == seg_k) | ((seg_k == 0) & (seg_q > 0)))

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.additive_mask(torch.float32)

    def additive_mask(self, dtype: torch.dtype, device=None) -> torch.Tensor:
        """The 4D mask in ``dtype`` (the model's compute dtype): 0 / ``finfo(dtype).min``."""
        allowed = self.allowed()
        if device is not None:
            allowed = allowed.to(device)
        mask = torch.zeros((allowed.shape[0], 1, *allowed.shape[1:]), dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def group_ids_by_prompt(prompt_ids: list[list[int]]) -> list[int]:
    """Group id per row: rows with identical prompts share one (numbered in order of first appearance)."""
    seen: dict[tuple[int, ...], int] = {}
    return [seen.setdefault(tuple(p), len(seen)) for p in prompt_ids]


def pack_groups(
    prompt_ids: list[list[int]], response_ids: list[list[int]], group_ids: list[int], pad_id: int,
    one_row: bool = False,
) -> PackedGroups:
    """Pack B (prompt, response) rows into one row per group, or with ``one_row`` all groups into a single
    unpadded row (see ``PackedGroups``).

    Rows with the same ``group_ids`` value must have identical prompts; they need not be adjacent.
    Packed groups follow the order of each group's first appearance, responses within a group follow the
    input order, and every per-response output keeps the input order.
    """
    b = len(prompt_ids)
    if len(response_ids) != b or len(group_ids) != b:
        raise ValueError(f"{b} prompts, {len(response_ids)} responses and {len(group_ids)} group ids: need one each per row")
    if b == 0:
        raise ValueError("no rows to pack")
    members: dict[int, list[int]] = {}
    for i, (p, r, g) in enumerate(zip(prompt_ids, response_ids, group_ids)):
        if len(p) == 0:
            raise ValueError(f"row {i}: empty prompt (the first response token needs a prompt token before it)")
        if len(r) == 0:
            raise ValueError(f"row {i}: empty response")
        rows = members.setdefault(int(g), [])
        if rows and list(prompt_ids[rows[0]]) != list(p):
            raise ValueError(f"row {i}: its prompt differs from row {rows[0]}'s, but both are in group {g}")
        rows.append(i)

    order = list(members)
    prompt_len = [len(prompt_ids[members[g][0]]) for g in order]
    seq_len = [prompt_len[k] + sum(len(response_ids[i]) for i in members[g]) for k, g in enumerate(order)]
    n, length = (1, sum(seq_len)) if one_row else (len(order), max(seq_len))
    width = max(len(r) for r in response_ids)

    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    # segment of each column: 0 prompt, m + 1 the group's m-th response, -(column + 1) padding (unique)
    segment = -torch.arange(1, length + 1, dtype=torch.long).repeat(n, 1)
    column_group = torch.full((n, length), -1, dtype=torch.long)
    row_index = torch.zeros(b, dtype=torch.long)
    group_index = torch.zeros(b, dtype=torch.long)
    group_start = torch.zeros(len(order), dtype=torch.long)
    token_index = torch.zeros((b, width), dtype=torch.long)
    logit_index = torch.zeros((b, width), dtype=torch.long)
    targets = torch.full((b, width), pad_id, dtype=torch.long)
    resp_len = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
    pr_len = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)

    offset = 0   # with one_row, the column where group k starts
    for k, g in enumerate(order):
        row, c0 = (0, offset) if one_row else (k, 0)
        p = prompt_ids[members[g][0]]
        np_ = len(p)
        group_start[k] = row * length + c0
        input_ids[row, c0:c0 + np_] = torch.as_tensor(list(p), dtype=torch.long)
        position_ids[row, c0:c0 + np_] = torch.arange(np_)
        segment[row, c0:c0 + np_] = 0
        column_group[row, c0:c0 + seq_len[k]] = k
        s = c0 + np_
        for m, i in enumerate(members[g]):
            r = response_ids[i]
            e = s + len(r)
            resp = torch.as_tensor(list(r), dtype=torch.long)
            input_ids[row, s:e] = resp
            position_ids[row, s:e] = torch.arange(np_, np_ + len(r))
            segment[row, s:e] = m + 1
            row_index[i] = row
            group_index[i] = k
            token_index[i, : len(r)] = torch.arange(s, e)
            logit_index[i, 0] = c0 + np_ - 1
            logit_index[i, 1 : len(r)] = torch.arange(s, e - 1)
            targets[i, : len(r)] = resp
            s = e
        offset += seq_len[k]

    return PackedGroups(
        input_ids=input_ids,
        position_ids=position_ids,
        segment=segment,
        column_group=column_group,
        row_index=row_index,
        group_index=group_index,
        group_start=group_start,
        token_index=token_index,
        logit_index=logit_index,
        targets=targets,
        response_lengths=resp_len,
        prompt_lengths=pr_len,
        seq_lengths=torch.tensor(seq_len, dtype=torch.long),
        group_order=order,
        pad_id=int(pad_id),
    )


def pack_plan(ids: list[list[int]], starts: list[int], ends: list[int], plan: list[list[int]],
              group_of: list[int], one_row: bool = False) -> list[tuple[torch.Tensor, PackedGroups]]:
    """(rows, packed) per micro-batch of ``plan``: row r of ``ids`` (prompt ``[:starts[r]]``, response
    ``[starts[r]:ends[r]]``) packed by its group ``group_of[r]`` (``one_row``: see ``pack_groups``)."""
    out = []
    for rows in plan:
        packed = pack_groups([ids[r][:starts[r]] for r in rows], [ids[r][starts[r]:ends[r]] for r in rows],
                             [group_of[r] for r in rows], pad_id=0, one_row=one_row)
        out.append((torch.tensor(rows, dtype=torch.long), packed))
    return out


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
              group_ids: list[int] | None = None, pad_id: int = 0) -> PackedGroups:
    """``pack_groups`` from the learner's row layout (``sequences.build_sequences``).

    Without ``group_ids`` rows are grouped by identical prompts (always exact: the result does not
    depend on the grouping).
    """
    from hicra_rl.learner.sequences import response_spans

    starts, lengths = response_spans(response_mask, attention_mask)
    ids = input_ids.cpu().tolist()
    prompts = [row[:s] for row, s in zip(ids, starts.tolist())]
    responses = [row[s : s + n] for row, s, n in zip(ids, starts.tolist(), lengths.tolist())]
    if group_ids is None:
        group_ids = group_ids_by_prompt(prompts)
    return pack_groups(prompts, responses, group_ids, pad_id)


def _hf_config(model):
    for m in (model, getattr(model, "module", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            return cfg
    return None


def _compute_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_attention_implementation(model) -> None:
    """Raise unless the model's attention adds a 4D float mask to its scores ("sdpa" / "eager")."""
    cfg = _hf_config(model)
    impl = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    if impl is not None and impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"shared-prefix forward needs attn_implementation in {SUPPORTED_ATTENTION} (a custom 4D mask, or the prefix-grouped one), "
            f"the model uses {impl!r}"
        )


def shared_prefix_log_probs(
    model, packed: PackedGroups, width: int, temperature: float = 1.0, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi, entropy) of every response token, [B, width] in the response layout and input order.

    One forward of ``model`` (an HF causal LM, or anything forwarding the same kwargs to one, e.g. a
    DeepSpeed engine) over the packed rows; differentiable w.r.t. the model's parameters. ``packed``
    should already be on the model's device (``packed.to(device)``). Columns past a response's length
    are 0, as in ``sequences.gather_response``.
    """
    w_max = packed.token_index.shape[1]
    if width < w_max:
        raise ValueError(f"width {width} is shorter than the longest response ({w_max})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_attention_implementation(model)
    device = packed.input_ids.device
    dtype = _compute_dtype(model)
    if uses_grouped_attention(_hf_config(model)):
        # the layout replaces the [L x L] mask; a 4D placeholder keeps transformers from building its own
        extra = {"prefix_groups": grouped_layout(packed, dtype),
                 "attention_mask": torch.zeros((packed.n_rows, 1, 1, 1), dtype=dtype, device=device)}
    else:
        extra = {"attention_mask": packed.additive_mask(dtype, device)}
    # logits only at the (row, column) pairs that predict a real response token: [N, V]
    resp, col = response_token_index(packed.response_lengths)
    first = int(packed.logit_index[resp, col].min())
    with logits_only_at(model, packed.row_index[resp], packed.logit_index[resp, col] - first):
        sel = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                    logits_to_keep=packed.input_ids.shape[1] - first, **extra).logits
    if temperature != 1.0:
        sel = sel / temperature
    logp, ent = logprobs_and_entropy(sel, packed.targets[resp, col], chunk_size)
    b = packed.n_responses
    return scatter_response(logp, resp, col, b, width), scatter_response(ent, resp, col, b, width)
