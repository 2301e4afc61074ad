"""The HICRA step as one pure function (`hicra_step_advantages`), checked with the real tagger on the
real SmolLM2 tokenizer: the shaped columns are exactly the response tokens inside SG occurrences."""
import re

import pytest
import torch

from hicra_rl.algo import hicra_step_advantages
from hicra_rl.strategic.tagger import PlanningTagger

LEXICON = ["let's work from left to right", "add the positive terms first"]
RESPONSES = [
    "Let's work from left to right.\n12 + 7 = 19\n19 - 4 = 15\nSo the final answer is \\boxed{15}.",
    "We can add the positive terms first and then subtract the rest.\nAdded: 12 + 7 = 19\nSo \\boxed{14}.",
    "12 + 7 - 4 = 15, so the answer is \\boxed{15}.",
    "First add the positive terms first: 19. \\boxed{3}",
]


def sg_char_spans(text: str) -> list[tuple[int, int]]:
    """Independent of the tagger: case-insensitive search of each gram at word boundaries."""
    spans = []
    for gram in LEXICON:
        spans += [(m.start(), m.end()) for m in re.finditer(r"(?<!\w)" + re.escape(gram) + r"(?!\w)", text.lower())]
    return spans


def test_shaped_columns_are_the_tokens_inside_sg_occurrences(smollm2_tokenizer):
    tok = smollm2_tokenizer
    tagger = PlanningTagger(LEXICON, tok)
    encoded = [tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in RESPONSES]
    ids = [e["input_ids"] for e in encoded]
    masks, texts, occurrences = tagger.tag_responses(ids)
    assert texts == RESPONSES  # decoded from the same ids the mask is computed on
    assert [len(o) for o in occurrences] == [1, 1, 0, 1]

    rewards, groups, alpha = [1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], 0.2
    out = hicra_step_advantages(rewards, groups, masks, [len(i) for i in ids], estimator="grpo_mean", alpha=alpha)
    width = max(len(i) for i in ids)
    assert out.token.shape == out.response_mask.shape == out.planning_mask.shape == (4, width)
    assert out.sequence.tolist() == [0.5, -0.5, 0.5, -0.5]
    for row, (enc, text) in enumerate(zip(encoded, RESPONSES)):
        spans = sg_char_spans(text)
        a = out.sequence[row].item()
        n = len(enc["input_ids"])
        for col, (start, end) in enumerate(enc["offset_mapping"]):
            planning = any(start < e and s < end for s, e in spans)
            assert bool(out.planning_mask[row, col]) == planning, (row, col, text[start:end])
            expected = a + alpha * abs(a) if planning else a  # 0.6 / 0.5 for A = 0.5, -0.4 / -0.5 for A = -0.5
            assert out.token[row, col].item() == pytest.approx(expected)
        assert out.response_mask[row, :n].eq(1).all() and out.response_mask[row, n:].eq(0).all()
        assert out.token[row, n:].eq(0).all() and not out.planning_mask[row, n:].any()
    # the decision phrase of response 0 is tagged, its arithmetic is not
    assert 0 < int(out.planning_mask[0].sum()) < len(ids[0])


def test_alpha_zero_is_grpo_and_bad_masks_are_named():
    masks = [[True, False], [False, False, True]]
    out = hicra_step_advantages([1.0, 0.0], [0, 0], masks, [2, 3], alpha=0.0)
    assert out.token.tolist() == [[0.5, 0.5, 0.0], [-0.5, -0.5, -0.5]]
    shaped = hicra_step_advantages([1.0, 0.0], [0, 0], masks, [2, 3], alpha=0.2)
    torch.testing.assert_close(shaped.token, torch.tensor([[0.6, 0.5, 0.0], [-0.5, -0.5, -0.4]]))
    std = hicra_step_advantages(torch.tensor([1.0, 0.0]), [0, 0], masks, [2, 3], estimator="grpo_std", alpha=0.0,
                                eps=0.0)
    assert std.sequence.tolist() == pytest.approx([0.7071068, -0.7071068])  # 0.5 / sqrt(0.5)
    with pytest.raises(ValueError, match="response 1: planning mask has 3 entries for 2 response tokens"):
        hicra_step_advantages([1.0, 0.0], [0, 0], masks, [2, 2])
