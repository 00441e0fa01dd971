"""`qembed rerank`: score the texts of a file against one query, best first."""

from __future__ import annotations

import json

from qembed.cli.common import add_model_args, add_progress_args, add_quantize_arg
from qembed.data.corpus import read_texts


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("rerank", help="rerank texts from a file against a query")
    add_model_args(p, help="reranker: local folder or hub id")
    p.add_argument("--query", required=True, help="the query the texts are scored against")
    p.add_argument("--input", required=True, help=".txt (one document per line) or .jsonl")
    p.add_argument("--field", default="text", help="text field of .jsonl records (default: text)")
    p.add_argument("--instruction", help="task instruction (default: the model's web-search instruction)")
    p.add_argument("--top-k", type=int, help="print only the best K (default: all)")
    add_progress_args(p)
    add_quantize_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.models.reranker import Reranker

    documents = read_texts(args.input, field=args.field)
    reranker = Reranker.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    ranked = reranker.rerank(args.query, documents, instruction=args.instruction, top_k=args.top_k,
                             batch_tokens=args.batch_tokens)
    for rank, (index, score) in enumerate(ranked, start=1):
        print(json.dumps({"rank": rank, "index": index, "score": round(score, 6), "text": documents[index]},
                         ensure_ascii=False))  # fmt: skip
    return 0
