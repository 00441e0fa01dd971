"""BEIR retrieval folders: `corpus.jsonl` (`_id,title,text`), `queries.jsonl` (`_id,text`) and
`qrels/{split}.tsv` (`query-id  corpus-id  score`, with a header line); optionally `dataset.json` with a
`name` shown in reports. Document and query ids must be unique (`qembed.data.corpus`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qembed.data.corpus import iter_ids, open_corpus, record_id
from qembed.data.jsonl import UniqueIds, iter_lines, iter_numbered_jsonl, write_jsonl
from qembed.errors import QembedError

log = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]


@dataclass
class RetrievalDataset:
    """A document collection, queries and graded relevance judgments for one split.

    `corpus` maps doc id -> the text encoded for retrieval (title and text joined by
    `qembed.data.text.join_title`): a dict, or a `CorpusFile` for collections too large to hold as text
    (see `qembed.data.corpus`); `queries` maps query id -> text (only the queries judged in `qrels`);
    `qrels` maps query id -> {doc id: grade}.
    """

    corpus: Mapping[str, str]
    queries: dict[str, str]
    qrels: Qrels
    name: str = ""
    split: str = "test"
    skipped: dict[str, int] = field(default_factory=dict)
    _doc_ids: tuple[Mapping[str, str], list[str]] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path, split: str = "test", *, in_memory: bool | None = None) -> RetrievalDataset:
        """Load a BEIR folder. Judgments naming an unknown document or query are skipped with a warning;
        missing files, an empty corpus or a split with no usable query raise `QembedError`.

        `in_memory=False` keeps only document ids and file offsets in memory (`CorpusFile`); the default
        does so for corpus files over 1 GiB. Blank documents are kept, as in the dataset.
        """
        path = Path(path)
        if not path.is_dir():
            raise QembedError(f"dataset folder not found: {path}")
        corpus = open_corpus(path / "corpus.jsonl", keep_blank=True, in_memory=in_memory)
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
        return cls(corpus=corpus, queries=queries, qrels=qrels, name=dataset_name(path), split=split,
                   skipped=skipped)  # fmt: skip

    @property
    def doc_ids(self) -> list[str]:
        """Document ids in corpus order: one list, built once (evaluation reads it once per query); rebuilt
        only when `corpus` is replaced or changes size. Treat it as read-only."""
        ids = getattr(self.corpus, "ids", None)  # a `CorpusFile` keeps its own list
        if isinstance(ids, list):
            return ids
        cached = self._doc_ids
        if cached is None or cached[0] is not self.corpus or len(cached[1]) != len(self.corpus):
            cached = self._doc_ids = (self.corpus, list(self.corpus))
        return cached[1]

    @property
    def query_ids(self) -> list[str]:
        return list(self.queries)

    def doc_text(self, doc_id: str) -> str:
        """The text encoded for retrieval (title and text joined)."""
        return self.corpus[doc_id]

    def doc_texts(self) -> list[str]:
        """Encoded texts of every document, in `doc_ids` order."""
        return list(self.iter_doc_texts())

    def iter_doc_texts(self) -> Iterator[str]:
        """Encoded texts in `doc_ids` order, one at a time (a `CorpusFile` is read sequentially)."""
        return iter(self.corpus.values())

    def save(self, path: str | Path) -> None:
        """Write this dataset as a BEIR folder (its qrels under `qrels/{split}.tsv`)."""
        write_beir(path, self.corpus, self.queries, {self.split: self.qrels})


def read_queries(path: Path) -> dict[str, str]:
    """`{query id: text}` of a BEIR `queries.jsonl` (every record needs an `_id` or `id`, each id once)."""
    queries: dict[str, str] = {}
    ids = UniqueIds(path, "query id", lambda: iter_ids(path))
    for number, record in iter_numbered_jsonl(path):
        query_id, text = record_id(record, path, number), record.get("text")
        if query_id is None:
            raise QembedError(f"{path}:{number}: no '_id'")
        ids.add(query_id, number)
        if not isinstance(text, str):
            raise QembedError(f"{path}:{number} ({query_id}): 'text' must be a string")
        queries[query_id] = text
    return queries


def read_query_file(path: str | Path) -> list[str]:
    """Query texts of a file, in order: JSONL (a `.jsonl` name, or a first line that starts with `{`) with a
    `text` or `query` field per record, else one query per non-blank line."""
    path = Path(path)
    first = next((raw for _, _, raw in iter_lines(path) if raw.strip()), b"")
    queries = []
    if path.suffix == ".jsonl" or first.lstrip().startswith(b"{"):
        for number, record in iter_numbered_jsonl(path):
            text = record.get("text", record.get("query"))
            if not isinstance(text, str) or not text.strip():
                raise QembedError(f"{path}:{number}: no 'text' or 'query' field holding a non-empty string")
            queries.append(text)
    else:
        for number, _, raw in iter_lines(path):
            try:
                text = raw.decode("utf-8").lstrip("\ufeff").strip()
            except UnicodeDecodeError as exc:
                raise QembedError(f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if text:
                queries.append(text)
    if not queries:
        raise QembedError(f"{path}: no queries (the file is empty)")
    return queries


def read_qrels(path: Path) -> Qrels:
    """`query-id  corpus-id  score` rows (tab-separated); a first line whose score is not a number is a header."""
    qrels: Qrels = {}
    for number, _, raw in iter_lines(path):
        try:
            row = raw.decode("utf-8").rstrip("\r\n").split("\t")  # one row per line, no quoting
        except UnicodeDecodeError as exc:
            raise QembedError(f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not "".join(row).strip():
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


GENERIC_FOLDER_NAMES = frozenset({"beir", "data", "dataset", "datasets", "qa", "corpus"})


def dataset_name(path: str | Path) -> str:
    """The name reports show for a BEIR folder: `name` in its `dataset.json`, else the folder's name, or for a
    folder with a generic name (`beir`, `data`, ...: `GENERIC_FOLDER_NAMES`) the first parent folder whose
    name is not generic (`cmrc/beir` -> `cmrc`; an `adapt` output's `OUT/data/beir` -> `OUT`)."""
    path = Path(path)
    meta = path / "dataset.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_text(encoding="utf-8")).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name.strip():
            return name.strip()
    for folder in (path, *path.resolve().parents):
        if folder.name and folder.name.lower() not in GENERIC_FOLDER_NAMES:
            return folder.name
    return path.name or str(path)


def write_beir(path: str | Path, corpus: Mapping[str, str | dict[str, str]], queries: Mapping[str, str],
               qrels_by_split: dict[str, Qrels]) -> None:
    """Write a BEIR folder: `corpus.jsonl`, `queries.jsonl` and one `qrels/{split}.tsv` per split.

    Corpus values are texts (written with an empty title) or `{"title", "text"}` dicts."""
    path = Path(path)
    write_jsonl(path / "corpus.jsonl", ({"_id": i, **_title_text(d)} for i, d in corpus.items()))
    write_jsonl(path / "queries.jsonl", ({"_id": i, "text": t} for i, t in queries.items()))
    (path / "qrels").mkdir(parents=True, exist_ok=True)
    for split, qrels in qrels_by_split.items():
        lines = ["query-id\tcorpus-id\tscore"]
        lines += [f"{qid}\t{did}\t{grade}" for qid, judged in qrels.items() for did, grade in judged.items()]
        (path / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _title_text(doc: str | dict[str, str]) -> dict[str, str]:
    if isinstance(doc, str):
        return {"title": "", "text": doc}
    return {"title": doc.get("title") or "", "text": doc.get("text") or ""}
