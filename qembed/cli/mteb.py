"""`qembed mteb`: MTEB / C-MTEB tasks through the `mteb` package, or a local BEIR folder as an mteb task."""

from __future__ import annotations

from qembed.cli.common import add_device_args, add_list, add_progress_args, add_quantize_arg


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "mteb", help="run MTEB / C-MTEB tasks with the mteb package (results in mteb's layout)",
        description="Runs mteb tasks with an embedder (and a reranker for reranking tasks). Queries get each task's "
        "instruction in the model's query format (instruction-aware models), documents the document prompt. "
        "Needs the mteb extra: pip install 'qembed[mteb]'.",
    )  # fmt: skip
    p.add_argument("--model", metavar="M", help="embedding model: folder or hub id")
    p.add_argument("--reranker", metavar="R",
                   help="reranker for mteb's reranking tasks; with --dataset it also reorders the embedder's top "
                        "--rerank-top (default: none)")  # fmt: skip
    add_list(p, "--tasks", default=[], metavar="T", help="mteb task names, e.g. T2Retrieval,CmedqaRetrieval")
    p.add_argument("--benchmark", metavar="NAME", help='an mteb benchmark, e.g. "MTEB(cmn, v1)" (default: none)')
    p.add_argument("--dataset", metavar="DIR", help="a local BEIR folder run as an mteb retrieval task (no hub needed)")
    p.add_argument("--split", default="test", help="--dataset: the qrels split to evaluate")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="mteb results folder (DIR/results/<model>/<revision>/<task>.json); tasks already "
                        "there with the same settings are not rerun")  # fmt: skip
    group = p.add_mutually_exclusive_group()
    group.add_argument("--instruction-file", metavar="FILE",
                       help="task name -> query instruction (JSON object or TSV), overriding mteb's (default: none)")
    group.add_argument("--no-instruction", action="store_true", help="encode queries without any instruction")
    p.add_argument("--dim", type=int, help="Matryoshka dimension, first N components re-normalised (default: full)")
    p.add_argument("--rerank-top", type=int, default=100, help="--dataset with --reranker: candidates per query")
    add_quantize_arg(p)
    add_device_args(p, what="the models")
    add_progress_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.eval.mteb_run import run_mteb

    scores = run_mteb(
        output=args.output, model=args.model, reranker=args.reranker, tasks=args.tasks, benchmark=args.benchmark,
        dataset=args.dataset, split=args.split, instruction_file=args.instruction_file,
        use_task_instructions=not args.no_instruction, quantize=args.quantize, dim=args.dim,
        batch_tokens=args.batch_tokens, rerank_top=args.rerank_top, device=args.device, dtype=args.dtype,
        show_progress=args.progress_mode,
    )  # fmt: skip
    print("| model | task | split | subset | main score | % |")
    print("|---|---|---|---|---|---:|")
    for s in scores:
        print(f"| {s.model} | {s.task} | {s.split} | {s.subset} | {s.metric} | {100 * s.value:.2f} |")
    print(f"wrote mteb results under {args.output}/results")
    return 0
