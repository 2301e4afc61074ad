"""Does the optimizer explain the strategy-choice result?  HICRA / GRPO slope of a toy strategy policy, SGD vs Adam.

    python benchmarks/law_optimizer_sim.py [--runs 200] [--steps 16] [--alpha 1.0]

docs/hicra_law.md: in expectation HICRA's *gradient* on the strategy decision is GRPO's times 1 + α(1 − 2p̄).
On the strat_hard testbed (p̄ ≈ 0.25, α = 1: law 1.5) the measured log-odds slope ratio was 0.81 (3 seeds).
An optimizer step is not the gradient: AdamW divides each parameter's step by the root of its running squared
gradient, so a gradient scaled by c moves a parameter the same distance, and a noisier gradient (HICRA at α = 1
puts weight 2A on successes' planning tokens and 0 on failures') moves it *less*.

This trains a toy policy through the project's own ``hicra_step_advantages`` and ``ppo_clip_loss`` (token-mean,
on-policy): a decision token (strategy s ~ softmax(θ), tagged planning; success rate p_s) followed by execution
tokens drawn from their own categorical (φ).  Two parameterisations:

- ``separate``: θ and φ are distinct parameters (Adam normalises the strategy gradient by itself);
- ``shared``: θ = W_θ u and φ = W_φ u for one shared vector u (random fixed maps), so as in an LM the
  strategy and execution gradients land on the same parameters and share Adam's second moment.

For each (parameterisation, optimizer, α) it runs ``--runs`` seeds of ``--steps`` steps (16 prompts × 4, the
testbed's batch), fits each run's least-squares slope of logit π_better per step, and prints HICRA / GRPO with
its standard error (common random numbers: run i of both arms uses the same seed).  Learning rates are chosen
so GRPO's slope is near the testbed's (~0.3 a step).  The start and success rates are the hard testbed's cold
start (left to right 0.70 of responses, accuracy 0.36; direct 0.30, 0.06).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from hicra_rl.algo.advantages import hicra_step_advantages
from hicra_rl.algo.losses import PolicyLossConfig, ppo_clip_loss
from hicra_rl.law import hicra_over_grpo_push

PI0 = (0.30, 0.70)      # (direct, left to right): the better strategy is index 1
P_SUCCESS = (0.06, 0.36)
EXEC_VOCAB = 8
HIDDEN = 32


class ToyPolicy(torch.nn.Module):
    def __init__(self, shared: bool, gen: torch.Generator):
        super().__init__()
        self.shared = shared
        logit0 = torch.tensor(PI0, dtype=torch.float64).log()
        if shared:
            self.w_theta = torch.randn(2, HIDDEN, generator=gen, dtype=torch.float64) / math.sqrt(HIDDEN)
            self.w_phi = torch.randn(EXEC_VOCAB, HIDDEN, generator=gen, dtype=torch.float64) / math.sqrt(HIDDEN)
            self.u = torch.nn.Parameter(torch.zeros(HIDDEN, dtype=torch.float64))
            self.bias = logit0  # fixed: the start policy
        else:
            self.theta = torch.nn.Parameter(logit0.clone())
            self.phi = torch.nn.Parameter(torch.zeros(EXEC_VOCAB, dtype=torch.float64))

    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared:
            return self.bias + self.w_theta @ self.u, self.w_phi @ self.u
        return self.theta, self.phi

    def better_logodds(self) -> float:
        with torch.no_grad():
            theta, _ = self.logits()
            return float(theta[1] - theta[0])


def train_run(shared: bool, optimizer: str, lr: float, alpha: float, seed: int, steps: int,
              prompts: int = 16, group: int = 4) -> list[float]:
    """logit π_better after each step of one run (index 0 = the start)."""
    gen = torch.Generator().manual_seed(10_000 + seed)  # the same toy maps for every arm of a seed
    policy = ToyPolicy(shared, gen)
    opt = (torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0) if optimizer == "adam"
           else torch.optim.SGD(policy.parameters(), lr=lr))
    sampler = torch.Generator().manual_seed(seed)
    cfg = PolicyLossConfig()
    out = [policy.better_logodds()]
    b = prompts * group
    for _ in range(steps):
        theta, phi = policy.logits()
        with torch.no_grad():
            strategy = torch.multinomial(torch.softmax(theta, -1), b, replacement=True, generator=sampler)
            reward = (torch.rand(b, generator=sampler, dtype=torch.float64)
                      < torch.tensor(P_SUCCESS, dtype=torch.float64)[strategy]).double()
            n_exec = 3 + 3 * strategy + torch.randint(0, 3, (b,), generator=sampler)  # the better one is longer
            exec_tokens = torch.multinomial(torch.softmax(phi, -1), b * int(n_exec.max()), replacement=True,
                                            generator=sampler).view(b, -1)
        lengths = (1 + n_exec).tolist()
        adv = hicra_step_advantages(reward, torch.arange(prompts).repeat_interleave(group),
                                    [[True] + [False] * (n - 1) for n in lengths], lengths,
                                    estimator="grpo_mean", alpha=alpha)
        lp = torch.cat([torch.log_softmax(theta, -1)[strategy][:, None],
                        torch.log_softmax(phi, -1)[exec_tokens]], 1)[:, : adv.token.shape[1]]
        loss, _ = ppo_clip_loss(lp, lp.detach(), adv.token, adv.response_mask, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(policy.better_logodds())
    return out


def slope(ys: list[float]) -> float:
    n = len(ys)
    xm, ym = (n - 1) / 2, sum(ys) / n
    return sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sum((i - xm) ** 2 for i in range(n))


def ratio_and_se(h: list[float], g: list[float]) -> tuple[float, float]:
    """mean(h) / mean(g) over paired runs and its delta-method standard error."""
    n = len(h)
    r = sum(h) / sum(g)
    resid = [a - r * b for a, b in zip(h, g)]
    return r, math.sqrt(n / (n - 1) * sum(x * x for x in resid)) / abs(sum(g))


LEARNING_RATES = {("separate", "sgd"): 25.0, ("separate", "adam"): 0.17,
                  ("shared", "sgd"): 25.0, ("shared", "adam"): 0.09}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--alpha", type=float, default=1.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pbar = sum(a * b for a, b in zip(PI0, P_SUCCESS))
    print(f"start π = {PI0}, success = {P_SUCCESS}, p̄ at the start {pbar:.3f}; law at α = {args.alpha}: "
          f"{hicra_over_grpo_push(args.alpha, pbar):.3f} (the gradient ratio at the start)")
    print(f"{args.runs} paired runs × {args.steps} steps of 16 prompts × 4 per cell\n")
    print("| parameters | optimizer | lr | GRPO slope | HICRA slope | HICRA / GRPO ± SE |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    t0 = time.perf_counter()
    for (shared, optimizer), lr in LEARNING_RATES.items():
        g = [slope(train_run(shared == "shared", optimizer, lr, 0.0, s, args.steps)) for s in range(args.runs)]
        h = [slope(train_run(shared == "shared", optimizer, lr, args.alpha, s, args.steps)) for s in range(args.runs)]
        r, se = ratio_and_se(h, g)
        print(f"| {shared} | {optimizer} | {lr:g} | {sum(g) / len(g):.3f} | {sum(h) / len(h):.3f} | "
              f"{r:.3f} ± {se:.3f} |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
