"""Reading plain text inputs: `.txt` (one text per line) or `.jsonl` with a text field."""

from __future__ import annotations

from pathlib import Path

from qembed.data.jsonl import iter_jsonl
from qembed.errors import QembedError


def read_texts(path: str | Path, *, field: str = "text") -> list[str]:
    """Texts from a `.txt` file (one per line, trailing newline stripped) or `.jsonl` (`field` of each line).

    For a BEIR `corpus.jsonl` with `field="text"`, a non-empty `title` is prepended as `title + " " + text`.
    """
    path = Path(path)
    if not path.is_file():
        raise QembedError(f"file not found: {path}")
    if path.suffix == ".jsonl":
        texts = []
        for number, record in enumerate(iter_jsonl(path), start=1):
            if field not in record:
                raise QembedError(f"{path}: record {number} has no field {field!r} (fields: {sorted(record)})")
            value = record[field]
            if not isinstance(value, str):
                raise QembedError(f"{path}: record {number}: field {field!r} is not a string")
            title = record.get("title") if field == "text" else None
            texts.append(f"{title} {value}".strip() if title else value)
        return texts
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QembedError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return content.splitlines()
