"""`qembed adapt`: the whole domain-adaptation recipe in one resumable command (see qembed.recipes.adapt)."""

from __future__ import annotations

import json
import logging

import yaml

from qembed.errors import QembedError

# flag -> configuration key (every key can also be set with --set KEY=VALUE or in the --config file)
FLAGS = {
    "model": "model", "output": "output", "compare_model": "compare_models", "seed": "seed",
    "qa": "data.qa", "question_field": "data.question_field", "answer_field": "data.answer_field",
    "encoding": "data.encoding", "format": "data.format", "corpus": "data.corpus", "text_field": "data.text_field",
    "llm_base_url": "data.llm_base_url", "llm_model": "data.llm_model", "api_key_env": "data.api_key_env",
    "dataset": "data.dataset", "reranker": "reranker.model", "retention_dataset": "eval.retention_dataset",
}  # fmt: skip


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "adapt", help="adapt an embedder to your data: split, baseline, mine, train, merge, evaluate, report"
    )
    p.add_argument("--config", metavar="YAML", help="configuration file (flags override it)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--dry-run", action="store_true", help="print the plan (done / will run / will rerun) only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any configuration key, e.g. --set train.lr=5e-5 (value parsed as YAML)")  # fmt: skip
    p.add_argument("--model", help="base embedder (folder or hub id)")
    p.add_argument("--output", help="run folder")
    p.add_argument("--compare-model", action="append", help="another embedder measured as a baseline")
    p.add_argument("--seed", type=int)
    src = p.add_argument_group("data source (exactly one)")
    src.add_argument("--qa", action="append", metavar="FILE", help="QA pairs file (repeatable)")
    src.add_argument("--question-field")
    src.add_argument("--answer-field")
    src.add_argument("--encoding")
    src.add_argument("--format", choices=["json", "jsonl", "csv"])
    src.add_argument("--corpus", metavar="FILE", help="documents; an LLM writes the queries")
    src.add_argument("--text-field")
    src.add_argument("--llm-base-url")
    src.add_argument("--llm-model")
    src.add_argument("--api-key-env")
    src.add_argument("--dataset", metavar="BEIR_DIR", help="a BEIR folder with train and test qrels")
    p.add_argument("--reranker", help="reranker to fine-tune and evaluate retrieve-then-rerank")
    p.add_argument("--retention-dataset", metavar="BEIR_DIR", help="general-domain set evaluated at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def overrides(args) -> dict:
    from qembed.recipes.adapt_config import load_yaml, set_dotted

    update: dict = {}
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            set_dotted(update, key, value)
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise QembedError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            set_dotted(update, key.strip(), load_yaml(text))
        except yaml.YAMLError:
            raise QembedError(f"--set {key}: cannot parse {text!r}") from None
    return update


def run(args) -> int:
    from qembed.recipes.adapt import build_pipeline, check_config
    from qembed.recipes.adapt_config import dump, resolve

    cfg = resolve(args.config, overrides(args))
    if args.print_config:
        print(dump(cfg))
        return 0
    check_config(cfg, check_sources=False)
    # repeated instruction settings (a model without a default instruction) are skipped; no need to say so
    logging.getLogger("qembed.eval.evaluate").setLevel(logging.ERROR)
    pipeline = build_pipeline(cfg, show_progress=False if args.no_progress else None)
    plan = pipeline.plan()
    print(pipeline.format_plan(), flush=True)
    if args.dry_run:
        return 0
    if plan[0][1] != "done":
        check_config(cfg)
    pipeline.run()
    summary = json.loads((pipeline.output / "summary.json").read_text())
    choice = summary["recommendation"]
    metric = cfg["eval"]["metric"]
    print(f"report: {pipeline.output / 'report.md'}; recommended: {choice['variant']} "
          f"(test {metric} {100 * choice['test'][metric]:.2f}); serve it with:\n  {choice['serve']}")  # fmt: skip
    return 0
