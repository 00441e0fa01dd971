"""`qembed mine`: hard negatives with false-negative guards (see `qembed.mine`)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "mine",
        help="mine hard negatives for training pairs (rank window, score caps, margin, reranker guard)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="embedding model (name or folder)")
    p.add_argument(
        "--input",
        required=True,
        metavar="PAIRS",
        help="training-format JSONL ({query, pos, ...}) or a BEIR folder (uses --split qrels)",
    )
    p.add_argument("--split", default="train", help="qrels split when --input is a BEIR folder")
    p.add_argument(
        "--corpus",
        metavar="FILE",
        default=None,
        help="BEIR folder/corpus.jsonl, JSONL with 'text', or .txt (one doc per line); "
        "default: the BEIR input's corpus, else the positives of all records",
    )
    p.add_argument("--output", required=True, metavar="FILE", help="output JSONL (resumed if it exists)")
    p.add_argument("--num-negatives", type=int, default=5)
    p.add_argument("--range-min", type=int, default=20, help="first rank (0-based) of the candidate window")
    p.add_argument("--range-max", type=int, default=50, help="end of the candidate window (exclusive)")
    p.add_argument("--max-score", type=float, default=0.8, help="drop candidates scoring above this")
    p.add_argument("--no-max-score", action="store_true", help="no max-score rule")
    p.add_argument("--min-score", type=float, default=None, help="drop candidates scoring below this")
    margins = p.add_mutually_exclusive_group()
    margins.add_argument("--margin", type=float, default=0.1, help="drop candidates above pos_score - margin")
    margins.add_argument(
        "--relative-margin",
        type=float,
        default=None,
        help="instead: drop candidates above pos_score * (1 - relative_margin)",
    )
    p.add_argument("--sampling", choices=["top", "random"], default="top")
    p.add_argument("--seed", type=int, default=0, help="seed of random sampling")
    p.add_argument("--reranker", default=None, help="reranker for the false-negative guard")
    p.add_argument(
        "--reranker-max-score",
        type=float,
        default=None,
        help="drop candidates the reranker scores above this (needs --reranker)",
    )
    instr = p.add_mutually_exclusive_group()
    instr.add_argument("--instruction", default=None, help="query instruction (default: the model's own)")
    instr.add_argument("--no-instruction", action="store_true", help="encode queries without instruction")
    p.add_argument("--dim", type=int, default=None, help="Matryoshka dimension (default: full)")
    p.add_argument("--index", default="faiss", help="faiss | hnsw | milvus:PATH.db | milvus:http://HOST:PORT")
    p.add_argument(
        "--cache-dir", default=None, help="embedding cache folder (default: $QEMBED_CACHE or ~/.cache)"
    )
    p.add_argument("--chunk-size", type=int, default=1024, help="queries encoded and searched at a time")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming --output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qembed.errors import QembedError
    from qembed.mine import DEFAULT, mine_hard_negatives

    if (args.reranker is None) != (args.reranker_max_score is None):
        raise QembedError("--reranker and --reranker-max-score go together")
    instruction = (
        None if args.no_instruction else (args.instruction if args.instruction is not None else DEFAULT)
    )
    result = mine_hard_negatives(
        args.model, args.input, args.output, corpus=args.corpus, split=args.split,
        num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
        max_score=None if args.no_max_score else args.max_score, min_score=args.min_score,
        margin=None if args.relative_margin is not None else args.margin, relative_margin=args.relative_margin,
        sampling=args.sampling, seed=args.seed, reranker=args.reranker, reranker_max_score=args.reranker_max_score,
        instruction=instruction, dim=args.dim, index=args.index, cache_dir=args.cache_dir,
        chunk_size=args.chunk_size, overwrite=args.overwrite,
    )  # fmt: skip
    for line in result.lines():
        print(line)
    print(f"wrote {result.output} and {result.summary_path}")
    return 0
