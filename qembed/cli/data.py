"""`qembed data <tool>`: dataset preparation (`qa-to-beir`)."""

from __future__ import annotations

import argparse

from qembed.cli.common import add_list, add_output_args, add_progress_args, check_output
from qembed.data.qa_to_beir import FORMATS, qa_to_beir


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare retrieval datasets")
    tools = parser.add_subparsers(dest="tool", required=True, metavar="<tool>")

    qa = tools.add_parser(
        "qa-to-beir",
        help="question-answer pairs -> BEIR folder (answers = corpus, disjoint train/test queries)",
    )
    add_list(qa, "--input", required=True, metavar="FILE",
             help="JSON array, JSONL or CSV file(s) of QA rows (comma-separated, or repeat the flag)")
    qa.add_argument("--format", choices=FORMATS, default=None, help="input format (default: from the extension)")
    qa.add_argument("--encoding", default="utf-8", help="input text encoding, e.g. gb18030 (default: utf-8)")
    qa.add_argument("--question-field", required=True, metavar="F", help="field holding the question")
    qa.add_argument("--answer-field", required=True, metavar="F", help="field holding the answer")
    qa.add_argument("--num-queries", type=int, default=1000, help="cap on the number of test queries (default: 1000)")
    qa.add_argument("--test-fraction", type=float, default=0.2,
                    help="share of distinct questions drawn for test, then capped by --num-queries (default: 0.2); "
                         "all other questions are train")
    qa.add_argument("--seed", type=int, default=0, help="seed of the train/test draw (default: 0)")
    add_output_args(qa, help="BEIR folder to write", metavar="DIR")
    add_progress_args(qa)
    qa.set_defaults(func=run_qa_to_beir)


def run_qa_to_beir(args: argparse.Namespace) -> int:
    check_output(args.output, input=args.input)
    summary = qa_to_beir(
        args.input, args.output, question_field=args.question_field, answer_field=args.answer_field,
        format=args.format, encoding=args.encoding, num_queries=args.num_queries,
        test_fraction=args.test_fraction, seed=args.seed,
    )
    for line in summary.lines():
        print(line)
    print(f"wrote {args.output}/corpus.jsonl, queries.jsonl, qrels/train.tsv, qrels/test.tsv")
    return 0
