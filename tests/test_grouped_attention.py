"""Prefix-grouped attention (``hicra_rl.learner.grouped_attention``): the index maps and mask by hand, and
values / gradients against the packed row's masked attention on random q, k, v. The whole-model check
(log-probs and parameter gradients against unpacked rows) is ``test_prefix_sharing``'s grouped case."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hicra_rl.learner.grouped_attention import (
    enable_grouped_attention,
    grouped_layout,
    prefix_grouped_attention,
)
from hicra_rl.learner.prefix_sharing import pack_groups

NEG = torch.finfo(torch.float32).min


def test_hand_checked_layout():
    # rows: [5 6 | 7 8 | 9] and [3 | 4 | pad pad pad]; P_max 2, R_max 2, three responses
    packed = pack_groups([[5, 6], [5, 6], [3]], [[7, 8], [9], [4]], [0, 0, 1], pad_id=0)
    lay = grouped_layout(packed)
    assert (lay.n_rows, lay.length, lay.prompt_max, lay.response_max, lay.n_responses) == (2, 5, 2, 2, 3)
    # keys: the row's prompt columns, then the response's own columns (padding -> column 0 of the row)
    assert lay.kv_index.view(3, 4).tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [5, 6, 6, 5]]
    assert lay.q_index.view(3, 2).tolist() == [[2, 3], [4, 0], [6, 5]]
    allowed = (lay.mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 1, 1, 0], [1, 1, 1, 1]]      # 7: prompt + itself; 8: prompt + 7 + itself
    # 9: prompt + itself; its padding query (dropped) sees the real keys, never a padding key
    assert allowed[1] == [[1, 1, 1, 0], [1, 1, 1, 0]]
    # 4: its 1-token prompt (key 1 is column 1: 4 itself, not prompt) + itself; padding query likewise
    assert allowed[2] == [[1, 0, 1, 0], [1, 0, 1, 0]]
    # every real column gets exactly one output: prompts (0, 1 | 5), then responses (2, 3, 4 | 6)
    assert lay.destination.tolist() == [0, 1, 5, 2, 3, 4, 6]


def test_hand_checked_one_row_layout():
    # one row: [5 6 | 7 8 | 9 || 3 | 4]; the second group starts at column 5
    packed = pack_groups([[5, 6], [5, 6], [3]], [[7, 8], [9], [4]], [0, 0, 1], pad_id=0, one_row=True)
    lay = grouped_layout(packed)
    assert (lay.n_rows, lay.length, lay.n_groups, lay.prompt_max, lay.n_responses) == (1, 7, 2, 2, 3)
    # each group's P_max = 2 columns from its start (the second group's extra one is its response, dropped)
    assert lay.prompt_index.view(2, 2).tolist() == [[0, 1], [5, 6]]
    assert lay.kv_index.view(3, 4).tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [5, 6, 6, 0]]
    assert lay.q_index.view(3, 2).tolist() == [[2, 3], [4, 0], [6, 0]]
    allowed = (lay.mask[:, 0] == 0).int().tolist()
    assert allowed[2] == [[1, 0, 1, 0], [1, 0, 1, 0]]   # 4: its 1-token prompt (column 5) + itself
    assert lay.destination.tolist() == [0, 1, 5, 2, 3, 4, 6]


def _random_packing(seed: int, one_row: bool = False):
    g = torch.Generator().manual_seed(seed)
    prompts, responses, gids = [], [], []
    for gid, (p_len, sizes) in enumerate([(6, [4, 1, 7]), (2, [3, 3]), (9, [5]), (1, [2, 6, 1, 3])]):
        p = torch.randint(1, 100, (p_len,), generator=g).tolist()
        for n in sizes:
            prompts.append(p)
            responses.append(torch.randint(1, 100, (n,), generator=g).tolist())
            gids.append(gid)
    return pack_groups(prompts, responses, gids, pad_id=0, one_row=one_row)


@pytest.mark.parametrize("one_row", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_values_and_gradients_equal_the_masked_attention(kv_heads, one_row):
    packed = _random_packing(0, one_row)
    lay = grouped_layout(packed)
    b, t = packed.input_ids.shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, 4, t, 8, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(b, kv_heads, t, 8, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(b, kv_heads, t, 8, generator=g, dtype=torch.float64).requires_grad_()
    real = torch.zeros(b * t, dtype=torch.bool)
    real[lay.destination] = True
    real = real.view(b, t)
    assert int(real.sum()) == packed.n_tokens and lay.destination.unique().numel() == packed.n_tokens
    w = torch.randn(b, t, 4, 8, generator=g, dtype=torch.float64) * real[:, :, None, None]

    got = prefix_grouped_attention(q, k, v, lay, scale=0.3)
    rep = 4 // kv_heads
    mask = packed.additive_mask(torch.float64)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask, scale=0.3).transpose(1, 2)
    assert got.shape == (b, t, 4, 8)
    torch.testing.assert_close(got[real], want[real], atol=1e-10, rtol=1e-10)
    assert (got[~real] == 0).all()                                      # padding columns: zeros
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    ref = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


def test_wrong_layout_shape_is_refused():
    lay = grouped_layout(_random_packing(0))
    q = torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match="layout is for 4 x"):
        prefix_grouped_attention(q, q, q, lay)


def test_unsupported_architecture_is_refused_naming_the_switch(tiny_llama):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    model.config.model_type = "gemma2"
    with pytest.raises(ValueError, match="learner.shared_prefix_attention=masked"):
        enable_grouped_attention(model)


def test_without_a_layout_the_model_is_plain_sdpa(tiny_llama):
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    grouped = LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    enable_grouped_attention(grouped)
    ids = torch.randint(1, 49152, (2, 7), generator=torch.Generator().manual_seed(0))
    am = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    torch.testing.assert_close(grouped(input_ids=ids, attention_mask=am).logits,
                               plain(input_ids=ids, attention_mask=am).logits)
