"""`qembed filter`: keep synthetic pairs whose query and positive are close in embedding space."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "filter",
        help="keep synthetic pairs with cosine(query, positive) above a threshold; drop duplicate queries",
        description="Embeds each query (with the model's retrieval instruction) and its first positive, keeps "
        "pairs with cosine above --threshold, drops exact and near-duplicate queries, and prints a report.",
    )
    p.add_argument("--model", required=True, help="embedding model (name or path)")
    p.add_argument("--input", required=True, help="synthetic pairs JSONL (output of qembed synth)")
    p.add_argument("--output", required=True, help="filtered JSONL (each record gets meta.score)")
    p.add_argument("--threshold", type=float, default=0.7, help="keep pairs with cosine above this (default: 0.7)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per encoding batch")
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.synth.filter import filter_file

    report = filter_file(args.input, args.output, args.model, threshold=args.threshold, device=args.device,
                         batch_tokens=args.batch_tokens)  # fmt: skip
    print(report.format())
    print(f"wrote {report.kept} pair(s) to {args.output}")
    return 0
