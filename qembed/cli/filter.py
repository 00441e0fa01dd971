"""`qembed filter`: keep synthetic pairs whose query and positive are close in embedding space."""

from __future__ import annotations

from qembed.cli.common import add_model_args, add_output_args, add_progress_args, check_output


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "filter",
        help="keep synthetic pairs with cosine(query, positive) above a threshold; drop duplicate queries",
        description="Embeds each query (with its record's instruction, else the model's retrieval instruction) and "
        "its first positive, keeps pairs with cosine above --threshold, drops exact and near-duplicate queries, "
        "optionally balances a field's shares (--balance), drops LLM-written negatives that score above their "
        "positive, and prints a report.",
    )
    add_model_args(p, help="embedding model (name or path)")
    p.add_argument("--input", required=True,
                   help="synthetic pairs JSONL (output of qembed synth), or ms-swift / sentence-transformers rows "
                        "(JSONL, .parquet or a datasets folder)")
    add_output_args(p, help="filtered JSONL, rewritten (each record gets meta.score)")
    p.add_argument("--threshold", type=float, default=0.7, help="keep pairs with cosine above this")
    p.add_argument("--balance", metavar="FIELD[=VALUE:SHARE,...]",
                   help="downsample to equal shares of a field's values (e.g. meta.question_type, meta.task, "
                        "meta.domain), or to given shares (meta.domain=code:0.15: the other values share the "
                        "rest in their own proportions) (default: no balancing)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the --balance draw (default: 0)")
    add_progress_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.synth.balance import parse_balance
    from qembed.synth.filter import filter_file

    check_output(args.output, input=args.input)
    balance = parse_balance(args.balance) if args.balance else None
    report = filter_file(args.input, args.output, args.model, threshold=args.threshold, device=args.device,
                         dtype=args.dtype, batch_tokens=args.batch_tokens, balance=balance, seed=args.seed)  # fmt: skip
    print(report.format())
    print(f"wrote {report.kept} pair(s) to {args.output}")
    return 0
