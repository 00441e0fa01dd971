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
from qembed.cli.engine import add_engine_args, engine_options
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
    search = p.add_argument_group("instruction search (docs/instruction-search.md)")
    search.add_argument("--instruction-search", action="store_true",
                        help="choose the query instruction on the dev split (the model's default, none, the closest "
                             "mteb task's, each --instruction, LLM-written ones), then evaluate --split with it")
    search.add_argument("--dev-split", default="dev", help="split the choice is made on (default: dev)")
    search.add_argument("--search-metric", default="ndcg@10", help="dev metric of the choice (default: ndcg@10)")
    search.add_argument("--llm-base-url", metavar="URL", help="OpenAI-compatible server that writes candidates")
    search.add_argument("--llm-model", metavar="NAME", help="model name sent to that server")
    search.add_argument("--api-key-env", metavar="VAR", help="environment variable holding its API key")
    search.add_argument("--llm-instructions", type=int, default=3, metavar="N",
                        help="instructions the LLM writes (default: 3)")
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
    add_engine_args(p)
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
    from qembed.eval.report import markdown_table, write_outputs

    check_output(args.output, dataset=args.dataset)
    if not args.instruction_search and (args.llm_base_url or args.llm_model):
        raise QembedError("--llm-base-url/--llm-model write candidates for --instruction-search: add it")
    if args.instruction_search:
        check_instruction_search(args)
    engine = engine_options(args)
    claim_output_dir(args.output, "eval")  # a folder of the user's is refused, never written into
    leaks = training_overlap_warnings(args.model, args.dataset, args.split)
    for line in leaks:
        log.warning(line)
    options = dict(split=args.split, dim=args.dim, k=parse_ks(args.k), index=args.index, reranker=args.reranker,
                   rerank_top=args.rerank_top, ndcg_gain=args.ndcg_gain, cache_dir=args.cache_dir, device=args.device,
                   dtype=args.dtype, batch_tokens=args.batch_tokens, quantize=args.quantize, engine=engine)  # fmt: skip
    if args.instruction_search:  # each model with its own choice
        results = [entry for model, fmt in search_instructions(args)
                   for entry in evaluate([model], args.dataset, instruction=fmt, **options)]  # fmt: skip
        write_outputs(results, args.output)
    else:
        results = evaluate(args.model, args.dataset, instruction=parse_instruction_settings(args), output=args.output,
                           **options)  # fmt: skip
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


def check_instruction_search(args: argparse.Namespace) -> None:
    """`--instruction-search`'s own flags, checked before any output or model work."""
    from pathlib import Path

    from qembed.eval.instruction_search import check_metric

    folder = Path(args.dataset)
    if args.dev_split == args.split:
        raise QembedError(f"--instruction-search chooses on --dev-split {args.dev_split}: evaluate another --split")
    if not (folder / "qrels" / f"{args.dev_split}.tsv").is_file():
        raise QembedError(f"--instruction-search needs a {args.dev_split} split: {folder}/qrels/{args.dev_split}.tsv "
                          f"not found (--dev-split names another)")  # fmt: skip
    if not (folder / "qrels" / f"{args.split}.tsv").is_file():
        raise QembedError(f"no qrels for split {args.split!r}: {folder}/qrels/{args.split}.tsv not found")
    check_metric(args.search_metric)
    if args.instruction_modes is not None:
        raise QembedError("--instruction-search compares the model's default and no instruction itself: drop "
                          "--instruction-modes")  # fmt: skip
    if bool(args.llm_base_url) != bool(args.llm_model):
        raise QembedError("LLM-written candidates need both --llm-base-url and --llm-model")
    if args.llm_instructions < 0:
        raise QembedError(f"--llm-instructions must be 0 or more, got {args.llm_instructions}")


def search_instructions(args: argparse.Namespace) -> list[tuple[str, object]]:
    """`--instruction-search`: (model, its best query format on the dev split) for each model; each search is
    printed and all are written to OUTPUT/instruction_search.json."""
    from pathlib import Path

    from qembed.eval.instruction_search import gather_candidates, search_instruction
    from qembed.files import atomic_write_json

    folder = Path(args.dataset)
    llm = None
    if args.llm_base_url:
        from qembed.synth.llm import OpenAIChat

        llm = OpenAIChat(args.llm_base_url, args.llm_model, api_key_env=args.api_key_env, concurrency=1)
    candidates = gather_candidates(folder, given=args.instruction or [], llm=llm, llm_count=args.llm_instructions)
    chosen, report = [], []
    for model in args.model:
        result = search_instruction(model, folder, candidates, split=args.dev_split, metric=args.search_metric,
                                    k=parse_ks(args.k), index=args.index, ndcg_gain=args.ndcg_gain,
                                    cache_dir=args.cache_dir, device=args.device, dtype=args.dtype,
                                    batch_tokens=args.batch_tokens, quantize=args.quantize)  # fmt: skip
        print("\n".join(result.lines()), flush=True)
        chosen.append((model, result.query_format))
        report.append(result.to_dict())
    Path(args.output).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.output) / "instruction_search.json",
                      {"candidates": [c.to_dict() for c in candidates], "models": report}, ensure_ascii=False)
    return chosen
