"""Shared-prefix forward+backward against the learner's unshared per-row forward, side by side.

    python benchmarks/bench_prefix_sharing.py [--groups 16] [--group-size 4] [--prompt-len 34]
        [--response-len 37] [--micro-groups 4] [--repeats 3] [--threads 2] [--random-init] [--device cpu]

Model: SmolLM2-135M-Instruct (``resolve_model("smollm2-135m-instruct")``; ``--random-init`` builds a
randomly initialised model of the same config instead, which costs the same to run). Batch: random
token ids, ``--groups`` prompts x ``--group-size`` responses; prompt lengths vary uniformly by +-20%
around ``--prompt-len`` and response lengths by +-30% around ``--response-len``.

Unshared: what ``PolicyLearner._response_log_probs`` does (``build_sequences``, a [B, T] right-padded
forward with a 2D mask and ``logits_to_keep``, ``logprobs_and_entropy``, ``gather_response``).
Shared: ``pack_groups`` + ``shared_prefix_log_probs``. Each timed step is forward + backward of
``sum(log_probs * advantages)``, accumulated over micro-batches of ``--micro-groups`` groups (the
unshared micro-batch holds the same rows, ``--micro-groups`` x ``--group-size``), as the learner
accumulates; ``--micro-groups 0`` runs the whole batch at once. Packing / row building is timed apart. Best of ``--repeats`` interleaved rounds.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import time

import torch

from hicra_rl.algo.logprobs import logprobs_and_entropy
from hicra_rl.learner.prefix_sharing import pack_groups, shared_prefix_log_probs
from hicra_rl.learner.sequences import build_sequences, gather_response, response_spans


def unshared_log_probs(model, input_ids, attention_mask, response_mask, width, chunk_size=1024):
    """The learner's per-row path (engine.PolicyLearner._response_log_probs), temperature 1."""
    starts, lengths = response_spans(response_mask, attention_mask)
    end = int((starts + lengths).max())
    first = int(starts.min())
    ids, am = input_ids[:, :end], attention_mask[:, :end]
    logits = model(input_ids=ids, attention_mask=am, use_cache=False, logits_to_keep=end - first + 1).logits[:, :-1]
    logp, ent = logprobs_and_entropy(logits, ids[:, first:end], chunk_size)
    return (gather_response(logp, starts, lengths, width, offset=first),
            gather_response(ent, starts, lengths, width, offset=first))


def make_batch(groups: int, group_size: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def length(mean: int, spread: float) -> int:
        lo, hi = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    prompts, responses, gids = [], [], []
    for k in range(groups):
        p = torch.randint(1, vocab, (length(prompt_len, 0.2),), generator=g).tolist()
        for _ in range(group_size):
            prompts.append(p)
            responses.append(torch.randint(1, vocab, (length(response_len, 0.3),), generator=g).tolist())
            gids.append(k)
    return prompts, responses, gids


def load_model(random_init: bool, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hicra_rl.models import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    if random_init:
        cfg = AutoConfig.from_pretrained(path)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device).train()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_best_of(fns: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Time every fn once per round, ``repeats`` rounds (interleaved, so that load from other processes
    on a shared machine hits both paths alike); all times per fn."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=34)
    ap.add_argument("--response-len", type=int, default=37)
    ap.add_argument("--micro-groups", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device

    t0 = time.perf_counter()
    model = load_model(args.random_init, device)
    print(f"model: {model.config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"attn={model.config._attn_implementation}, tied={model.config.tie_word_embeddings}, "
          f"device={device}, threads={torch.get_num_threads()}, loaded in {time.perf_counter() - t0:.1f}s")

    prompts, responses, gids = make_batch(args.groups, args.group_size, args.prompt_len, args.response_len,
                                          model.config.vocab_size)
    width = max(len(r) for r in responses)
    adv = torch.randn(len(prompts), width, generator=torch.Generator().manual_seed(1)).to(device)

    mg = args.micro_groups or args.groups
    rows_per_mb = mg * args.group_size
    mbs = [slice(s, s + rows_per_mb) for s in range(0, len(prompts), rows_per_mb)]

    t0 = time.perf_counter()
    row_mbs = [tuple(t.to(device) for t in build_sequences(prompts[m], responses[m], pad_id=0)) for m in mbs]
    t_rows = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed_mbs = [pack_groups(prompts[m], responses[m], gids[m], pad_id=0) for m in mbs]
    t_pack = time.perf_counter() - t0
    packed_mbs = [pk.to(device) for pk in packed_mbs]

    def unshared_step():
        model.zero_grad(set_to_none=True)
        for m, (ids, am, rm) in zip(mbs, row_mbs):
            lp, _ = unshared_log_probs(model, ids, am, rm, width)
            (lp * adv[m]).sum().backward()

    def shared_step():
        model.zero_grad(set_to_none=True)
        for m, pk in zip(mbs, packed_mbs):
            lp, _ = shared_prefix_log_probs(model, pk, width)
            (lp * adv[m]).sum().backward()

    @torch.no_grad()
    def unshared_fwd():
        return torch.cat([unshared_log_probs(model, ids, am, rm, width)[0] for ids, am, rm in row_mbs])

    @torch.no_grad()
    def shared_fwd():
        return torch.cat([shared_prefix_log_probs(model, pk, width)[0] for pk in packed_mbs])

    diff = float((unshared_fwd() - shared_fwd()).abs().max())  # also a warm-up of both paths
    all_times = interleaved_best_of({"unshared fwd": unshared_fwd, "shared   fwd": shared_fwd,
                                     "unshared fwd+bwd": unshared_step, "shared   fwd+bwd": shared_step},
                                    args.repeats, device)
    times = {k: min(v) for k, v in all_times.items()}

    st = [pk.stats() for pk in packed_mbs]
    tot = {k: sum(x[k] for x in st) for k in ("n_tokens", "n_unshared_tokens", "padded_tokens", "unshared_padded_tokens")}
    b = len(prompts)
    print(f"batch: {args.groups} prompts x {args.group_size} responses = {b} rows; prompt len "
          f"{min(len(p) for p in prompts)}-{max(len(p) for p in prompts)}, response len "
          f"{min(len(r) for r in responses)}-{max(len(r) for r in responses)}; {len(mbs)} micro-batch(es) of "
          f"{mg} groups / {rows_per_mb} rows")
    print(f"unshared: [rows x T] {[tuple(r[0].shape) for r in row_mbs]}  real tokens {tot['n_unshared_tokens']}  "
          f"padded {tot['unshared_padded_tokens']}   build_sequences {t_rows * 1e3:.1f} ms")
    print(f"shared:   [groups x L] {[tuple(pk.input_ids.shape) for pk in packed_mbs]}  real tokens {tot['n_tokens']}  "
          f"padded {tot['padded_tokens']}   pack_groups {t_pack * 1e3:.1f} ms")
    print(f"tokens shared/unshared: real {tot['n_tokens'] / tot['n_unshared_tokens']:.3f}, "
          f"padded {tot['padded_tokens'] / tot['unshared_padded_tokens']:.3f}")
    print(f"max |log-prob diff| between the paths: {diff:.2e}")
    print(f"best of {args.repeats} (interleaved rounds; every time: "
          + ", ".join(f"{k.replace('   ', ' ')} {[round(t, 2) for t in v]}" for k, v in all_times.items()) + "):")
    for kind in ("fwd", "fwd+bwd"):
        tu, ts = times[f"unshared {kind}"], times[f"shared   {kind}"]
        print(f"  {kind:8s} unshared {tu:7.3f} s   shared {ts:7.3f} s   shared/unshared {ts / tu:.3f}  "
              f"(speed-up x{tu / ts:.2f})")


if __name__ == "__main__":
    main()
