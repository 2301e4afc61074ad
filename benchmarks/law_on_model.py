"""HICRA's expected-gradient law measured on the real policy, and what one optimizer step makes of it.

    python benchmarks/law_on_model.py sample  --data strat_hard [--prompts 128]   # rollouts of the cold start
    python benchmarks/law_on_model.py measure --data strat_hard [--out DIR]        # the projections below

docs/hicra_law.md: in expectation HICRA's gradient on the strategy decision is GRPO's times 1 + α(1 − 2p̄).
The strategy-choice runs (AdamW, 16 steps, 3 seeds) measured a HICRA/GRPO log-odds slope ratio of 0.81 on
strat_hard against the law's 1.51, and ``law_optimizer_sim.py`` showed on a toy why a run cannot show it
(Adam normalises the gradient's scale away; the choice saturates).  This measures the law where it lives:

1. ``sample``: one ``hicra-train`` step of the strategy-choice experiment from the cold start with
   ``--prompts`` train-role prompts x 8 and ``trainer.dump_rollouts=true``: the real rollout workers,
   verifiers and SG tagger write every response's tokens, reward and planning mask (``runs/law_on_model/<data>``).
2. ``measure``, on those rollouts and the cold start's weights (float32, no sampling, deterministic):
   - the probe: ℓ(θ) = mean over ``--probes`` held-out (eval-role) prompts of log π(better announcement) −
     log π(worse announcement), teacher-forced; the announcements are the commonest first line of each
     strategy's responses, the better strategy the one with the higher accuracy in the rollouts;
   - v = ∇ℓ (one backward), and for every response token t the directional derivative
     c_t = ∇log π(t) · v by central finite differences along v (two forwards; the step size is checked
     by halving it);
   - each prompt's 8 responses are two advantage groups of 4 (the testbed's G; the samples are independent).
     Per group k and α, the push P_k(α) = Σ_t A^α_t c_t, where A^α are the project's own
     ``hicra_step_advantages`` (A + α|A| on planning tokens).  An SGD step on the token-mean loss moves ℓ
     by lr · ΣP / N_tokens to first order, so ΣP(α) / ΣP(0) is the HICRA/GRPO ratio of the gradient on the
     decision *as the model feels it*: over the announcement's tokens (what the law is about) and over all
     tokens (other planning and execution tokens move the same weights);
   - the law's prediction for these prompts: p̄ in 1 + α(1 − 2p̄) is each prompt's success rate, and only
     prompts the policy sometimes solves push at all, so the mean accuracy is the wrong p̄.  Each group's
     GRPO push is weighted by 1 + α(1 − 2p̂'), p̂' the mean reward of the prompt's *other* half
     (independent of this group's rewards, so the estimate is unbiased); measured / law is the test;
   - 95 % CIs: bootstrap over prompts (a prompt's two halves together);
   - one optimizer step per batch of 16 groups (the testbed's step): the full gradients g(α) of the
     project's ``ppo_clip_loss`` (on-policy, token-mean) for α = 0 and 1 (α = 0.2 by linearity), and the
     first-order Δℓ = v · Δθ of SGD, SGD after clipping the gradient norm to 1 (the learner's default) and
     AdamW's first step (Δθ = −lr g/(|g| + ε): a sign step); ratio of the Δℓ summed over ``--step-batches``
     batches, bootstrap CI over batches.  One AdamW step is also applied for real and ℓ re-measured, to
     check first order.

Writes ``result.json`` and ``result.md`` to ``--out`` (default benchmarks/results/law_on_model/<data>).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from hicra_rl.law import hicra_over_grpo_push

RUNS = Path("runs/law_on_model")
RESULTS = Path("benchmarks/results/law_on_model")
COLD_START = os.path.expanduser("~/.cache/hicra-rl/cold_start/smollm2_135m-strat-v1")
ALPHAS = (0.2, 1.0)
GROUPS_PER_BATCH = 16
CLIP_NORM = 1.0
ADAM_EPS = 1e-8
MICRO = 8
GROUP_SIZE = 8   # sampled per prompt; advantages and pushes in two halves of 4 (the testbed's G)
ROLLOUTS = Path("rollouts/step-1.jsonl")   # the dump of the first step (sampled by the cold start)


# ----------------------------------------------------------------------------------------------- pure parts
def split_halves(group_ids) -> tuple[np.ndarray, np.ndarray]:
    """(half-group, prompt) index of each response: a prompt's G responses, in order, split into two halves of
    G / 2, each an advantage group of its own (as if sampled with G / 2: the samples are independent)."""
    _, prompt = np.unique(np.asarray(group_ids), return_inverse=True)
    sizes = np.bincount(prompt)
    if len(set(sizes.tolist())) != 1 or sizes[0] % 2:
        raise SystemExit(f"law_on_model: needs one even group size for every prompt, got sizes {sorted(set(sizes))}")
    seen = np.zeros(len(sizes), dtype=int)
    half = np.zeros(len(prompt), dtype=int)
    for i, x in enumerate(prompt):
        half[i] = int(seen[x] >= sizes[0] // 2)
        seen[x] += 1
    return 2 * prompt + half, prompt


def independent_law_terms(alpha: float, grpo_push: np.ndarray, pbar_other_half: np.ndarray) -> np.ndarray:
    """Per half-group: (1 + α(1 − 2p̂')) × GRPO's push, where p̂' is the *other* half's mean reward.  p̄ in the
    law is the prompt's success rate; p̂' estimates it independently of this half's rewards, so
    Σ terms / Σ push estimates the law's prediction for these prompts without bias (a half's own mean reward
    would be correlated with the push it made)."""
    return hicra_over_grpo_push(alpha, pbar_other_half) * grpo_push


def group_pushes(token_adv: np.ndarray, c: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """P_k = Σ over the responses i of group k and their tokens t of A[i, t] * c[i, t] ([B, W] each)."""
    per_response = (token_adv * c).sum(axis=1)
    return np.bincount(groups, weights=per_response, minlength=n_groups)


def bootstrap_ratio(num: np.ndarray, den: np.ndarray, draws: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Σnum / Σden and its 95 % percentile interval, resampling groups (paired: the same groups in both)."""
    rng = np.random.default_rng(seed)
    k = len(num)
    idx = rng.integers(0, k, size=(draws, k))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    ratios = ratios[np.isfinite(ratios)]   # a draw of only zero-push groups has no ratio
    lo, hi = np.percentile(ratios, [2.5, 97.5]) if len(ratios) else (math.nan, math.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(num.sum() / den.sum()), float(lo), float(hi)


def token_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in ``tokenizer.decode(ids)`` (by decoding growing prefixes)."""
    spans, prev = [], 0
    for j in range(len(ids)):
        end = len(tokenizer.decode(ids[: j + 1], skip_special_tokens=False))
        spans.append((prev, max(end, prev)))
        prev = max(end, prev)
    return spans


def announcement_mask(text: str, spans: list[tuple[int, int]], strategies: dict[str, str]) -> np.ndarray:
    """True on the tokens overlapping the first strategy announcement's phrase (the decision), else False."""
    low = text.lower()
    found = [(low.find(p.lower()), len(p)) for p in strategies.values() if low.find(p.lower()) >= 0]
    mask = np.zeros(len(spans), dtype=bool)
    if not found:
        return mask
    start, n = min(found)
    end = start + n
    for j, (a, b) in enumerate(spans):
        mask[j] = a < end and b > start
    return mask


# ------------------------------------------------------------------------------------------------- sample
def sample(args) -> int:
    run_dir = RUNS / args.data
    if (run_dir / ROLLOUTS).is_file():
        print(f"{run_dir / ROLLOUTS} exists: nothing to sample")
        return 0
    cmd = [str(Path(sys.executable).parent / "hicra-train"), "+experiment=strategy_choice", f"data={args.data}",
           "algorithm=grpo", f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={GROUP_SIZE}",
           "trainer.total_steps=1",
           "trainer.eval_every=0", "trainer.save_every=0", "trainer.dump_rollouts=true",
           f"trainer.seed={args.seed}", f"trainer.run_dir={run_dir}", f"trainer.init_checkpoint={args.model}"]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


# ------------------------------------------------------------------------------------------------ measure
def load_rollouts(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"law_on_model: {path} has no rollouts")
    return rows


def probe_prompts(run_dir: Path, tokenizer, n: int) -> list[list[int]]:
    """Token ids of the first ``n`` held-out (eval-role) prompts of the run's evaluation data."""
    from omegaconf import OmegaConf

    from hicra_rl.config import EvalDataConfig
    from hicra_rl.data.setup import load_problem_set, prompts_of

    saved = json.loads((run_dir / "config.json").read_text())
    eval_cfg = saved["eval_data"] or {**saved["data"], "seed": 0}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalDataConfig), eval_cfg))
    problems = load_problem_set(cfg, cfg.seed, role="eval")
    return [p.token_ids for p in prompts_of(cfg, tokenizer, problems).prompts[:n]]


def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, micro: int = 16,
                      grad: bool = False):
    """log π of every response token, one [len] tensor per row (micro-batched; graph kept when ``grad``)."""
    import torch

    from hicra_rl.algo.logprobs import logprobs_and_entropy
    from hicra_rl.learner.sequences import build_sequences

    out = []
    for s in range(0, len(prompts), micro):
        ids, attn, resp = build_sequences(prompts[s:s + micro], responses[s:s + micro], pad_id)
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            lp, _ = logprobs_and_entropy(logits, ids[:, 1:])
        for i, (p, r) in enumerate(zip(prompts[s:s + micro], responses[s:s + micro])):
            out.append(lp[i, len(p) - 1: len(p) - 1 + len(r)])
    return out


def probe_logodds(model, probes, better_ids, worse_ids, pad_id: int, grad: bool = False):
    """ℓ = mean over probe prompts of log π(better announcement) − log π(worse announcement)."""
    n = len(probes)
    lps = sequence_logprobs(model, probes + probes, [better_ids] * n + [worse_ids] * n, pad_id, grad=grad)
    per = [lps[i].sum() - lps[n + i].sum() for i in range(n)]
    return sum(per) / n


def flat_grad(model):
    import torch

    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def perturb(model, direction, scale: float) -> None:
    import torch

    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            n = p.numel()
            p.add_(direction[offset:offset + n].view_as(p), alpha=scale)
            offset += n


def measure(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hicra_rl.algo.advantages import hicra_step_advantages
    from hicra_rl.algo.losses import PolicyLossConfig, ppo_clip_loss
    from hicra_rl.metrics.strategies import classify_strategy

    torch.manual_seed(0)
    t0 = time.time()
    run_dir = RUNS / args.data
    rows = load_rollouts(run_dir / ROLLOUTS)
    strategies = dict(json.loads((run_dir / "config.json").read_text())["data"]["strategies"])
    tok = AutoTokenizer.from_pretrained(args.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()

    # which strategy is better here, and its announcement (the commonest first line of its responses)
    chosen = [classify_strategy(r["text"], strategies) for r in rows]
    acc = {s: float(np.mean([r["reward"] > 0.5 for r, c in zip(rows, chosen) if c == s]))
           for s in strategies if chosen.count(s)}
    share = {s: chosen.count(s) / len(rows) for s in strategies}
    better, worse = sorted(acc, key=acc.get, reverse=True)[:2]
    first_line = {s: Counter(r["text"].split("\n")[0] for r, c in zip(rows, chosen) if c == s).most_common(1)[0][0]
                  for s in (better, worse)}
    better_ids = tok(first_line[better], add_special_tokens=False).input_ids
    worse_ids = tok(first_line[worse], add_special_tokens=False).input_ids
    probes = probe_prompts(run_dir, tok, args.probes)
    print(f"{len(rows)} rollouts; better {better!r} {first_line[better]!r}, worse {worse!r} "
          f"{first_line[worse]!r}; {len(probes)} probe prompts", flush=True)

    # v = ∇ℓ
    model.zero_grad(set_to_none=True)
    ell = probe_logodds(model, probes, better_ids, worse_ids, pad_id, grad=True)
    ell.backward()
    v = flat_grad(model).detach().clone()
    model.zero_grad(set_to_none=True)
    v_norm = float(v.norm())
    print(f"ℓ = {ell.item():.4f}, |∇ℓ| = {v_norm:.3f} ({time.time() - t0:.0f} s)", flush=True)

    # c_t = ∇log π(t) · v by central differences along v / |v|: step h moves ℓ by about h |v|
    prompts = [r["prompt_ids"] for r in rows]
    responses = [r["response_ids"] for r in rows]
    h = args.fd_logodds / v_norm
    unit = v / v_norm

    def directional(rows_p, rows_r, step):
        perturb(model, unit, step)
        plus = sequence_logprobs(model, rows_p, rows_r, pad_id)
        perturb(model, unit, -2 * step)
        minus = sequence_logprobs(model, rows_p, rows_r, pad_id)
        perturb(model, unit, step)
        return [((a - b) / (2 * step) * v_norm).double().numpy() for a, b in zip(plus, minus)]

    check_n = min(16, len(rows))
    c_half = directional(prompts[:check_n], responses[:check_n], h / 2)
    c_rows = directional(prompts, responses, h)
    num = sum(float(np.abs(a - b).sum()) for a, b in zip(c_rows[:check_n], c_half))
    den = sum(float(np.abs(a).sum()) for a in c_rows[:check_n])
    fd_rel_change = num / den
    print(f"finite differences: halving the step changes Σ|c| by {fd_rel_change:.2e} relative "
          f"({time.time() - t0:.0f} s)", flush=True)

    lengths = [len(r["response_ids"]) for r in rows]
    width = max(lengths)
    c = np.zeros((len(rows), width))
    for i, ci in enumerate(c_rows):
        c[i, :len(ci)] = ci
    groups, prompt_of = split_halves([r["group"] for r in rows])   # advantage groups: halves of G / 2
    group_ids = groups.tolist()
    n_groups = int(groups.max()) + 1
    n_prompts = int(prompt_of.max()) + 1
    prompt_of_group = np.arange(n_groups) // 2
    rewards = [float(r["reward"]) for r in rows]
    plan = [r["planning_mask"] for r in rows]
    decision = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        decision[i, :lengths[i]] = announcement_mask(tok.decode(r["response_ids"]),
                                                     token_spans(tok, r["response_ids"]), strategies)
    planning = np.zeros((len(rows), width), dtype=bool)
    for i, m in enumerate(plan):
        planning[i, :len(m)] = m
    classes = {"announcement": decision, "other_planning": planning & ~decision, "execution": ~planning & ~decision}
    p_bar = float(np.mean(rewards))

    def token_adv(alpha):
        return hicra_step_advantages(rewards, group_ids, plan, lengths, alpha=alpha, width=width).token.double().numpy()

    adv = {0.0: token_adv(0.0), **{a: token_adv(a) for a in ALPHAS}}
    push = {a: group_pushes(adv[a], c, groups, n_groups) for a in adv}
    push_cls = {(a, k): group_pushes(adv[a] * m, c, groups, n_groups) for a in adv for k, m in classes.items()}
    group_pbar = np.bincount(groups, weights=np.asarray(rewards), minlength=n_groups) / np.bincount(groups)
    pbar_other = group_pbar[np.arange(n_groups) ^ 1]

    def per_prompt(values):   # the bootstrap resamples prompts (a prompt's two halves together)
        return np.bincount(prompt_of_group, weights=values, minlength=n_prompts)

    grad_rows = []
    ann0 = push_cls[(0.0, "announcement")]
    for a in ALPHAS:
        ann = push_cls[(a, "announcement")]
        law_terms = independent_law_terms(a, ann0, pbar_other)
        grad_rows.append({
            "alpha": a, "law": hicra_over_grpo_push(a, p_bar),
            "law_independent": bootstrap_ratio(per_prompt(law_terms), per_prompt(ann0)),
            "ratio_announcement": bootstrap_ratio(per_prompt(ann), per_prompt(ann0)),
            "ratio_all_tokens": bootstrap_ratio(per_prompt(push[a]), per_prompt(push[0.0])),
            "announcement_over_law": bootstrap_ratio(per_prompt(ann), per_prompt(law_terms))})
    np.savez_compressed(_out_dir(args) / "per_group.npz", group_pbar=group_pbar, prompt_of_group=prompt_of_group,
                        **{f"push_a{a}": push[a] for a in push},
                        **{f"push_a{a}_{k}": push_cls[(a, k)] for a in adv for k in classes})
    shares = {k: float(push_cls[(0.0, k)].sum() / push[0.0].sum()) for k in classes}
    print(f"p̄ {p_bar:.3f}; gradient ratios {grad_rows} ({time.time() - t0:.0f} s)", flush=True)

    # one optimizer step per batch of GROUPS_PER_BATCH groups, from the cold start
    loss_cfg = PolicyLossConfig()
    steps = []
    order = np.argsort(groups, kind="stable")
    per_batch = args.groups_per_batch
    n_batches = min(n_groups // per_batch, args.step_batches)
    for b in range(n_batches):
        members = [int(i) for i in order if b * per_batch <= groups[i] < (b + 1) * per_batch]
        bp, br = [prompts[i] for i in members], [responses[i] for i in members]
        n_tok = float(sum(lengths[i] for i in members))
        grads = {}
        for a in (0.0, 1.0):
            model.zero_grad(set_to_none=True)
            for s in range(0, len(members), MICRO):  # the learner's way: micro-batches, global normaliser
                part = members[s:s + MICRO]
                lps = sequence_logprobs(model, bp[s:s + MICRO], br[s:s + MICRO], pad_id, micro=MICRO, grad=True)
                loss = 0.0
                for i, lp in zip(part, lps):
                    a_t = torch.as_tensor(adv[a][i, :lengths[i]], dtype=torch.float32)[None]
                    term, _ = ppo_clip_loss(lp[None], lp.detach()[None], a_t, torch.ones_like(a_t), loss_cfg,
                                            token_normalizer=n_tok)
                    loss = loss + term
                loss.backward()
            grads[a] = -flat_grad(model).detach().clone()   # ascent direction of the objective
        model.zero_grad(set_to_none=True)
        grads[0.2] = 0.8 * grads[0.0] + 0.2 * grads[1.0]
        row = {"batch": b}
        if float(grads[0.0].norm()) == 0.0:   # every group of the batch had one reward: no gradient at all
            print(f"batch {b}: no gradient (every group uniform), left out", flush=True)
            continue
        for a, g in grads.items():
            clip = min(1.0, CLIP_NORM / max(float(g.norm()), 1e-30))
            row[a] = {"sgd": float(v @ g), "sgd_clipped": float(v @ g) * clip,
                      "adamw_first": float(v @ (g * clip / ((g * clip).abs() + ADAM_EPS))),
                      "grad_norm": float(g.norm())}
        if not any("adamw_check" in s for s in steps):  # first order check: one real AdamW step (lr 1e-5, the testbed's) and ℓ again
            lr = 1e-5
            g = grads[0.0]
            clip = min(1.0, CLIP_NORM / max(float(g.norm()), 1e-30))
            update = lr * (g * clip) / ((g * clip).abs() + ADAM_EPS)
            perturb(model, update, 1.0)
            ell_after = float(probe_logodds(model, probes, better_ids, worse_ids, pad_id))
            perturb(model, update, -1.0)
            row["adamw_check"] = {"predicted": lr * row[0.0]["adamw_first"], "measured": ell_after - ell.item()}
        steps.append(row)
        print(f"batch {b}: " + ", ".join(f"α={a}: sgd {row[a]['sgd']:.3g} adam {row[a]['adamw_first']:.3g}"
                                        for a in grads) + f" ({time.time() - t0:.0f} s)", flush=True)
        del grads

    step_rows = []
    for a in ALPHAS if steps else ():
        entry = {"alpha": a, "law": hicra_over_grpo_push(a, p_bar)}
        for kind in ("sgd", "sgd_clipped", "adamw_first"):   # Σ_b Δℓ(α) / Σ_b Δℓ(0), bootstrap over batches
            entry[kind] = bootstrap_ratio(np.array([s[a][kind] for s in steps]),
                                          np.array([s[0.0][kind] for s in steps]))
        step_rows.append(entry)

    result = {
        "data": args.data, "model": args.model, "rollouts": len(rows), "prompts": n_prompts, "groups": n_groups,
        "p_bar": p_bar,
        "strategy_share": share, "strategy_accuracy": acc, "better": better, "announcements": first_line,
        "probes": len(probes), "logodds": ell.item(), "grad_logodds_norm": v_norm,
        "fd_logodds_step": args.fd_logodds, "fd_halving_rel_change": fd_rel_change,
        "grpo_push_share_by_token_class": shares, "gradient": grad_rows, "optimizer_step": step_rows,
        "groups_per_batch": per_batch, "batches": steps, "seconds": time.time() - t0,
    }
    out = _out_dir(args)
    from hicra_rl.iofiles import write_json_atomic, write_text_atomic

    write_json_atomic(out / "result.json", result, indent=2)
    write_text_atomic(out / "result.md", markdown(result))
    print(markdown(result))
    return 0


def _out_dir(args) -> Path:
    out = Path(args.out or RESULTS / args.data)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _ci(t) -> str:
    m, lo, hi = t
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown(r: dict) -> str:
    lines = [
        f"# HICRA's law on the real policy: {r['data']}",
        "",
        f"`python benchmarks/law_on_model.py measure --data {r['data']}` on {r['rollouts']} cold-start rollouts "
        f"({r['prompts']} train-role prompts x {r['rollouts'] // r['prompts']}, advantages in halves: {r['groups']} groups "
        f"of {r['rollouts'] // r['groups']}; `runs/law_on_model/{r['data']}`), {r['probes']} held-out probe prompts.",
        f"Group accuracy p̄ = {r['p_bar']:.3f}; strategies: "
        + ", ".join(f"{s} {r['strategy_share'][s]:.0%} of responses at {r['strategy_accuracy'].get(s, float('nan')):.3f}"
                    for s in r["strategy_share"]) + f"; better: {r['better']}.",
        f"Probe log-odds ℓ = {r['logodds']:.3f} ({r['announcements'][r['better']]!r} vs the other), "
        f"|∇ℓ| = {r['grad_logodds_norm']:.2f}; finite-difference step check: halving it changes Σ|c| by "
        f"{r['fd_halving_rel_change']:.1e}.",
        "",
        "## Expected gradient on the decision (HICRA / GRPO push on ℓ; 95 % CI, bootstrap over prompts)",
        "",
        "| α | law at the mean p̄ | law per prompt (p̂ of the other half) | measured: announcement tokens "
        "| measured / law per prompt | measured: all tokens (what moves ℓ) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for g in r["gradient"]:
        lines.append(f"| {g['alpha']} | {g['law']:.3f} | {_ci(g['law_independent'])} | {_ci(g['ratio_announcement'])} "
                     f"| {_ci(g['announcement_over_law'])} | {_ci(g['ratio_all_tokens'])} |")
    sh = r["grpo_push_share_by_token_class"]
    lines += ["", "GRPO's push on ℓ by token class: " + ", ".join(f"{k} {v:+.2f}" for k, v in sh.items()) + ".", "",
              f"## One optimizer step ({r['groups_per_batch']} groups a batch, {len(r['batches'])} batches; first-order "
              "Δℓ summed over batches, HICRA / GRPO, 95 % CI: bootstrap over batches)", "",
              "| α | law | SGD | SGD, grad norm clipped to 1 | AdamW first step |", "| --- | --- | --- | --- | --- |"]
    for s in r["optimizer_step"]:
        lines.append(f"| {s['alpha']} | {s['law']:.3f} | {_ci(s['sgd'])} | {_ci(s['sgd_clipped'])} | {_ci(s['adamw_first'])} |")
    chk = next((s["adamw_check"] for s in r["batches"] if "adamw_check" in s), None)
    if chk:
        lines += ["", f"First-order check (one real AdamW step, lr 1e-5, GRPO, first batch): Δℓ predicted "
                  f"{chk['predicted']:.4f}, measured {chk['measured']:.4f}."]
    lines += ["", f"{r['seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("sample", "measure"))
    p.add_argument("--data", default="strat_hard", choices=("strat_hard", "strat_easy"))
    p.add_argument("--model", default=COLD_START)
    p.add_argument("--prompts", type=int, default=128, help="sample: prompts (8 responses each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probes", type=int, default=64, help="measure: held-out probe prompts")
    p.add_argument("--fd-logodds", type=float, default=0.02,
                   help="measure: finite-difference step, as the change of ℓ it makes")
    p.add_argument("--groups-per-batch", type=int, default=GROUPS_PER_BATCH,
                   help="measure: groups per optimizer step (the testbed's 16)")
    p.add_argument("--step-batches", type=int, default=4, help="measure: batches for the optimizer-step part")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    return sample(args) if args.mode == "sample" else measure(args)


if __name__ == "__main__":
    sys.exit(main())
