"""`qembed filter`: keep synthetic pairs whose query and positive are close in embedding space."""

from __future__ import annotations

from qembed.cli.common import add_model_args, add_output_args, add_progress_args, check_output


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "filter",
        help="keep synthetic pairs with cosine(query, positive) above a threshold; drop duplicate queries",
        description="Embeds each query (with the model's retrieval instruction) and its first positive, keeps "
        "pairs with cosine above --threshold, drops exact and near-duplicate queries, and prints a report.",
    )
    add_model_args(p, help="embedding model (name or path)")
    p.add_argument("--input", required=True,
                   help="synthetic pairs JSONL (output of qembed synth), or ms-swift / sentence-transformers rows "
                        "(JSONL, .parquet or a datasets folder)")
    add_output_args(p, help="filtered JSONL, rewritten (each record gets meta.score)")
    p.add_argument("--threshold", type=float, default=0.7, help="keep pairs with cosine above this")
    add_progress_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.synth.filter import filter_file

    check_output(args.output, input=args.input)
    report = filter_file(args.input, args.output, args.model, threshold=args.threshold, device=args.device,
                         dtype=args.dtype, batch_tokens=args.batch_tokens)  # fmt: skip
    print(report.format())
    print(f"wrote {report.kept} pair(s) to {args.output}")
    return 0
