"""`qembed demo`: embed a handful of documents, search them with queries, rerank the hits."""

from __future__ import annotations

from qembed.cli.common import add_progress_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="small end-to-end demo: embed, search, rerank")
    p.add_argument("--model", help="embedding model (default: Qwen/Qwen3-Embedding-0.6B; offline: all-MiniLM-L6-v2)")
    p.add_argument("--reranker", help="reranker (default: Qwen/Qwen3-Reranker-0.6B)")
    p.add_argument("--top-k", type=int, default=3, help="hits shown per query")
    add_progress_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.demo import run_demo

    run_demo(args.model, args.reranker, top_k=args.top_k)
    return 0
