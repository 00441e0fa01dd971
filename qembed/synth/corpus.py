"""Reading the documents to synthesise from: a BEIR `corpus.jsonl`, any `.jsonl` with a text field, or
a `.txt` file with one document per line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qembed.data.jsonl import iter_jsonl
from qembed.errors import QembedError

ID_FIELDS = ("_id", "id", "doc_id", "docid")


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


def read_corpus(path: str | Path, *, text_field: str = "text", limit: int | None = None) -> list[Document]:
    """Documents in file order, blank ones skipped. JSONL ids come from `_id`/`id`/`doc_id` (else the line
    number); a non-empty `title` is prepended to the text. `.txt` ids are line numbers (1-based), so they
    stay stable when the same file is read again."""
    path = Path(path)
    if not path.is_file():
        raise QembedError(f"corpus file not found: {path}")
    docs: list[Document] = []
    if path.suffix == ".jsonl":
        for number, record in enumerate(iter_jsonl(path), start=1):
            text = record.get(text_field)
            if not isinstance(text, str):
                raise QembedError(f"{path}: record {number} has no string field {text_field!r} (fields: {sorted(record)})")
            doc_id = next((record[f] for f in ID_FIELDS if f in record), number)
            title = record.get("title")
            text = f"{title} {text}".strip() if isinstance(title, str) and title.strip() else text.strip()
            if text:
                docs.append(Document(str(doc_id), text))
            if limit is not None and len(docs) >= limit:
                break
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise QembedError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        for number, line in enumerate(lines, start=1):
            if line.strip():
                docs.append(Document(str(number), line.strip()))
            if limit is not None and len(docs) >= limit:
                break
    seen: set[str] = set()
    for doc in docs:
        if doc.doc_id in seen:
            raise QembedError(f"{path}: document id {doc.doc_id!r} appears more than once")
        seen.add(doc.doc_id)
    if not docs:
        raise QembedError(f"{path}: no documents")
    return docs
