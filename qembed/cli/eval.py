"""`qembed eval`: retrieval evaluation of one or more models on a BEIR folder, with a report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qembed.cli.common import (
    add_list,
    add_model_args,
    add_output_args,
    add_progress_args,
    add_quantize_arg,
    check_output,
)
from qembed.errors import QembedError
from qembed.files import claim_output_dir

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate retrieval on a BEIR folder (metrics.json, report.md, recall_at_k.png)")
    add_model_args(p, multiple=True, help="embedding model(s), folder or hub id; several (a,b) are compared")
    p.add_argument("--dataset", required=True, metavar="DIR", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    # Each option adds instruction settings, evaluated side by side; none given = the model's default.
    p.add_argument("--instruction", metavar="TEXT", action="append",
                   help="query instruction text (repeat to compare several; default: the model's own)")
    p.add_argument("--no-instruction", action="store_true", help="(also) encode queries without an instruction")
    add_list(p, "--instruction-modes", metavar="MODES", default=None,
             help="settings to compare: default (the model's instruction), none; e.g. default,none")
    p.add_argument("--dim", type=int, help="Matryoshka dimension, first N components re-normalised (default: full)")
    add_list(p, "--k", item=int, default=[1, 5, 10, 30, 100], metavar="K", help="metric cut-offs")
    p.add_argument("--index", default="faiss", help="faiss (exact) | faiss:FACTORY[?nprobe=N] | hnsw[:m=32,ef_search=128] | milvus:PATH.db | milvus:URI[?index=HNSW]")
    p.add_argument("--reranker", metavar="R", help="reranker model that reorders the top candidates")
    p.add_argument("--rerank-top", type=int, default=100, help="candidates per query given to the reranker (default: 100)")
    p.add_argument("--ndcg-gain", choices=["linear", "exponential"], default="linear",
                   help="nDCG gain: linear (trec_eval, BEIR, MTEB; default) or exponential (2^grade - 1)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="embedding cache (default: $QEMBED_CACHE or ~/.cache/qembed/embeddings)")
    add_quantize_arg(p)
    add_output_args(p, help="folder for metrics.json, report.md, recall_at_k.png", metavar="DIR")
    add_progress_args(p)
    p.set_defaults(func=run)


def parse_instruction_settings(args: argparse.Namespace) -> list:
    from qembed.eval.evaluate import MODEL_DEFAULT

    settings: list = []
    if args.instruction_modes is not None:
        modes = [m.lower() for m in args.instruction_modes]
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


def parse_ks(ks: list[int]) -> list[int]:
    if not ks or min(ks) < 1:
        raise QembedError(f"--k values must be positive integers, got {','.join(map(str, ks))}")
    return ks


def run(args: argparse.Namespace) -> int:
    from qembed.eval.evaluate import evaluate
    from qembed.eval.report import markdown_table

    check_output(args.output, dataset=args.dataset)
    claim_output_dir(args.output, "eval")  # a folder of the user's is refused, never written into
    leaks = training_overlap_warnings(args.model, args.dataset, args.split)
    for line in leaks:
        log.warning(line)
    results = evaluate(
        args.model, args.dataset, split=args.split, instruction=parse_instruction_settings(args), dim=args.dim,
        k=parse_ks(args.k), index=args.index, reranker=args.reranker, rerank_top=args.rerank_top,
        ndcg_gain=args.ndcg_gain, output=args.output, cache_dir=args.cache_dir, device=args.device,
        dtype=args.dtype, batch_tokens=args.batch_tokens, quantize=args.quantize,
    )  # fmt: skip
    first = results[0]
    print(f"{first['dataset']} ({first['split']}): {first['num_queries']} queries, {first['num_docs']} documents")
    print(markdown_table(results))
    print(f"wrote {args.output}/metrics.json, report.md, recall_at_k.png")
    for line in leaks:  # again after the table, where the figures are read
        print(line)
    return 0


def training_overlap_warnings(models: list[str], dataset: str, split: str) -> list[str]:
    """A loud line per model that was trained (or had choices made) on queries of the evaluated split: a model
    `qembed adapt` wrote records its train and dev queries (`qembed.data.splits.training_overlap`). Evaluation
    goes on (measuring a model on data it saw can be deliberate), but the figures are not held-out ones."""
    from qembed.data.beir import read_qrels, read_queries
    from qembed.data.splits import TRAINING_QUERIES_FILE, training_overlap

    folder = Path(dataset)
    trained = [m for m in models if (Path(m) / TRAINING_QUERIES_FILE).is_file()]
    if not trained or not (folder / "qrels" / f"{split}.tsv").is_file() or not (folder / "queries.jsonl").is_file():
        return []
    queries = read_queries(folder / "queries.jsonl")
    texts = [queries[q] for q in read_qrels(folder / "qrels" / f"{split}.tsv") if q in queries]
    lines = []
    for model in trained:
        for seen, n in training_overlap(model, texts).items():
            role = "trained on" if seen == "train" else f"chosen on ({seen} split)"
            lines.append(f"WARNING: {n} of the {len(texts)} {split} queries of {dataset} are queries {model} was {role}: "
                         "these figures are not held-out; evaluate on the test split of its own run "
                         "(OUTPUT/data/beir), or split this data with the same seed")  # fmt: skip
    return lines
