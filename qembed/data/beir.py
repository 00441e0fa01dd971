"""BEIR retrieval folders: `corpus.jsonl` (`_id,title,text`), `queries.jsonl` (`_id,text`) and
`qrels/{split}.tsv` (`query-id  corpus-id  score`, with a header line)."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qembed.data.jsonl import iter_jsonl, parse_jsonl_line, write_jsonl
from qembed.errors import QembedError

log = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]
IN_MEMORY_MAX_BYTES = 1 << 30  # larger corpus files are read from disk on demand (see `DiskCorpus`)


@dataclass
class RetrievalDataset:
    """A document collection, queries and graded relevance judgments for one split.

    `corpus` maps doc id -> {"title", "text"} (a dict, or a `DiskCorpus` for collections too large to hold
    as text); `queries` maps query id -> text (only the queries judged in `qrels`); `qrels` maps query
    id -> {doc id: grade}.
    """

    corpus: Mapping[str, dict[str, str]]
    queries: dict[str, str]
    qrels: Qrels
    name: str = ""
    split: str = "test"
    skipped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, split: str = "test", *, in_memory: bool | None = None) -> RetrievalDataset:
        """Load a BEIR folder. Judgments naming an unknown document or query are skipped with a warning;
        missing files, an empty corpus or a split with no usable query raise `QembedError`.

        `in_memory=False` keeps only document ids and file offsets in memory (`DiskCorpus`); the default
        does so for corpus files over 1 GiB.
        """
        path = Path(path)
        if not path.is_dir():
            raise QembedError(f"dataset folder not found: {path}")
        corpus_path = path / "corpus.jsonl"
        if in_memory is None:
            in_memory = not corpus_path.is_file() or corpus_path.stat().st_size <= IN_MEMORY_MAX_BYTES
        corpus = read_corpus(corpus_path) if in_memory else DiskCorpus(corpus_path)
        if not corpus:
            raise QembedError(f"{path / 'corpus.jsonl'}: the corpus is empty")
        qrels_path = path / "qrels" / f"{split}.tsv"
        if not qrels_path.is_file():
            available = sorted(p.stem for p in (path / "qrels").glob("*.tsv")) if (path / "qrels").is_dir() else []
            raise QembedError(f"no qrels for split {split!r}: {qrels_path} not found (available: {available or 'none'})")
        raw_qrels = read_qrels(qrels_path)
        all_queries = read_queries(path / "queries.jsonl")

        qrels: Qrels = {}
        skipped = {"unknown_docs": 0, "unknown_queries": 0}
        for qid, judged in raw_qrels.items():
            if qid not in all_queries:
                skipped["unknown_queries"] += len(judged)
                continue
            kept = {did: grade for did, grade in judged.items() if did in corpus}
            skipped["unknown_docs"] += len(judged) - len(kept)
            if kept:
                qrels[qid] = kept
        if skipped["unknown_docs"]:
            log.warning("%s: skipped %d judgment(s) naming a document absent from the corpus",
                        qrels_path, skipped["unknown_docs"])
        if skipped["unknown_queries"]:
            log.warning("%s: skipped %d judgment(s) naming a query absent from queries.jsonl",
                        qrels_path, skipped["unknown_queries"])
        if not qrels:
            raise QembedError(f"{qrels_path}: no query of split {split!r} has a judged document in the corpus")
        queries = {qid: all_queries[qid] for qid in qrels}
        return cls(corpus=corpus, queries=queries, qrels=qrels, name=path.name, split=split, skipped=skipped)

    @property
    def doc_ids(self) -> list[str]:
        return list(self.corpus)

    @property
    def query_ids(self) -> list[str]:
        return list(self.queries)

    def doc_text(self, doc_id: str) -> str:
        """The text encoded for retrieval: `title + " " + text`, stripped (as BEIR and MTEB do)."""
        doc = self.corpus[doc_id]
        return f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()

    def doc_texts(self) -> list[str]:
        """Encoded texts of every document, in `doc_ids` order."""
        return list(self.iter_doc_texts())

    def iter_doc_texts(self) -> Iterator[str]:
        """Encoded texts in `doc_ids` order, one at a time (a `DiskCorpus` is read sequentially)."""
        docs = self.corpus.iter_docs() if isinstance(self.corpus, DiskCorpus) else self.corpus.values()
        for doc in docs:
            yield f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()

    def save(self, path: str | Path) -> None:
        """Write this dataset as a BEIR folder (its qrels under `qrels/{split}.tsv`)."""
        write_beir(path, self.corpus, self.queries, {self.split: self.qrels})


def read_corpus(path: Path) -> dict[str, dict[str, str]]:
    corpus: dict[str, dict[str, str]] = {}
    duplicates = 0
    for number, record in enumerate(iter_jsonl(path), start=1):
        doc_id, doc = _corpus_record(record, path, number)
        duplicates += doc_id in corpus
        corpus[doc_id] = doc
    if duplicates:
        log.warning("%s: %d duplicate document id(s); the last record of each wins", path, duplicates)
    return corpus


class DiskCorpus(Mapping):
    """A `corpus.jsonl` read on demand: holds only each document's id and byte offset.

    Opening validates every line (a malformed one raises `QembedError` with its line number);
    `corpus[doc_id]` reads one record; `iter_docs()` streams them in order.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise QembedError(f"file not found: {self.path}")
        self._offsets: dict[str, int] = {}
        duplicates = 0
        with self.path.open("rb") as f:
            offset = 0
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    doc_id, _ = _corpus_record(parse_jsonl_line(raw, self.path, number), self.path, number)
                    duplicates += doc_id in self._offsets
                    self._offsets[doc_id] = offset
                offset += len(raw)
        if duplicates:
            log.warning("%s: %d duplicate document id(s); the last record of each wins", self.path, duplicates)
        self._file = None

    def __getitem__(self, doc_id: str) -> dict[str, str]:
        offset = self._offsets[doc_id]
        if self._file is None:
            self._file = self.path.open("rb")
        self._file.seek(offset)
        return _corpus_record(json.loads(self._file.readline()), self.path, 0)[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._offsets

    def iter_docs(self) -> Iterator[dict[str, str]]:
        """Documents in `iter(self)` order, read sequentially when the file has no duplicate ids."""
        with self.path.open("rb") as f:
            offset = 0
            expected = iter(self._offsets.items())
            pending = next(expected, None)
            for raw in f:
                if pending is not None and offset == pending[1]:
                    yield _corpus_record(json.loads(raw), self.path, 0)[1]
                    pending = next(expected, None)
                offset += len(raw)
        while pending is not None:  # ids whose last record comes after a later-listed id (duplicates)
            yield self[pending[0]]
            pending = next(expected, None)


def read_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for number, record in enumerate(iter_jsonl(path), start=1):
        query_id = _record_id(record, path, number)
        text = record.get("text")
        if not isinstance(text, str):
            raise QembedError(f"{path}: record {number} ({query_id}): 'text' must be a string")
        queries[query_id] = text
    return queries


def read_qrels(path: Path) -> Qrels:
    """`query-id  corpus-id  score` rows (tab-separated); a first line whose score is not a number is a header."""
    qrels: Qrels = {}
    with path.open(encoding="utf-8", newline="") as f:
        for number, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 3:
                raise QembedError(f"{path}:{number}: expected 3 tab-separated columns (query-id, corpus-id, score)")
            try:
                grade = int(float(row[2]))
            except ValueError:
                if number == 1:
                    continue  # header
                raise QembedError(f"{path}:{number}: score {row[2]!r} is not a number") from None
            qrels.setdefault(row[0], {})[row[1]] = grade
    return qrels


def write_beir(path: str | Path, corpus: dict[str, dict[str, str]], queries: dict[str, str],
               qrels_by_split: dict[str, Qrels]) -> None:
    """Write a BEIR folder: `corpus.jsonl`, `queries.jsonl` and one `qrels/{split}.tsv` per split."""
    path = Path(path)
    write_jsonl(path / "corpus.jsonl",
                [{"_id": i, "title": d.get("title", ""), "text": d.get("text", "")} for i, d in corpus.items()])
    write_jsonl(path / "queries.jsonl", [{"_id": i, "text": t} for i, t in queries.items()])
    (path / "qrels").mkdir(parents=True, exist_ok=True)
    for split, qrels in qrels_by_split.items():
        lines = ["query-id\tcorpus-id\tscore"]
        lines += [f"{qid}\t{did}\t{grade}" for qid, judged in qrels.items() for did, grade in judged.items()]
        (path / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _corpus_record(record: dict, path: Path, number: int) -> tuple[str, dict[str, str]]:
    doc_id = _record_id(record, path, number)
    text = record.get("text")
    title = record.get("title") or ""
    if not isinstance(text, str) or not isinstance(title, str):
        raise QembedError(f"{path}: record {number} ({doc_id}): 'text' and 'title' must be strings")
    return doc_id, {"title": title, "text": text}


def _record_id(record: dict, path: Path, number: int) -> str:
    value = record.get("_id")
    if value is None or isinstance(value, (dict, list)) or str(value) == "":
        raise QembedError(f"{path}: record {number} has no '_id'")
    return str(value)
