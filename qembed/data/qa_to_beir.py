"""Turn question–answer pair files into a BEIR retrieval folder.

The answers become the corpus (identical answers, after trimming whitespace, are one document); every
answer given to a question is relevant to it (a repeated question is one query with all its answers).
SQuAD-style JSON (`data[].paragraphs[].context` with `qas[].question`: SQuAD, CMRC2018, DRCD) is read as
rows `{"question", "context"}`: the paragraphs become the corpus, the questions the queries.
The distinct questions are split into disjoint train / dev / test sets by `qembed.data.splits.split_queries`
(seeded; questions sharing an answer stay in one split), the one split function `qembed adapt --qa` uses too,
so the same file, fields and seed give the same split in both verbs.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qembed.data.beir import write_beir
from qembed.data.jsonl import check_encodable_json, parse_jsonl_line
from qembed.data.splits import SplitSizes, split_queries
from qembed.errors import QembedError

FORMATS = ("json", "jsonl", "csv", "squad")
SQUAD_FIELDS = ("question", "context")  # the question and answer fields of SQuAD rows
DEFAULTS = SplitSizes()  # the split sizes every verb uses by default


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
    num_dev: int = 0
    num_test: int = 0
    num_judgments: int = 0

    def lines(self) -> list[str]:
        out = [f"rows read: {self.rows_read}"]
        out += [f"rows skipped ({reason}): {n}" for reason, n in sorted(self.skipped.items())]
        out += [
            f"duplicate answers merged: {self.duplicate_answers} (corpus: {self.num_docs} documents)",
            f"repeated questions merged: {self.repeated_questions} (queries: {self.num_queries}, "
            f"judgments: {self.num_judgments})",
            f"split: {self.num_test} test, {self.num_dev} dev, {self.num_train} train queries (disjoint; "
            "questions sharing an answer are in one split)",
        ]
        return out


def qa_to_beir(
    inputs: str | Path | list[str | Path],
    output: str | Path,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    format: str | None = None,
    encoding: str = "utf-8",
    num_queries: int | None = DEFAULTS.max_test,
    test_fraction: float = DEFAULTS.test_fraction,
    dev_fraction: float = DEFAULTS.dev_fraction,
    max_dev: int | None = DEFAULTS.max_dev,
    seed: int = 0,
) -> ConversionSummary:
    """Convert one or more QA files (JSON array, JSONL, CSV with a header, or SQuAD JSON) into a BEIR folder
    at `output` with `corpus.jsonl`, `queries.jsonl` and `qrels/{train,dev,test}.tsv` (dev only when not
    empty). `num_queries` caps the test queries, `max_dev` the dev queries (see `split_queries`). The fields
    default to SQuAD's (`question`, `context`) for SQuAD files and are required for the others."""
    if num_queries is not None and num_queries < 1:
        raise QembedError(f"--num-queries must be at least 1, got {num_queries}")
    if not 0 < test_fraction < 1:
        raise QembedError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if not 0 <= dev_fraction < 1 or dev_fraction + test_fraction >= 1:
        raise QembedError(f"--dev-fraction must be in [0, 1) with dev + test < 1, got {dev_fraction}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise QembedError(f"unknown encoding {encoding!r} (e.g. utf-8, gb18030, utf-16)") from None
    paths = [Path(p) for p in (inputs if isinstance(inputs, list) else [inputs])]

    summary = ConversionSummary()
    answers: dict[str, str] = {}  # answer text -> doc id
    questions: dict[str, dict[str, int]] = {}  # question text -> {doc id: 1}
    for path in paths:
        rows, squad = read_qa(path, format=format, encoding=encoding)
        question_field, answer_field = _fields(path, squad, question_field, answer_field)
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
    sizes = SplitSizes(dev_fraction, test_fraction, max_dev, num_queries)
    splits = split_queries({f"q{i}": questions[text] for i, text in enumerate(texts)}, sizes, seed=seed)
    splits = {name: dict(sorted(part.items(), key=lambda item: int(item[0][1:]))) for name, part in splits.items()
              if part or name != "dev"}  # fmt: skip

    corpus = {doc_id: text for text, doc_id in answers.items()}
    write_beir(output, corpus, {f"q{i}": text for i, text in enumerate(texts)}, splits)
    summary.num_docs, summary.num_queries = len(corpus), len(texts)
    summary.num_train, summary.num_dev, summary.num_test = (len(splits.get(n, {})) for n in ("train", "dev", "test"))
    summary.num_judgments = sum(len(j) for j in questions.values())
    return summary


def _fields(path: Path, squad: bool, question_field: str | None, answer_field: str | None) -> tuple[str, str]:
    if squad:
        return question_field or SQUAD_FIELDS[0], answer_field or SQUAD_FIELDS[1]
    if not question_field or not answer_field:
        raise QembedError(f"{path}: not a SQuAD file, so --question-field and --answer-field are needed")
    return question_field, answer_field


def read_rows(path: Path, *, format: str | None = None, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Rows of a JSON array, JSONL, CSV (header) or SQuAD file (see `read_qa`)."""
    return read_qa(path, format=format, encoding=encoding)[0]


def read_qa(path: Path, *, format: str | None = None, encoding: str = "utf-8") -> tuple[list[dict[str, Any]], bool]:
    """`(rows, is_squad)` of a JSON array, JSONL, CSV (header) or SQuAD JSON file; the format comes from the
    extension unless given, and a `.json` file holding a SQuAD object (`{"data": [{"paragraphs": ...}]}`)
    is read as SQuAD: one row `{"question", "context", "title"}` per answerable question."""
    path = Path(path)
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
    if format in ("json", "squad"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QembedError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        check_encodable_json(data, text, path)
        if format == "squad" or _looks_like_squad(data):
            return squad_rows(data, path), True
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise QembedError(f"{path}: expected a JSON array of objects (or a SQuAD object with data[].paragraphs)")
        return data, False
    if format == "jsonl":
        lines = enumerate(text.splitlines(), start=1)
        return [parse_jsonl_line(line, path, number) for number, line in lines if line.strip()], False
    try:
        return list(csv.DictReader(io.StringIO(text, newline=""))), False
    except csv.Error as exc:
        raise QembedError(f"{path}: invalid CSV ({exc})") from None


def _looks_like_squad(data: Any) -> bool:
    items = data.get("data") if isinstance(data, dict) else None
    return (isinstance(items, list) and bool(items) and all(isinstance(a, dict) for a in items)
            and all(isinstance(a.get("paragraphs"), list) for a in items))  # fmt: skip


def squad_rows(data: Any, path: Path) -> list[dict[str, Any]]:
    """One `{"question", "context", "title"}` row per question of a SQuAD-style object; questions marked
    `is_impossible` (SQuAD 2.0: the paragraph does not answer them) are left out."""
    if not _looks_like_squad(data):
        raise QembedError(f"{path}: not a SQuAD file (expected {{\"data\": [{{\"paragraphs\": [...]}}]}})")
    rows = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            if not isinstance(paragraph, dict):
                raise QembedError(f"{path}: a paragraph is not an object (expected context and qas)")
            for qa in paragraph.get("qas") or []:
                if isinstance(qa, dict) and not qa.get("is_impossible"):
                    rows.append({"question": qa.get("question"), "context": paragraph.get("context"),
                                 "title": article.get("title")})  # fmt: skip
    return rows


def _skip_reason(value: Any, name: str) -> str | None:
    if value is None:
        return f"no {name}"
    if not isinstance(value, str):
        return f"{name} not a string"
    if not value.strip():
        return f"empty {name}"
    return None
