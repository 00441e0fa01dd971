"""`qembed eval`: retrieval evaluation of one or more models on a BEIR folder, with a report."""

from __future__ import annotations

import argparse

from qembed.errors import QembedError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate retrieval on a BEIR folder (metrics.json, report.md, recall_at_k.png)")
    p.add_argument("--model", required=True, action="append", metavar="M",
                   help="embedding model (folder or hub id); repeat to compare models")
    p.add_argument("--dataset", required=True, metavar="DIR", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    # Each option adds instruction settings, evaluated side by side; none given = the model's default.
    p.add_argument("--instruction", metavar="TEXT", action="append",
                   help="query instruction text (repeat to compare several; default: the model's own)")
    p.add_argument("--no-instruction", action="store_true", help="(also) encode queries without an instruction")
    p.add_argument("--instruction-modes", metavar="LIST",
                   help="settings to compare: default (the model's instruction), none; e.g. default,none")
    p.add_argument("--dim", type=int, help="Matryoshka dimension (first N components, re-normalised)")
    p.add_argument("--k", default="1,5,10,30,100", help="comma-separated cut-offs (default: 1,5,10,30,100)")
    p.add_argument("--index", default="faiss", help="faiss (exact, default) | hnsw[:m=32,ef_search=128] | milvus:PATH.db | milvus:URI")
    p.add_argument("--reranker", metavar="R", help="reranker model that reorders the top candidates")
    p.add_argument("--rerank-top", type=int, default=100, help="candidates per query given to the reranker (default: 100)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="embedding cache (default: $QEMBED_CACHE or ~/.cache/qembed/embeddings)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--quantize", choices=["int8"], help="int8 Linear layers on the CPU (faster, approximate)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for metrics.json, report.md, recall_at_k.png")
    p.set_defaults(func=run)


def parse_instruction_settings(args: argparse.Namespace) -> list:
    from qembed.eval.evaluate import MODEL_DEFAULT

    settings: list = []
    if args.instruction_modes is not None:
        modes = [m.strip().lower() for m in args.instruction_modes.split(",") if m.strip()]
        if not modes:
            raise QembedError("--instruction-modes is empty: give default, none or default,none")
        for mode in modes:
            if mode not in ("default", "none"):
                raise QembedError(f"--instruction-modes takes default and/or none, got {mode!r} (use --instruction TEXT)")
            settings.append(MODEL_DEFAULT if mode == "default" else None)
    settings += args.instruction or []
    if args.no_instruction:
        settings.append(None)
    return settings or [MODEL_DEFAULT]


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QembedError(f"--k must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise QembedError(f"--k values must be positive integers, got {text!r}")
    return ks


def run(args: argparse.Namespace) -> int:
    from qembed.eval.evaluate import evaluate
    from qembed.eval.report import markdown_table

    results = evaluate(
        args.model, args.dataset, split=args.split, instruction=parse_instruction_settings(args), dim=args.dim,
        k=parse_ks(args.k), index=args.index, reranker=args.reranker, rerank_top=args.rerank_top,
        output=args.output, cache_dir=args.cache_dir, device=args.device, quantize=args.quantize,
    )  # fmt: skip
    first = results[0]
    print(f"{first['dataset']} ({first['split']}): {first['num_queries']} queries, {first['num_docs']} documents")
    print(markdown_table(results))
    print(f"wrote {args.output}/metrics.json, report.md, recall_at_k.png")
    return 0
