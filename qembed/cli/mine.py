"""`qembed mine`: hard negatives with false-negative guards (see `qembed.mine`)."""

from __future__ import annotations

import argparse

from qembed.cli.common import add_model_args, add_output_args, add_progress_args, check_output
from qembed.negatives import NUM_NEGATIVES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "mine", help="mine hard negatives for training pairs (rank window, score caps, margin, reranker guard)"
    )
    add_model_args(p, help="embedding model (name or folder)")
    p.add_argument("--input", required=True, metavar="PAIRS",
                   help="training pairs (qembed JSONL {query, pos, ...}, or ms-swift / sentence-transformers rows in "
                        "JSONL, .parquet or a datasets folder) or a BEIR folder (uses --split qrels)")
    p.add_argument("--split", default="train", help="qrels split when --input is a BEIR folder")
    p.add_argument("--corpus", metavar="FILE", default=None,
                   help="BEIR folder/corpus.jsonl, JSONL with 'text', or .txt (one doc per line) "
                        "(default: the BEIR input's corpus, else the positives of all records)")
    add_output_args(p, help="output JSONL (an existing one is resumed)", resumable=True)
    p.add_argument("--num-negatives", type=int, default=NUM_NEGATIVES, help="negatives kept per query")
    p.add_argument("--range-min", type=int, default=20, help="first rank (0-based) of the candidate window")
    p.add_argument("--range-max", type=int, default=50, help="end of the candidate window (exclusive)")
    p.add_argument("--max-score", type=float, default=0.8, help="drop candidates scoring above this")
    p.add_argument("--no-max-score", action="store_true", help="no max-score rule")
    p.add_argument("--min-score", type=float, default=None, help="drop candidates scoring below this (default: no rule)")
    margins = p.add_mutually_exclusive_group()
    margins.add_argument("--margin", type=float, default=0.1, help="drop candidates above pos_score - margin")
    margins.add_argument("--relative-margin", type=float, default=None,
                         help="instead of --margin: drop candidates above pos_score * (1 - relative_margin)")
    p.add_argument("--sampling", choices=["top", "random"], default="top",
                   help="top: the best-ranked survivors; random: a seeded sample of them")
    p.add_argument("--seed", type=int, default=0, help="seed of random sampling")
    p.add_argument("--reranker", default=None, help="reranker for the false-negative guard (default: none)")
    p.add_argument("--reranker-max-score", type=float, default=None,
                   help="drop candidates the reranker scores above this (needs --reranker)")
    instr = p.add_mutually_exclusive_group()
    instr.add_argument("--instruction", default=None, help="query instruction (default: the model's own)")
    instr.add_argument("--no-instruction", action="store_true", help="encode queries without instruction")
    p.add_argument("--dim", type=int, default=None, help="Matryoshka dimension (default: full)")
    p.add_argument("--index", default="faiss", help="faiss | faiss:FACTORY[?nprobe=N] | hnsw | milvus:PATH.db | milvus:http://HOST:PORT[?index=HNSW]")
    p.add_argument("--cache-dir", default=None,
                   help="embedding cache (default: $QEMBED_CACHE or ~/.cache/qembed/embeddings)")
    p.add_argument("--chunk-size", type=int, default=1024, help="queries encoded and searched at a time")
    add_progress_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qembed.errors import QembedError
    from qembed.mine import mine_hard_negatives
    from qembed.models.prompts import MODEL_DEFAULT

    if (args.reranker is None) != (args.reranker_max_score is None):
        raise QembedError("--reranker and --reranker-max-score go together")
    instruction = (
        None if args.no_instruction else (args.instruction if args.instruction is not None else MODEL_DEFAULT)
    )
    check_output(args.output, input=args.input, corpus=args.corpus)
    result = mine_hard_negatives(
        args.model, args.input, args.output, corpus=args.corpus, split=args.split,
        num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
        max_score=None if args.no_max_score else args.max_score, min_score=args.min_score,
        margin=None if args.relative_margin is not None else args.margin, relative_margin=args.relative_margin,
        sampling=args.sampling, seed=args.seed, reranker=args.reranker, reranker_max_score=args.reranker_max_score,
        instruction=instruction, dim=args.dim, index=args.index, cache_dir=args.cache_dir,
        chunk_size=args.chunk_size, overwrite=args.overwrite, device=args.device, dtype=args.dtype,
        batch_tokens=args.batch_tokens,
    )  # fmt: skip
    for line in result.lines():
        print(line)
    print(f"wrote {result.output} and {result.summary_path}")
    return 0
