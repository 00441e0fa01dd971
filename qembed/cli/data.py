"""`qembed data <tool>`: dataset preparation (`qa-to-beir`, `convert`)."""

from __future__ import annotations

import argparse

from qembed.cli.common import add_list, add_output_args, add_progress_args, check_output
from qembed.data.qa_to_beir import DEFAULTS, FORMATS, qa_to_beir


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare retrieval datasets")
    tools = parser.add_subparsers(dest="tool", required=True, metavar="<tool>")

    qa = tools.add_parser(
        "qa-to-beir",
        help="question-answer pairs -> BEIR folder (answers = corpus, disjoint train/dev/test queries)",
        description="The split is the one `qembed adapt --qa` makes: the same file, fields, fractions and seed "
        "give the same train/dev/test queries in both verbs.",
    )
    add_list(qa, "--input", required=True, metavar="FILE",
             help="JSON array, JSONL, CSV or SQuAD JSON file(s) of QA rows (comma-separated, or repeat the flag)")
    qa.add_argument("--format", choices=FORMATS, default=None,
                    help="input format (default: from the extension; a .json SQuAD object is detected)")  # fmt: skip
    qa.add_argument("--encoding", default="utf-8", help="input text encoding, e.g. gb18030 (default: utf-8)")
    qa.add_argument("--question-field", metavar="F", help="field holding the question (SQuAD: question)")
    qa.add_argument("--answer-field", metavar="F", help="field holding the answer (SQuAD: context, the paragraph)")
    qa.add_argument("--num-queries", type=int, default=DEFAULTS.max_test, help="cap on the number of test queries")
    qa.add_argument("--test-fraction", type=float, default=DEFAULTS.test_fraction,
                    help="share of distinct questions held out for test, then capped by --num-queries")  # fmt: skip
    qa.add_argument("--dev-fraction", type=float, default=DEFAULTS.dev_fraction,
                    help="share held out for dev (0: none), capped by --max-dev; all other questions are train")  # fmt: skip
    qa.add_argument("--max-dev", type=int, default=DEFAULTS.max_dev, help="cap on the number of dev queries")
    qa.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    add_output_args(qa, help="BEIR folder to write", metavar="DIR")
    add_progress_args(qa)
    qa.set_defaults(func=run_qa_to_beir, command="data qa-to-beir")
    add_convert_parser(tools)


def run_qa_to_beir(args: argparse.Namespace) -> int:
    check_output(args.output, input=args.input)
    summary = qa_to_beir(
        args.input, args.output, question_field=args.question_field, answer_field=args.answer_field,
        format=args.format, encoding=args.encoding, num_queries=args.num_queries,
        test_fraction=args.test_fraction, dev_fraction=args.dev_fraction, max_dev=args.max_dev, seed=args.seed,
    )
    for line in summary.lines():
        print(line)
    dev = " qrels/dev.tsv," if summary.num_dev else ""
    print(f"wrote {args.output}/corpus.jsonl, queries.jsonl, qrels/train.tsv,{dev} qrels/test.tsv")
    return 0


# ------------------------------------------------------------------------------------------- data convert
def add_convert_parser(tools) -> None:
    from qembed.data.formats import FORMATS

    conv = tools.add_parser(
        "convert", help="training pairs between formats: qembed JSONL, ms-swift embedding rows, sentence-transformers",
        description="qembed: {query, pos, neg, instruction}; swift: ms-swift's embedding format (messages, "
        "positive_messages, negative_messages); st: sentence-transformers columns (anchor, positive, negative_1..n). "
        "Files: .jsonl, .parquet, or a datasets folder (save_to_disk) for any other name.",
    )  # fmt: skip
    conv.add_argument("--from", dest="from_format", choices=FORMATS, default=None, metavar="FORMAT",
                      help=f"format of --input: {', '.join(FORMATS)} (default: detected from its first row)")  # fmt: skip
    conv.add_argument("--to", dest="to_format", choices=FORMATS, required=True, metavar="FORMAT",
                      help=f"format to write: {', '.join(FORMATS)}")  # fmt: skip
    conv.add_argument("--input", required=True, metavar="PATH", help="pairs: .jsonl, .parquet or a datasets folder")
    add_output_args(conv, help="where to write: .jsonl, .parquet, or any other name for a datasets folder",
                    metavar="PATH")  # fmt: skip
    add_progress_args(conv)
    conv.set_defaults(func=run_convert, command="data convert")


def run_convert(args: argparse.Namespace) -> int:
    from qembed.data.formats import note_lines
    from qembed.data.pairs import convert

    check_output(args.output, input=args.input)
    records, rows, notes = convert(args.input, args.output, from_format=args.from_format, to_format=args.to_format)
    for line in note_lines(notes, args.to_format):
        print(f"note: {line}")
    print(f"read {records} record(s), wrote {rows} {args.to_format} row(s) to {args.output}")
    return 0
