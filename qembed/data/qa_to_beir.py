"""Turn question–answer pair files into a BEIR retrieval folder.

The answers become the corpus (identical answers, after trimming whitespace, are one document); every
answer given to a question is relevant to it (a repeated question is one query with all its answers);
the distinct questions are split by a seeded shuffle into disjoint test and train query sets:
test = the first `min(num_queries, round(test_fraction * n))` questions of the shuffle, train = all the
others, so fine-tuning on the train queries never sees a test query.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qembed.data.beir import write_beir
from qembed.data.jsonl import check_encodable_json, parse_jsonl_line
from qembed.errors import QembedError

FORMATS = ("json", "jsonl", "csv")


@dataclass
class ConversionSummary:
    """What `qa_to_beir` did, for printing."""

    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    duplicate_answers: int = 0  # rows whose answer was already in the corpus
    repeated_questions: int = 0  # rows whose question was already a query
    num_docs: int = 0
    num_queries: int = 0
    num_train: int = 0
    num_test: int = 0
    num_judgments: int = 0

    def lines(self) -> list[str]:
        out = [f"rows read: {self.rows_read}"]
        out += [f"rows skipped ({reason}): {n}" for reason, n in sorted(self.skipped.items())]
        out += [
            f"duplicate answers merged: {self.duplicate_answers} (corpus: {self.num_docs} documents)",
            f"repeated questions merged: {self.repeated_questions} (queries: {self.num_queries}, "
            f"judgments: {self.num_judgments})",
            f"split: {self.num_test} test queries, {self.num_train} train queries (disjoint)",
        ]
        return out


def qa_to_beir(
    inputs: str | Path | list[str | Path],
    output: str | Path,
    *,
    question_field: str,
    answer_field: str,
    format: str | None = None,
    encoding: str = "utf-8",
    num_queries: int = 1000,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ConversionSummary:
    """Convert one or more QA files (JSON array, JSONL or CSV with a header) into a BEIR folder at `output`
    with `corpus.jsonl`, `queries.jsonl`, `qrels/train.tsv` and `qrels/test.tsv`."""
    if num_queries < 1:
        raise QembedError(f"--num-queries must be at least 1, got {num_queries}")
    if not 0 < test_fraction <= 1:
        raise QembedError(f"--test-fraction must be in (0, 1], got {test_fraction}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise QembedError(f"unknown encoding {encoding!r} (e.g. utf-8, gb18030, utf-16)") from None
    paths = [Path(p) for p in (inputs if isinstance(inputs, list) else [inputs])]

    summary = ConversionSummary()
    answers: dict[str, str] = {}  # answer text -> doc id
    questions: dict[str, dict[str, int]] = {}  # question text -> {doc id: 1}
    for path in paths:
        rows = read_rows(path, format=format, encoding=encoding)
        if rows and not any(question_field in r for r in rows):
            raise QembedError(f"{path}: no row has the question field {question_field!r} (fields: {sorted(rows[0])})")
        if rows and not any(answer_field in r for r in rows):
            raise QembedError(f"{path}: no row has the answer field {answer_field!r} (fields: {sorted(rows[0])})")
        for row in rows:
            summary.rows_read += 1
            question, answer = row.get(question_field), row.get(answer_field)
            reason = _skip_reason(question, question_field) or _skip_reason(answer, answer_field)
            if reason:
                summary.skipped[reason] += 1
                continue
            question, answer = question.strip(), answer.strip()
            if answer in answers:
                summary.duplicate_answers += 1
            else:
                answers[answer] = f"d{len(answers)}"
            if question in questions:
                summary.repeated_questions += 1
            questions.setdefault(question, {})[answers[answer]] = 1
    if not questions:
        raise QembedError(f"no usable question–answer row in {', '.join(map(str, paths))}")

    texts = list(questions)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    num_test = min(num_queries, round(test_fraction * len(order)))
    if num_test == 0:
        raise QembedError(f"no test queries: {len(order)} questions x test fraction {test_fraction} rounds to 0")
    test = {f"q{i}": questions[texts[i]] for i in sorted(order[:num_test])}
    train = {f"q{i}": questions[texts[i]] for i in sorted(order[num_test:])}

    corpus = {doc_id: text for text, doc_id in answers.items()}
    write_beir(output, corpus, {f"q{i}": text for i, text in enumerate(texts)}, {"train": train, "test": test})
    summary.num_docs, summary.num_queries = len(corpus), len(texts)
    summary.num_train, summary.num_test = len(train), len(test)
    summary.num_judgments = sum(len(j) for j in questions.values())
    return summary


def read_rows(path: Path, *, format: str | None = None, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Rows of a JSON array, JSONL or CSV (header) file; the format comes from the extension unless given."""
    if not path.is_file():
        raise QembedError(f"file not found: {path}")
    format = format or path.suffix.lower().lstrip(".")
    if format not in FORMATS:
        raise QembedError(f"{path}: cannot tell the format from the extension; pass --format {'|'.join(FORMATS)}")
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as exc:
        raise QembedError(f"{path}: not valid {encoding} ({exc.reason} at byte {exc.start}); try --encoding") from None
    text = text.removeprefix("\ufeff")
    if format == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QembedError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise QembedError(f"{path}: expected a JSON array of objects")
        check_encodable_json(data, text, path)
        return data
    if format == "jsonl":
        lines = enumerate(text.splitlines(), start=1)
        return [parse_jsonl_line(line, path, number) for number, line in lines if line.strip()]
    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise QembedError(f"{path}: invalid CSV ({exc})") from None


def _skip_reason(value: Any, name: str) -> str | None:
    if value is None:
        return f"no {name}"
    if not isinstance(value, str):
        return f"{name} not a string"
    if not value.strip():
        return f"empty {name}"
    return None
