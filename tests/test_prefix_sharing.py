"""Shared-prefix packing: index maps and mask by hand, and log-probs / entropies / gradients against
the plain per-row HF forward on a tiny random Llama (sdpa and eager attention)."""
from __future__ import annotations

import pytest
import torch
from learner_fixtures import direct_log_probs, random_rows, to_layout

from hicra_rl.batch import response_layout_mask
from hicra_rl.learner.prefix_sharing import (
    check_attention_implementation,
    group_ids_by_prompt,
    pack_groups,
    pack_rows,
    shared_prefix_log_probs,
)
from hicra_rl.learner.sequences import build_sequences

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NEG = torch.finfo(torch.float32).min


def load(path: str, attn: str):
    """``attn``: sdpa | eager (the [L x L] block mask) | grouped (``grouped_attention``, no mask)."""
    from transformers import LlamaForCausalLM

    from hicra_rl.learner.grouped_attention import GROUPED_ATTENTION, enable_grouped_attention

    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa" if attn == "grouped" else attn,
                                             dtype=torch.float32)
    if attn == "grouped":
        enable_grouped_attention(model)
    assert model.config._attn_implementation == (GROUPED_ATTENTION if attn == "grouped" else attn)
    return model


def grouped_batch(seed: int = 3):
    """Groups of 3 with different prompt and response lengths, a group of 1, interleaved rows."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [5, 9, 2, 7]
    sizes = [3, 3, 1, 3]
    prompts, responses, gids = [], [], []
    for gid, (pl, size) in enumerate(zip(prompt_lens, sizes)):
        p = torch.randint(1, 49152, (pl,), generator=g).tolist()
        for _ in range(size):
            n = int(torch.randint(1, 9, (1,), generator=g))
            prompts.append(p)
            responses.append(torch.randint(1, 49152, (n,), generator=g).tolist())
            gids.append(gid)
    # interleave groups 0 and 1 so that a group's rows are not adjacent
    perm = [0, 3, 1, 4, 2, 5, 6, 7, 8, 9]
    return [prompts[i] for i in perm], [responses[i] for i in perm], [gids[i] for i in perm]


def test_hand_checked_maps_and_mask():
    packed = pack_groups([[5, 6], [5, 6], [3]], [[7, 8], [9], [4]], [0, 0, 1], pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    allowed_0 = [[1, 0, 0, 0, 0],   # 5: itself
                 [1, 1, 0, 0, 0],   # 6: prompt, causal
                 [1, 1, 1, 0, 0],   # 7: prompt + itself
                 [1, 1, 1, 1, 0],   # 8: prompt + 7 + itself
                 [1, 1, 0, 0, 1]]   # 9: prompt + itself, not the other response
    allowed_1 = [[1, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0],
                 [0, 0, 1, 0, 0],   # padding sees only itself
                 [0, 0, 0, 1, 0],
                 [0, 0, 0, 0, 1]]
    expected = torch.tensor([allowed_0, allowed_1], dtype=torch.bool)
    assert packed.attention_mask.shape == (2, 1, 5, 5)
    assert packed.attention_mask.dtype == torch.float32
    assert torch.equal(packed.allowed(), expected)
    assert torch.equal(packed.attention_mask[:, 0], torch.where(expected, 0.0, NEG))
    assert packed.row_index.tolist() == [0, 0, 1]
    assert packed.token_index.tolist() == [[2, 3], [4, 0], [1, 0]]
    assert packed.logit_index.tolist() == [[1, 2], [1, 0], [0, 0]]   # first token: the last prompt column
    assert packed.targets.tolist() == [[7, 8], [9, 0], [4, 0]]
    assert packed.response_lengths.tolist() == [2, 1, 1]
    assert packed.group_order == [0, 1]
    assert packed.n_tokens == 7 and packed.n_unshared_tokens == 4 + 3 + 2
    assert packed.padded_tokens == 10 and packed.unshared_padded_tokens == 3 * 4
    bf16 = packed.additive_mask(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    assert torch.equal(bf16[:, 0] == 0, expected)


def test_one_row_packs_every_group_without_padding():
    """``one_row``: the groups one after another in a single row; positions restart per group; no column
    sees another group (5 6 7 8 9 | 3 4)."""
    packed = pack_groups([[5, 6], [5, 6], [3]], [[7, 8], [9], [4]], [0, 0, 1], pad_id=0, one_row=True)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 3, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert packed.column_group.tolist() == [[0, 0, 0, 0, 0, 1, 1]]
    allowed = [[1, 0, 0, 0, 0, 0, 0],   # 5
               [1, 1, 0, 0, 0, 0, 0],   # 6
               [1, 1, 1, 0, 0, 0, 0],   # 7: prompt + itself
               [1, 1, 1, 1, 0, 0, 0],   # 8: prompt + 7 + itself
               [1, 1, 0, 0, 1, 0, 0],   # 9: prompt + itself
               [0, 0, 0, 0, 0, 1, 0],   # 3: the second group's prompt, nothing of the first group
               [0, 0, 0, 0, 0, 1, 1]]   # 4: its prompt + itself
    assert packed.allowed().int().tolist() == [allowed]
    assert packed.row_index.tolist() == [0, 0, 0] and packed.group_index.tolist() == [0, 0, 1]
    assert packed.group_start.tolist() == [0, 5]
    assert packed.token_index.tolist() == [[2, 3], [4, 0], [6, 0]]
    assert packed.logit_index.tolist() == [[1, 2], [1, 0], [5, 0]]
    assert packed.seq_lengths.tolist() == [5, 2]
    assert packed.n_groups == 2 and packed.n_rows == 1
    assert packed.n_tokens == packed.padded_tokens == 7   # against 10 with one row per group


def test_validation():
    with pytest.raises(ValueError, match="row 2"):
        pack_groups([[1, 2], [1, 2], [1, 3]], [[4], [5], [6]], [7, 7, 7], pad_id=0)
    with pytest.raises(ValueError, match="row 1: empty prompt"):
        pack_groups([[1], []], [[4], [5]], [0, 1], pad_id=0)
    with pytest.raises(ValueError, match="row 0: empty response"):
        pack_groups([[1]], [[]], [0], pad_id=0)
    with pytest.raises(ValueError, match="group ids"):
        pack_groups([[1]], [[2]], [0, 0], pad_id=0)
    packed = pack_groups([[1]], [[2, 3, 4]], [0], pad_id=0)
    with pytest.raises(ValueError, match="width 2"):
        shared_prefix_log_probs(torch.nn.Identity(), packed, width=2)


def test_pack_rows_groups_by_prompt():
    prompts, responses, gids = grouped_batch()
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    assert group_ids_by_prompt(prompts) == [0, 1, 0, 1, 0, 1, 2, 3, 3, 3]
    a = pack_rows(ids, am, rm, pad_id=0)
    b = pack_groups(prompts, responses, gids, pad_id=0)
    for name in ("input_ids", "position_ids", "attention_mask", "row_index", "logit_index", "targets"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("attn,one_row", [("sdpa", False), ("eager", False), ("grouped", False),
                                          ("sdpa", True), ("grouped", True)])
def test_matches_unshared_forward_and_gradients(tiny_llama, attn, one_row):
    torch.manual_seed(0)
    model = load(tiny_llama, attn)
    prompts, responses, gids = grouped_batch()
    packed = pack_groups(prompts, responses, gids, pad_id=0, one_row=one_row)
    width = max(len(r) for r in responses) + 2
    temperature = 0.7
    assert packed.n_tokens < packed.n_unshared_tokens
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(len(prompts), width, generator=g)
    adv_ent = torch.randn(len(prompts), width, generator=g)

    lp, ent = shared_prefix_log_probs(model, packed, width, temperature=temperature, chunk_size=7)
    assert lp.shape == ent.shape == (len(prompts), width)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    (lp * adv + 0.1 * ent * adv_ent).sum().backward()
    shared_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    ref_lp_rows, ref_ent_rows = direct_log_probs(model, prompts, responses, temperature=temperature)
    ref_lp, ref_ent = to_layout(ref_lp_rows, width), to_layout(ref_ent_rows, width)
    (ref_lp * adv + 0.1 * ref_ent * adv_ent).sum().backward()

    torch.testing.assert_close(lp, ref_lp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-5, rtol=1e-5)
    valid = response_layout_mask(packed.response_lengths, width).bool()
    assert (lp[~valid] == 0).all() and (ent[~valid] == 0).all()
    for k, p in model.named_parameters():
        torch.testing.assert_close(shared_grads[k], p.grad, atol=1e-5, rtol=1e-4, msg=k)
    assert any(v.abs().sum() > 0 for v in shared_grads.values())


def test_rejects_flash_attention_config():
    class Cfg:
        _attn_implementation = "flash_attention_2"

    class M(torch.nn.Module):
        config = Cfg()

    with pytest.raises(ValueError, match="flash_attention_2"):
        check_attention_implementation(M())
    wrapper = torch.nn.Module()
    wrapper.module = M()   # a DeepSpeed engine exposes the HF model as .module
    with pytest.raises(ValueError, match="sdpa"):
        check_attention_implementation(wrapper)


def test_random_rows_single_groups_match(tiny_llama):
    """Every row its own group (no sharing) is still exact: the packing degenerates to the row layout."""
    model = load(tiny_llama, "sdpa")
    prompts, responses = random_rows(5, [3, 1, 4], [2, 5, 1])
    packed = pack_groups(prompts, responses, [0, 1, 2], pad_id=0)
    with torch.no_grad():
        lp, ent = shared_prefix_log_probs(model, packed, 5)
        ref_lp, ref_ent = direct_log_probs(model, prompts, responses)
    torch.testing.assert_close(lp, to_layout(ref_lp, 5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, to_layout(ref_ent, 5), atol=1e-5, rtol=1e-5)


def test_bf16_mask_no_nans(tiny_llama):
    """In bf16 the mask is built in bf16 (finfo(bf16).min, no -inf); padded rows give no NaNs."""
    model = load(tiny_llama, "sdpa").to(torch.bfloat16)
    prompts, responses, gids = grouped_batch()
    packed = pack_groups(prompts, responses, gids, pad_id=0)
    lp, ent = shared_prefix_log_probs(model, packed, 8)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    lp.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        ref = to_layout(direct_log_probs(model, prompts, responses)[0], 8)
    torch.testing.assert_close(lp.detach(), ref, atol=0.3, rtol=0.05)


@pytest.mark.parametrize("zero_rows", [False, True])
def test_logits_only_at_selects_hidden_states_before_the_head(tiny_llama, zero_rows):
    """The forward under ``logits_only_at`` returns the full forward's logits at the chosen (row, position)
    pairs, [N, V], and the gradient of a loss on them equals the gradient through the full logits."""
    from hicra_rl.learner.sequences import logits_only_at

    model = load(tiny_llama, "sdpa")
    ids = torch.randint(1, 49152, (3, 9), generator=torch.Generator().manual_seed(0))
    rows, cols = torch.tensor([0, 0, 2, 1, 2]), torch.tensor([0, 3, 4, 2, 1])  # cols within the kept 5 positions
    if zero_rows:
        rows, cols = rows[:0], cols[:0]
    w = torch.randn(len(rows), 49152, generator=torch.Generator().manual_seed(1))
    full = model(input_ids=ids, logits_to_keep=5).logits
    (full[rows, cols] * w).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with logits_only_at(model, rows, cols):
        sel = model(input_ids=ids, logits_to_keep=5).logits
    assert sel.shape == (len(rows), 49152)
    assert torch.allclose(sel, full[rows, cols].detach(), atol=1e-5)
    if len(rows):
        (sel * w).sum().backward()
        for n, p in model.named_parameters():
            scale = float(want[n].abs().max())   # the tied embedding's gradient reaches ~500 here
            assert float((p.grad - want[n]).abs().max()) <= 1e-5 * scale, n
    # the hook is gone afterwards
    assert model(input_ids=ids, logits_to_keep=5).logits.shape == (3, 5, 49152)


def test_logits_only_at_needs_an_output_head():
    from hicra_rl.learner.sequences import logits_only_at

    with pytest.raises(ValueError, match="Linear has no output embedding"):
        with logits_only_at(torch.nn.Linear(2, 2), torch.tensor([0]), torch.tensor([0])):
            pass
