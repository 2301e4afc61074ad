"""HICRA's expected-gradient law (docs/hicra_law.md), checked by Monte Carlo through the project's own code.

A one-decision "strategy" policy: each response is a decision token (strategy s ~ softmax(theta), planning) and a
few execution tokens (not planning, log-probs from separate parameters); the reward is Bernoulli(p_s).  Groups of G
responses go through ``hicra_step_advantages`` (GRPO advantages + Eq. 6) and ``ppo_clip_loss`` (token-mean, the
default clip settings, on-policy: old log-probs = the current ones, detached).  In expectation the gradient on the
strategy logits is GRPO's times 1 + alpha (1 - 2 p_bar), p_bar = sum_s pi_s p_s, exactly at any G, for the
mean-centred and the std-normalised estimator alike.  The measured ratio must match it within 4 standard errors,
and the same comparison must reject the wrong shapings A (1 + alpha) and A.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from functools import cache

import pytest
import torch

import hicra_rl.algo.advantages as advantages_module
from hicra_rl.algo.advantages import hicra_step_advantages
from hicra_rl.algo.losses import PolicyLossConfig, ppo_clip_loss

G = 4              # group size
N_GROUPS = 4096    # 16384 responses per case: standard error of the ratio ~0.005 at alpha 0.2, ~0.025 at 1
EXEC_VOCAB = 5     # execution tokens: their own categorical, independent of theta
TOL_SE = 4.0       # |measured - law| < 4 SE

# case -> (pi, p): strategy probabilities and success rates; strategy 1 is the better one
CASES = {
    "p_bar_0.25": ((0.5, 0.5), (0.1, 0.4)),
    "p_bar_0.78": ((0.4, 0.6), (0.6, 0.9)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of groups are tensors of ~10^5 elements: one intra-op thread is ~20x faster here than two
    on a loaded 2-core machine (thread hand-off, not arithmetic, dominates)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ the law
def p_bar(pi, p) -> float:
    return sum(a * b for a, b in zip(pi, p))


def law_ratio(pi, p, alpha: float) -> float:
    """E[HICRA's strategy gradient] / E[GRPO's] = 1 + alpha (1 - 2 p_bar), for every strategy logit."""
    return 1.0 + alpha * (1.0 - 2.0 * p_bar(pi, p))


def grpo_push(pi, p, a: int, estimator: str, G: int = G) -> float:
    """E[A_i (1[s_i = a] - pi_a)] per response: the expected ascent on theta_a (before the 1/tokens factor).

    grpo_mean: A_i = (G-1)/G (R_i - mean of the others), so E[A_i | s_i] = (G-1)/G (p_s - p_bar).
    grpo_std: with K' ~ Bin(G-1, p_bar) successes among the others and sigma_k the unbiased std of k ones in G,
    a1 = E[A | R = 1] = E[(G-1-K') / (G sigma_{K'+1})] and E[A | s] = a1 (p_s - p_bar) / (1 - p_bar)."""
    pb = p_bar(pi, p)
    if estimator == "grpo_mean":
        scale = (G - 1) / G
    else:
        def sigma(k):
            return math.sqrt(k * (G - k) / (G * (G - 1)))
        a1 = sum(math.comb(G - 1, k) * pb**k * (1 - pb) ** (G - 1 - k) * (G - 1 - k) / (G * sigma(k + 1))
                 for k in range(G - 1))
        scale = a1 / (1 - pb)
    return scale * pi[a] * (p[a] - pb)


# ------------------------------------------------------------------------------------------------ sampling
@dataclass
class Groups:
    strategy: torch.Tensor        # [B] long
    reward: torch.Tensor          # [B] 0/1
    group: torch.Tensor           # [B] long, G consecutive responses per group
    exec_tokens: torch.Tensor     # [B, W-1] execution token ids (padding past each length)
    planning_masks: list          # ragged: [True] + [False] * n_exec
    lengths: list                 # 1 + n_exec


def make_groups(strategy: torch.Tensor, reward: torch.Tensor, n_exec: torch.Tensor, exec_tokens: torch.Tensor,
                group_size: int = G) -> Groups:
    n = n_exec.tolist()
    return Groups(strategy, reward.float(), torch.arange(strategy.numel() // group_size).repeat_interleave(group_size),
                  exec_tokens, [[True] + [False] * k for k in n], [1 + k for k in n])


@cache
def sample(case: str, n_groups: int = N_GROUPS, seed: int = 0) -> Groups:
    pi, p = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    b = n_groups * G
    strategy = torch.multinomial(torch.tensor(pi, dtype=torch.float64), b, replacement=True, generator=gen)
    reward = (torch.rand(b, generator=gen, dtype=torch.float64) < torch.tensor(p, dtype=torch.float64)[strategy])
    # the better strategy writes longer execution: token-mean weighs every token 1 / (batch tokens) all the same
    n_exec = 2 + 2 * strategy + torch.randint(0, 3, (b,), generator=gen)
    return make_groups(strategy, reward, n_exec, torch.randint(0, EXEC_VOCAB, (b, int(n_exec.max())), generator=gen))


# ------------------------------------------------------------------------------------------------ the harness
def token_advantages(g: Groups, alpha: float, estimator: str):
    return hicra_step_advantages(g.reward, g.group, g.planning_masks, g.lengths, estimator=estimator, alpha=alpha)


def policy_loss(decision_lp: torch.Tensor, g: Groups, adv, phi: torch.Tensor, **kw) -> torch.Tensor:
    """ppo_clip_loss over [decision token | execution tokens], on-policy, token-mean, default clipping."""
    exec_lp = torch.log_softmax(phi, -1)[g.exec_tokens]
    log_probs = torch.cat([decision_lp[:, None], exec_lp], 1)[:, : adv.token.shape[1]]
    cfg = PolicyLossConfig()
    assert cfg.agg_mode == "token-mean"
    loss, _ = ppo_clip_loss(log_probs, log_probs.detach(), adv.token, adv.response_mask, cfg, **kw)
    return loss


def per_group_push(g: Groups, pi, alpha: float, estimator: str, shared: bool = False) -> torch.Tensor:
    """Each group's ascent on theta_1, scaled to "per response": x_g = -dL/dtheta_g[1] * tokens / group size.

    theta is one leaf per group (all equal to log pi), so dL/dtheta_g is group g's own contribution and
    their sum is the gradient of a shared theta (``shared=True`` returns that sum, computed with one theta)."""
    adv = token_advantages(g, alpha, estimator)
    n_groups = int(g.group.max()) + 1
    size = g.strategy.numel() // n_groups
    logits = torch.tensor(pi, dtype=torch.float64).log()
    theta = (logits if shared else logits.repeat(n_groups, 1)).requires_grad_()
    phi = torch.zeros(EXEC_VOCAB, dtype=torch.float64, requires_grad=True)
    lp = torch.log_softmax(theta, -1)
    decision_lp = lp[g.strategy] if shared else lp[g.group, g.strategy]
    policy_loss(decision_lp, g, adv, phi).backward()
    n_tokens = float(adv.response_mask.sum())
    grad = -theta.grad[..., 1] * n_tokens / size
    assert phi.grad is not None and torch.isfinite(phi.grad).all()
    return grad


def ratio_and_se(h: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """sum(h) / sum(x) over independent units and its delta-method standard error."""
    n = h.numel()
    r = float(h.sum() / x.sum())
    resid = h - r * x
    return r, math.sqrt(n / (n - 1) * float((resid * resid).sum())) / abs(float(x.sum()))


def agrees(measured: float, se: float, law: float) -> bool:
    return abs(measured - law) < TOL_SE * se


@cache
def pushes(case: str, alpha: float, estimator: str) -> torch.Tensor:
    """Per-group pushes with the project's shaping (cached: the wrong-shaping test reuses them)."""
    return per_group_push(sample(case), CASES[case][0], alpha, estimator)


def measure(case: str, alpha: float, estimator: str) -> tuple[float, float]:
    return ratio_and_se(pushes(case, alpha, estimator), pushes(case, 0.0, estimator))


# ------------------------------------------------------------------------------------------------ tests
def test_per_group_thetas_sum_to_the_shared_gradient():
    g = sample("p_bar_0.25", n_groups=64, seed=1)
    pi = CASES["p_bar_0.25"][0]
    per_group = per_group_push(g, pi, 0.2, "grpo_mean")
    shared = per_group_push(g, pi, 0.2, "grpo_mean", shared=True)
    assert torch.allclose(per_group.sum(), shared, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["grpo_mean", "grpo_std"])
@pytest.mark.parametrize("group_size", [2, 4, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_expectation_by_enumeration(case, group_size, estimator):
    """No sampling: every group outcome (strategy, reward per response: 4^G groups) through the same code,
    weighted by its probability.  The law is exact at finite G (the (G-1)/G factors cancel)."""
    pi, p = CASES[case]
    outcomes = list(itertools.product([(s, r) for s in range(2) for r in range(2)], repeat=group_size))
    weight = torch.tensor([math.prod(pi[s] * (p[s] if r else 1 - p[s]) for s, r in o) for o in outcomes],
                          dtype=torch.float64)
    flat = torch.tensor([sr for o in outcomes for sr in o])
    strategy, reward = flat[:, 0], flat[:, 1]
    n_exec = 1 + 2 * strategy
    g = make_groups(strategy, reward, n_exec, torch.zeros(len(flat), 3, dtype=torch.long), group_size)
    expected = {alpha: float(weight @ per_group_push(g, pi, alpha, estimator)) for alpha in (0.0, 0.2, 1.0)}
    assert expected[0.0] == pytest.approx(grpo_push(pi, p, 1, estimator, group_size), rel=1e-5)
    for alpha in (0.2, 1.0):
        assert expected[alpha] / expected[0.0] == pytest.approx(law_ratio(pi, p, alpha), rel=1e-5)


@pytest.mark.parametrize("estimator", ["grpo_mean", "grpo_std"])
@pytest.mark.parametrize("case", list(CASES))
def test_grpo_push_matches_its_expectation(case, estimator):
    """The harness itself: GRPO's mean ascent per response on theta_1 is E[A (1[s=1] - pi_1)]."""
    pi, p = CASES[case]
    x = pushes(case, 0.0, estimator)
    mean, se = float(x.mean()), float(x.std()) / math.sqrt(x.numel())
    expected = grpo_push(pi, p, 1, estimator)
    assert abs(mean - expected) < TOL_SE * se, (mean, expected, se)
    assert se < 0.05 * abs(expected)


@pytest.mark.parametrize("estimator", ["grpo_mean", "grpo_std"])
@pytest.mark.parametrize("alpha", [0.2, 1.0])
@pytest.mark.parametrize("case", list(CASES))
def test_hicra_over_grpo_follows_the_law(case, alpha, estimator):
    pi, p = CASES[case]
    law = law_ratio(pi, p, alpha)
    measured, se = measure(case, alpha, estimator)
    print(f"{case} alpha={alpha} {estimator}: HICRA/GRPO = {measured:.4f} +- {se:.4f}, law {law:.4f}")
    assert agrees(measured, se, law), (measured, se, law)
    # power: the band of the law is far from what the wrong shapings give (1 + alpha and 1)
    assert TOL_SE * se < 0.5 * min(abs(law - (1.0 + alpha)), abs(law - 1.0)), (se, law)


def _times_one_plus_alpha(advantages, planning_mask, alpha=0.2):
    adv = advantages[:, None].expand(planning_mask.shape) if advantages.dim() == 1 else advantages
    return adv * (1.0 + alpha * planning_mask.to(adv.dtype))


def _plain(advantages, planning_mask, alpha=0.2):
    adv = advantages[:, None].expand(planning_mask.shape) if advantages.dim() == 1 else advantages
    return adv.clone()


@pytest.mark.parametrize("wrong,its_ratio", [(_times_one_plus_alpha, lambda a: 1.0 + a), (_plain, lambda a: 1.0)],
                         ids=["A(1+alpha)", "A"])
@pytest.mark.parametrize("case,alpha", [("p_bar_0.25", 0.2), ("p_bar_0.78", 0.2), ("p_bar_0.78", 1.0)])
def test_wrong_shapings_are_rejected(monkeypatch, case, alpha, wrong, its_ratio):
    """The same comparison fails when planning tokens get A (1 + alpha) or A instead of A + alpha |A|.

    With these shapings the decision token's advantage is a fixed multiple of GRPO's, so on the same samples
    the ratio is exactly 1 + alpha or 1 and its own SE is 0; the band it is judged against is the one the
    correct shaping's measurement gets on these samples (the larger of the two SEs)."""
    pi, p = CASES[case]
    _, se_correct = measure(case, alpha, "grpo_mean")
    monkeypatch.setattr(advantages_module, "hicra_advantages", wrong)
    measured, se = ratio_and_se(per_group_push(sample(case), pi, alpha, "grpo_mean"), pushes(case, 0.0, "grpo_mean"))
    se = max(se, se_correct)
    print(f"{case} alpha={alpha} {wrong.__name__}: HICRA/GRPO = {measured:.4f} +- {se:.4f}, "
          f"law {law_ratio(pi, p, alpha):.4f}")
    assert not agrees(measured, se, law_ratio(pi, p, alpha)), (measured, se)
    assert abs(measured - its_ratio(alpha)) < 1e-9 + TOL_SE * se, (measured, se)  # the harness sees the shaping


# ------------------------------------------------------------------------------------------------ a tiny model
def test_law_through_a_tiny_transformer():
    """The decision is a random tiny Llama's next token after a fixed prompt (8 strategies = its vocabulary).
    In expectation every parameter's HICRA gradient is GRPO's times the law; compared along the expected
    GRPO direction d = J^T v, v_s = pi_s (p_s - p_bar), J = d(logits)/d(parameters), groups as the units."""
    transformers = pytest.importorskip("transformers")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    vocab, alpha, n_groups = 8, 1.0, 2048
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                   initializer_range=0.5)
    model = transformers.LlamaForCausalLM(cfg).double()
    prompt = torch.tensor([[1, 2, 3]])

    def decision_logits():
        return model(prompt).logits[0, -1]

    with torch.no_grad():
        pi = torch.softmax(decision_logits(), -1)
    p = torch.linspace(0.3, 0.95, vocab, dtype=torch.float64)
    pb = float((pi * p).sum())
    law = 1.0 + alpha * (1.0 - 2.0 * pb)

    gen = torch.Generator().manual_seed(3)
    b = n_groups * G
    strategy = torch.multinomial(pi, b, replacement=True, generator=gen)
    reward = (torch.rand(b, generator=gen, dtype=torch.float64) < p[strategy]).float()
    n_exec = 2 + torch.randint(0, 3, (b,), generator=gen)
    g = Groups(strategy, reward, torch.arange(n_groups).repeat_interleave(G),
               torch.randint(0, EXEC_VOCAB, (b, int(n_exec.max())), generator=gen),
               [[True] + [False] * n for n in n_exec.tolist()], [1 + n for n in n_exec.tolist()])

    params = list(model.parameters())

    def flat_grad():
        out = torch.cat([q.grad.flatten() for q in params])
        model.zero_grad(set_to_none=True)
        return out

    z = decision_logits()
    jac = []  # J = dz/dw, [vocab, n_params]: 8 backward passes through one forward
    for s_ in range(vocab):
        z[s_].backward(retain_graph=True)
        jac.append(flat_grad())
    jac = torch.stack(jac)
    d = jac.T @ (pi * (p - pb))  # the expected GRPO ascent direction J^T v
    jd = jac @ d

    def projected(alpha_):
        """Per-group ascent along d (scaled per response) from one forward + backward of the model: the
        decision logits are expanded to one row per group (retain_grad gives each group's logit gradient)
        and the model's parameters get their sum."""
        adv = token_advantages(g, alpha_, "grpo_mean")
        n_tokens = float(adv.response_mask.sum())
        phi = torch.zeros(EXEC_VOCAB, dtype=torch.float64, requires_grad=True)
        rows = decision_logits().unsqueeze(0).expand(n_groups, vocab)
        rows.retain_grad()
        decision_lp = torch.log_softmax(rows, -1)[g.group, g.strategy]
        policy_loss(decision_lp, g, adv, phi).backward()
        per_group = -(rows.grad @ jd) * n_tokens / G
        along_d = -float(flat_grad() @ d) * n_tokens / G  # the model's own gradient, projected
        assert math.isclose(float(per_group.sum()), along_d, rel_tol=1e-6), (float(per_group.sum()), along_d)
        return per_group

    x, h = projected(0.0), projected(alpha)
    measured, se = ratio_and_se(h, x)
    print(f"tiny Llama, 8 strategies, p_bar={pb:.3f}, alpha={alpha}: HICRA/GRPO = {measured:.4f} +- {se:.4f}, "
          f"law {law:.4f} ({time.perf_counter() - t0:.1f} s)")
    assert agrees(measured, se, law), (measured, se, law)
    assert TOL_SE * se < 0.5 * min(abs(law - (1.0 + alpha)), abs(law - 1.0)), (se, law)
    # and GRPO's own push along d: E = (G-1)/G |d|^2 per response
    mean, mean_se = float(x.mean()), float(x.std()) / math.sqrt(n_groups)
    assert abs(mean - (G - 1) / G * float(d @ d)) < TOL_SE * mean_se, (mean, (G - 1) / G * float(d @ d), mean_se)
