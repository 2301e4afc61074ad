"""The pure maths of learned rewards, on hand-computed values: the Bradley–Terry loss and its gradient, pair
accuracy, how ``reward.source`` combines a reward model's score with the verifier's reward (gated's
semantics, non-finite scores), the agreement metric, and ``hicra-rm pairs``' pair building."""
import math

import pytest
import torch

from hicra_rl.algo.bradley_terry import bradley_terry_loss, pair_accuracy
from hicra_rl.rewards.combine import (
    NonFiniteScoresError,
    combine_rewards,
    model_reward_metrics,
    model_verifier_agreement,
    sigmoid,
)
from hicra_rl.rm import build_pairs, pair_batches

NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------------------------ Bradley–Terry
def test_bt_loss_and_gradient_by_hand():
    chosen = torch.tensor([0.0, 1.0], requires_grad=True)
    rejected = torch.tensor([0.0, -1.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    # pair 1: margin 0 -> -log sigma(0) = log 2 = 0.693147; pair 2: margin 2 -> log(1 + e^-2) = 0.126928
    assert float(loss.detach()) == pytest.approx((0.693147 + 0.126928) / 2, abs=1e-6)
    loss.backward()
    # d/d chosen_k = -sigma(-margin_k) / 2: -0.5 / 2 and -0.119203 / 2; rejected: the opposite
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.25, -0.0596015]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rejected.grad, torch.tensor([0.25, 0.0596015]), atol=1e-6, rtol=0)


def test_bt_loss_normalizer_and_large_margins():
    c, r = torch.tensor([3.0]), torch.tensor([1.0])
    # a global normaliser (the mini-batch's pairs over all micro-batches and ranks): sum / n
    assert float(bradley_terry_loss(c, r, normalizer=4)) == pytest.approx(math.log1p(math.exp(-2.0)) / 4, abs=1e-7)
    # softplus form: no overflow either way
    assert float(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1000.0]))) == pytest.approx(1000.0)
    assert float(bradley_terry_loss(torch.tensor([1000.0]), torch.tensor([0.0]))) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_pair_accuracy_counts_ties_half():
    assert pair_accuracy([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 4.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert math.isnan(pair_accuracy([], []))


# ------------------------------------------------------------------------------------------ combination
V = [1.0, 0.0, 1.0, 0.0]          # verifier rewards of two groups of two
ACC = [True, False, True, False]
M = [0.0, 2.0, -1.0, 0.5]         # reward-model scores
G = [0, 0, 1, 1]


def test_each_source_by_hand():
    assert combine_rewards("verifier", V, ACC, M, 2.0, G).rewards == V
    assert combine_rewards("verifier", V, ACC, None, 2.0, G).rewards == V  # no model needed
    assert combine_rewards("model", V, ACC, M, 2.0, G).rewards == [0.0, 4.0, -2.0, 1.0]
    assert combine_rewards("sum", V, ACC, M, 2.0, G).rewards == [1.0, 4.0, -1.0, 1.0]
    gated = combine_rewards("gated", V, ACC, M, 2.0, G).rewards
    # accepted: 1 + 2 * sigmoid(m); rejected: the verifier's 0, whatever the model says
    assert gated == pytest.approx([1.0 + 2 * 0.5, 0.0, 1.0 + 2 * 0.268941, 0.0], abs=1e-6)


def test_gated_keeps_every_accepted_response_above_every_rejected_one():
    """The model only re-ranks what the verifier accepted: a very negative score still leaves an accepted
    response above its own verifier reward, and a rejected one with a huge score earns nothing."""
    out = combine_rewards("gated", [1.0, 1.0, 0.0], [True, True, False], [-5.0, 3.0, 1e6], 1.0, [0, 0, 0]).rewards
    assert out[0] > 1.0 and out[1] == pytest.approx(1.0 + sigmoid(3.0)) and out[2] == 0.0
    assert min(out[:2]) > out[2]
    # a shaped verifier reward (e.g. an overlong penalty) is kept under the bonus
    assert combine_rewards("gated", [0.75], [True], [0.0], 1.0, [0]).rewards == [1.25]
    # sum, by contrast, lets the model overturn the verifier
    assert combine_rewards("sum", [1.0, 0.0], [True, False], [-5.0, 5.0], 1.0, [0, 0]).rewards == [-4.0, 5.0]


def test_sigmoid_is_stable():
    assert sigmoid(0.0) == 0.5 and sigmoid(800.0) == 1.0 and sigmoid(-800.0) == 0.0
    assert sigmoid(2.0) == pytest.approx(0.880797, abs=1e-6)


def test_a_nonfinite_score_gets_its_groups_mean_never_zero():
    # group 0: scores [nan, 1, 3] under "model" (w = 1): the nan one gets mean(1, 3) = 2, not 0
    out = combine_rewards("model", [0.0] * 4, [False] * 4, [NAN, 1.0, 3.0, INF], 1.0, [0, 0, 0, 1])
    assert out.rewards[:3] == [2.0, 1.0, 3.0] and out.nonfinite == 2
    assert out.rewards[3] == 0.0  # group 1 has nothing finite: a constant (advantage 0), counted
    # the group mean is unchanged, so the grpo_mean advantage of the filled response is exactly 0
    assert sum(out.rewards[:3]) / 3 == out.rewards[0]
    # sum: the fill is the mean of the other responses' combined rewards
    assert combine_rewards("sum", [1.0, 0.0, 1.0], [True, False, True], [NAN, 1.0, 2.0], 1.0, [0, 0, 0]).rewards \
        == [2.0, 1.0, 3.0]
    # gated only needs the scores of accepted responses: a nan on a rejected one is not used (not counted)
    out = combine_rewards("gated", [1.0, 0.0], [True, False], [0.0, NAN], 1.0, [0, 0])
    assert out.rewards == [1.5, 0.0] and out.nonfinite == 0


def test_every_needed_score_nonfinite_is_an_error():
    with pytest.raises(NonFiniteScoresError, match="no finite score for any of the 2 responses"):
        combine_rewards("model", [0.0, 1.0], [False, True], [NAN, NAN], 1.0, [0, 0])
    with pytest.raises(ValueError, match="not one of"):
        combine_rewards("learned", V, ACC, M, 1.0, G)
    with pytest.raises(ValueError, match="needs one model score per response"):
        combine_rewards("sum", V, ACC, M[:3], 1.0, G)


# ------------------------------------------------------------------------------------------ metrics
def test_agreement_is_the_pooled_within_group_auc():
    scores = [3.0, 1.0, 2.0, 0.5, 0.5, 9.0, 9.0, NAN]
    correct = [True, False, False, True, False, True, True, False]
    groups = [0, 0, 0, 1, 1, 2, 2, 2]
    # group 0: (3 > 1) (3 > 2): 2 agreeing pairs; group 1: a tie: 1/2; group 2: its incorrect response's score is
    # nan: no finite mixed pair -> 2.5 / 3
    assert model_verifier_agreement(scores, correct, groups) == (pytest.approx(2.5 / 3), 3)
    reversed_ = model_verifier_agreement([0.0, 1.0], [True, False], [0, 0])
    assert reversed_ == (0.0, 1)
    agreement, pairs = model_verifier_agreement([1.0, 2.0], [True, True], [0, 0])  # no mixed group
    assert math.isnan(agreement) and pairs == 0


def test_model_reward_metrics_by_hand():
    m = model_reward_metrics([1.0, 3.0, NAN, 0.0], [True, False, True, False], [0, 0, 1, 1], source="gated")
    assert m["reward/model_mean"] == pytest.approx(4 / 3)
    assert m["reward/model_std"] == pytest.approx(math.sqrt(((1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2 + (4 / 3) ** 2) / 3))
    assert m["reward/model_verifier_agreement"] == 0.0 and m["reward/model_verifier_pairs"] == 1.0
    assert m["reward/model_nonfinite"] == 1.0 and m["reward/model_nonfinite_used"] == 1.0  # accepted: gated used it
    assert model_reward_metrics([NAN], [False], [0], source="gated")["reward/model_nonfinite_used"] == 0.0


# ------------------------------------------------------------------------------------------ pairs
def test_build_pairs_pairs_distinct_correct_and_incorrect_texts():
    texts = ["right A", "wrong B", "right A", "wrong C", "only right", "only right 2"]
    correct = [True, False, True, False, True, True]
    groups = [0, 0, 0, 0, 1, 1]
    pairs = build_pairs(["P0", "P1"], ["q0", "q1"], texts, correct, groups, max_per_problem=5, seed=0)
    # group 0: one distinct right text x two wrong ones; group 1 has no wrong answer: no pair
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("right A", "wrong B"), ("right A", "wrong C")]
    assert {p["prompt"] for p in pairs} == {"P0"} and {p["id"] for p in pairs} == {"q0-p0", "q0-p1"}
    capped = build_pairs(["P0", "P1"], ["q0", "q1"], texts, correct, groups, max_per_problem=1, seed=0)
    assert len(capped) == 1
    # deterministic for a seed
    assert capped == build_pairs(["P0", "P1"], ["q0", "q1"], texts, correct, groups, max_per_problem=1, seed=0)


def test_pair_batches_cover_every_pair_once_per_epoch():
    batches = pair_batches(10, 4, seed=0, epoch=1)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(i for b in batches for i in b) == list(range(10))
    assert pair_batches(10, 4, seed=0, epoch=2) != batches  # reshuffled each epoch
    # two ranks: every batch splits evenly (the odd remainder is dropped)
    assert [len(b) for b in pair_batches(9, 4, seed=0, epoch=1, world=2)] == [4, 4]
