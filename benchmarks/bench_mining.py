"""Strategic-Gram mining on GSM8K train (7,473 solutions) with the default settings: wall time and counts.

    python benchmarks/bench_mining.py [--corpus ../shared/data/gsm8k/train.jsonl] [--cores 2]

The default settings are the ones the shipped lexicon was mined with; the requirement is < 5 min
on 2 cores (progress bars on stderr).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DATA)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.cores)
    from hicra_rl.strategic.mine import (
        MiningConfig,
        load_corpus,
        load_sentence_transformer,
        mine_strategic_grams,
    )

    imported = time.perf_counter()
    solutions = load_corpus(args.corpus)
    load_sentence_transformer(None)
    loaded = time.perf_counter()
    lexicon = mine_strategic_grams(solutions, MiningConfig())
    done = time.perf_counter()
    counts = lexicon.metadata["counts"]
    print(f"corpus {args.corpus} on {len(os.sched_getaffinity(0))} cores")
    print(
        f"wall time {done - started:.1f} s (imports {imported - started:.1f} s, corpus + model load "
        f"{loaded - imported:.1f} s, mining {done - loaded:.1f} s)"
    )
    print(
        f"solutions {counts['solutions']}, distinct n-grams {counts['distinct_ngrams']}, candidates "
        f"{counts['candidates']}, clusters {counts['clusters']}, kept clusters {counts['kept_clusters']}, "
        f"SGs {counts['entries']}"
    )
    print(
        "top clusters:",
        "; ".join(
            e.ngram
            for e in lexicon.entries
            if e.cluster < 8 and e.df == max(x.df for x in lexicon.entries if x.cluster == e.cluster)
        ),
    )


if __name__ == "__main__":
    main()
