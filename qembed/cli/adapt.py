"""`qembed adapt`: the whole domain-adaptation recipe in one resumable command (see qembed.recipes.adapt)."""

from __future__ import annotations

import json
import logging

import yaml

from qembed.cli.common import add_list, add_progress_args, check_output
from qembed.data.qa_to_beir import FORMATS
from qembed.errors import QembedError

# flag -> configuration key (every key can also be set with --set KEY=VALUE or in the --config file)
FLAGS = {
    "model": "model", "output": "output", "compare_model": "compare_models", "seed": "seed",
    "qa": "data.qa", "question_field": "data.question_field", "answer_field": "data.answer_field",
    "encoding": "data.encoding", "format": "data.format", "corpus": "data.corpus", "text_field": "data.text_field",
    "llm_base_url": "data.llm_base_url", "llm_model": "data.llm_model", "api_key_env": "data.api_key_env",
    "dataset": "data.dataset", "reranker": "reranker.model", "retention_dataset": "eval.retention_dataset",
    "keep_checkpoints": "keep_checkpoints",
    "instruction": "instruction.candidates",
}  # fmt: skip


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "adapt", help="adapt an embedder to your data: split, baseline, mine, train, merge, evaluate, report"
    )
    p.add_argument("--config", metavar="YAML", help="configuration file (flags override it)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--dry-run", action="store_true", help="print the plan (done / will run / will rerun) only")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any configuration key, e.g. --set train.lr=5e-5 (value parsed as YAML)")  # fmt: skip
    p.add_argument("--model", metavar="M", required=True, help="base embedder (folder or hub id)")
    p.add_argument("--output", metavar="DIR", help="run folder (an existing one is resumed)")
    add_list(p, "--compare-model", metavar="M", help="more embedders measured as baselines")
    p.add_argument("--seed", type=int, help="seed of the split, mining samples and training (default: 0)")
    src = p.add_argument_group("data source (exactly one)")
    add_list(src, "--qa", metavar="FILE", help="QA pairs files (JSON array, JSONL, CSV or SQuAD JSON)")
    src.add_argument("--question-field", metavar="NAME", help="field of the question in the QA files (SQuAD: question)")
    src.add_argument("--answer-field", metavar="NAME", help="field of the answer in the QA files (SQuAD: context)")
    src.add_argument("--encoding", help="text encoding of the QA files (default: utf-8)")
    src.add_argument("--format", choices=FORMATS,
                     help="format of the QA files (default: from the extension; SQuAD JSON is detected)")  # fmt: skip
    src.add_argument("--corpus", metavar="FILE", help="documents; an LLM writes the queries")
    src.add_argument("--text-field", metavar="NAME", help="text field of a JSONL corpus (default: text)")
    src.add_argument("--llm-base-url", metavar="URL",
                     help="OpenAI-compatible server that writes the queries (with --corpus) and candidate instructions")
    src.add_argument("--llm-model", metavar="NAME", help="model name sent to that server")
    src.add_argument("--api-key-env", metavar="VAR", help="environment variable holding its API key")
    src.add_argument("--dataset", metavar="BEIR_DIR", help="a BEIR folder with train and test qrels")
    p.add_argument("--reranker", metavar="M", help="reranker to fine-tune and evaluate retrieve-then-rerank")
    p.add_argument("--instruction", action="append", metavar="TEXT",
                   help="a query instruction to try in the instruction search (repeatable; docs/instruction-search.md)")
    p.add_argument("--retention-dataset", metavar="BEIR_DIR", help="general-domain set evaluated at the end")
    p.add_argument("--keep-checkpoints", action="store_true", default=None,
                   help="keep training checkpoints once training is done (default: removed)")  # fmt: skip
    add_progress_args(p)
    p.set_defaults(func=run)


def overrides(args) -> dict:
    from qembed.recipes.adapt_config import load_yaml, set_dotted

    update: dict = {}
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            set_dotted(update, key, value)
    for item in args.set or []:
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
    data, ev = cfg["data"], cfg["eval"]
    check_output(cfg["output"], qa=data["qa"], corpus=data["corpus"], dataset=data["dataset"],
                 retention_dataset=ev["retention_dataset"])  # fmt: skip
    # repeated instruction settings (a model without a default instruction) are skipped; no need to say so
    logging.getLogger("qembed.eval.evaluate").setLevel(logging.ERROR)
    pipeline = build_pipeline(cfg)
    pipeline.check()  # OUTPUT is new, empty or a qembed run; no stage would write into a folder not ours
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
