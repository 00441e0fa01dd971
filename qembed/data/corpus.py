"""Corpus files: the one reader of documents, used by `synth`, `mine`, `eval`, `embed`, `rerank` and `index`.

Formats: a BEIR folder (its `corpus.jsonl`), any `.jsonl` with a text field, a `.parquet` file with the same
fields (its rows are numbered like lines; needs pyarrow), or a `.txt` file with one document per line. A
document's text is `join_title(title, text)` (a `title` is optional).

Ids: a record's `_id`, else its `id`, else its 1-based line (or Parquet row) number in the file; a `.txt`
document's id is its 1-based line number. Line numbers count blank lines, so an id stays the same when the
same file is read again, names the line an editor (and every error message) shows, and is the same in every
command.
Every id appears once: a repeated id is an error naming the file and both lines, raised while reading
(`qembed.data.jsonl.UniqueIds`), so it is reported before any model work. Text that is not valid Unicode (a
lone UTF-16 surrogate such as JSON's `"\\ud800"`, invalid UTF-8) is a `file:line` error too.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterator, Mapping, ValuesView
from pathlib import Path
from typing import NamedTuple

from qembed.data.jsonl import UniqueIds, check_unique_ids, iter_lines, iter_numbered_jsonl, parse_jsonl_line
from qembed.data.text import join_title
from qembed.errors import QembedError

log = logging.getLogger(__name__)

ID_FIELDS = ("_id", "id")
IN_MEMORY_MAX_BYTES = 1 << 30  # `open_corpus` keeps larger files on disk (`CorpusFile`)


class Document(NamedTuple):
    """A corpus document: its id (`_id`, else `id`, else the 1-based line number) and its text (title + " " + text when titled)."""

    doc_id: str
    text: str


def iter_corpus(path: str | Path, *, text_field: str = "text", keep_blank: bool = False,
                check_ids: bool = True) -> Iterator[Document]:
    """Stream the documents of a corpus file or BEIR folder in file order, one line at a time.

    Blank documents are skipped (with a logged count) unless `keep_blank`; bad records raise `QembedError`
    naming the file and line. `check_ids=False` skips the repeated-id check (it holds every id in a set):
    for callers that ran `check_corpus` first and stream a corpus of any size."""
    for _, doc in _iter_with_offsets(corpus_path(path), text_field, keep_blank, check_ids):
        yield doc


def read_corpus(path: str | Path, *, text_field: str = "text", limit: int | None = None,
                keep_blank: bool = False) -> dict[str, str]:
    """The first `limit` (default: all) documents in memory, as `{doc_id: text}` in file order."""
    path = corpus_path(path)
    corpus: dict[str, str] = {}
    docs = iter_corpus(path, text_field=text_field, keep_blank=keep_blank)
    while limit is None or len(corpus) < limit:  # stop before reading past the limit
        doc = next(docs, None)
        if doc is None:
            break
        corpus[doc.doc_id] = doc.text
    _check(path, len(corpus))
    return corpus


def check_corpus(path: str | Path, *, text_field: str = "text") -> int:
    """Read a corpus once without keeping its texts, raising `QembedError` (`file:line`) on anything a later
    read would refuse: a bad record, invalid text, a repeated id, an empty corpus. Returns the number of
    documents (blank ones included). For verbs that stream a corpus into long work (`index build`); memory:
    8 bytes per document (`check_unique_ids`)."""
    path = corpus_path(path)
    numbered = ((number, doc.doc_id) for number, doc in _iter_with_offsets(path, text_field, True, False))
    if _has_records(path):
        count = check_unique_ids(path, "document id", numbered, lambda: iter_ids(path))
    else:  # .txt: ids are line numbers
        count = sum(1 for _ in numbered)
    _check(path, count)
    return count


def open_corpus(path: str | Path, *, text_field: str = "text", keep_blank: bool = False,
                in_memory: bool | None = None) -> Mapping[str, str]:
    """`{doc_id: text}`: a dict (`read_corpus`), or for files over 1 GiB (or `in_memory=False`) a
    `CorpusFile` that holds only ids and byte offsets (Parquet: row numbers)."""
    path = corpus_path(path)
    if in_memory is None:
        in_memory = not path.is_file() or path.stat().st_size <= IN_MEMORY_MAX_BYTES
    if in_memory:
        return read_corpus(path, text_field=text_field, keep_blank=keep_blank)
    return CorpusFile(path, text_field=text_field, keep_blank=keep_blank)


def read_texts(path: str | Path, *, field: str = "text") -> list[str]:
    """Every document's text in file order, blank ones included (so row i is document i of the file)."""
    return [doc.text for doc in iter_corpus(path, text_field=field, keep_blank=True)]


def corpus_path(path: str | Path) -> Path:
    """A BEIR folder's `corpus.jsonl`, else `path` itself."""
    path = Path(path)
    return path / "corpus.jsonl" if path.is_dir() else path


class CorpusFile(Mapping):
    """`{doc_id: text}` read from disk on demand: memory holds each document's id and byte offset only.

    Opening reads the file once and validates every record. `corpus[doc_id]` and `text(row)` read one
    line; `values()` streams the texts in order.
    """

    def __init__(self, path: str | Path, *, text_field: str = "text", keep_blank: bool = False) -> None:
        self.path = corpus_path(path)
        self._options = (text_field, keep_blank)
        self.ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._offsets = array("q")
        for offset, doc in _iter_with_offsets(self.path, text_field, keep_blank):  # ids are unique (the reader)
            self._rows[doc.doc_id] = len(self.ids)
            self.ids.append(doc.doc_id)
            self._offsets.append(offset)
        _check(self.path, len(self.ids))
        self._lines = None  # the open JSONL/TSV file, once a text is read
        self._records = None  # a Parquet corpus's `ParquetRows`, once a text is read

    def text(self, row: int) -> str:
        """The text of the document at position `row` (in `ids` order)."""
        offset = self._offsets[row]  # a byte offset; for Parquet, the row number
        if self.path.suffix == ".parquet":
            if self._records is None:
                from qembed.data.formats import ParquetRows

                self._records = ParquetRows(self.path)
            return parse_corpus_record(self._records[offset], self.path, offset + 1, self._options[0]).text
        if self._lines is None:
            self._lines = self.path.open("rb")
        self._lines.seek(offset)
        doc = _parse(self._lines.readline(), self.path, 0, self._options[0], self.path.suffix == ".jsonl")
        return doc.text

    @property
    def rows(self) -> Mapping[str, int]:
        """`{doc_id: row}` (the position in `ids`)."""
        return self._rows

    def __getitem__(self, doc_id: str) -> str:
        return self.text(self._rows[doc_id])

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._rows

    def values(self) -> ValuesView:
        return _StreamedTexts(self)

    def iter_texts(self) -> Iterator[str]:
        """Texts in `ids` order, read sequentially."""
        for _, doc in _iter_with_offsets(self.path, *self._options):
            yield doc.text


class _StreamedTexts(ValuesView):
    def __iter__(self) -> Iterator[str]:
        return self._mapping.iter_texts()


def record_id(record: dict, path: Path, number: int) -> str | None:
    """The record's `_id`, else `id` (as a string), else None."""
    for name in ID_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, (dict, list, bool)) or str(value) == "":
            raise QembedError(f"{path}:{number}: {name!r} must be a non-empty string or number")
        return str(value)
    return None


def iter_ids(path: str | Path) -> Iterator[tuple[int, str]]:
    """`(line or row number, id)` of every record of a JSONL or Parquet corpus or queries file (the id rule
    above)."""
    for number, record in _iter_records(Path(path)):
        yield number, record_id(record, Path(path), number) or str(number)


def _has_records(path: Path) -> bool:
    return path.suffix in (".jsonl", ".parquet")


def _iter_records(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".parquet":
        from qembed.data.formats import iter_rows

        return iter_rows(path)
    return iter_numbered_jsonl(path)


def _iter_with_offsets(path: Path, text_field: str, keep_blank: bool,
                       check_ids: bool = True) -> Iterator[tuple[int, Document]]:
    if not path.is_file():
        raise QembedError(f"corpus file not found: {path}")
    checked = _has_records(path) and check_ids  # .txt: ids are line numbers
    ids = UniqueIds(path, "document id", lambda: iter_ids(path)) if checked else None
    blank = 0
    if path.suffix == ".parquet":  # offset: the row's index
        numbered = ((number, number - 1, parse_corpus_record(record, path, number, text_field))
                    for number, record in _iter_records(path))  # fmt: skip
    else:
        numbered = ((number, offset, parse_corpus_line(raw, path, number, text_field))
                    for number, offset, raw in iter_lines(path))  # fmt: skip
    for number, offset, doc in numbered:
        if doc is None:
            continue  # not a record
        if ids is not None:
            ids.add(doc.doc_id, number)
        if doc.text or keep_blank:
            yield offset, doc
        else:
            blank += 1
    if blank:
        log.warning("%s: skipped %d blank document(s)", path, blank)


def parse_corpus_line(raw: bytes, path: Path, number: int, text_field: str = "text") -> Document | None:
    """The document on line `number` of a corpus file (a `.jsonl` record or a `.txt` line), or None for a
    blank `.jsonl` line (not a record); a bad record raises `QembedError` naming `path:number`."""
    jsonl = path.suffix == ".jsonl"
    if jsonl and not raw.strip():
        return None
    return _parse(raw, path, number, text_field, jsonl)


def _parse(raw: bytes, path: Path, number: int, text_field: str, jsonl: bool) -> Document:
    if not jsonl:
        try:
            return Document(str(number), join_title(None, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise QembedError(f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return parse_corpus_record(parse_jsonl_line(raw, path, number), path, number, text_field)


def parse_corpus_record(record: dict, path: Path, number: int, text_field: str = "text") -> Document:
    """The document of a JSONL or Parquet record (`number`: its line or row, for ids and errors)."""
    text, title = record.get(text_field), record.get("title")
    if not isinstance(text, str):
        raise QembedError(f"{path}:{number}: no field {text_field!r} holding a string (fields: {sorted(record)})")
    if title is not None and not isinstance(title, str):
        raise QembedError(f"{path}:{number}: 'title' must be a string")
    doc = Document(record_id(record, path, number) or str(number), join_title(title, text))
    try:
        doc.text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a JSON escape of half a UTF-16 pair: no model can read it
        raise QembedError(f"{path}:{number}: the text is not valid Unicode (a lone surrogate "
                          f"U+{ord(doc.text[exc.start]):04X} at character {exc.start})") from None
    return doc


def _check(path: Path, count: int) -> None:
    if not count:
        raise QembedError(f"{path}: the corpus is empty (no documents)")
