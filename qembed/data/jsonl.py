"""JSONL reading and crash-safe appending, shared by every long-running command."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from qembed.errors import QembedError
from qembed.files import atomic_open


def iter_jsonl(path: str | Path, *, allow_truncated_tail: bool = False) -> Iterator[dict[str, Any]]:
    """Yield one dict per non-blank line, reading the file line by line (never whole).

    A malformed line raises `QembedError` naming the file and line number. With
    `allow_truncated_tail`, a malformed *last* line without a trailing newline (a run killed
    mid-write) is ignored instead.
    """
    for _, record in iter_numbered_jsonl(path, allow_truncated_tail=allow_truncated_tail):
        yield record


def iter_numbered_jsonl(path: str | Path, *, allow_truncated_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number from 1, record)` for every non-blank line: `iter_jsonl` with line numbers for messages."""
    for number, _, raw in iter_lines(path):
        if not raw.strip():
            continue
        if allow_truncated_tail and not raw.endswith(b"\n"):  # only the last line can lack its newline
            try:
                json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return  # a partial last line left by a killed writer
        yield number, parse_jsonl_line(raw, path, number)


def iter_lines(path: str | Path) -> Iterator[tuple[int, int, bytes]]:
    """`(line number from 1, byte offset, raw line with its newline)` for every line of a file, streamed."""
    path = Path(path)
    if not path.is_file():
        raise QembedError(f"file not found: {path}")
    with path.open("rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            yield number, offset, raw
            offset += len(raw)


def parse_jsonl_line(raw: bytes | str, path: str | Path, number: int) -> dict[str, Any]:
    """One JSONL line as a dict; anything else raises `QembedError` naming the file and line number."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QembedError(f"{path}:{number}: invalid JSON line ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(record, dict):
        raise QembedError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    if _SURROGATE_ESCAPE[isinstance(raw, str)].search(raw):  # only a \\uD800-\\uDFFF escape can make one
        check_encodable(record, f"{path}:{number}")
    return record


# A JSON escape of a UTF-16 surrogate (paired or lone), in bytes and in text.
_SURROGATE_ESCAPE = (re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}"), re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}"))


def check_encodable(value: Any, where: str) -> None:
    """Raise `QembedError` at `where` (`file:line`) when a string in `value` (nested in lists and dicts, keys
    included) cannot be written as UTF-8: a lone UTF-16 surrogate such as JSON's `"\\ud800"`. Every reader of
    JSON input calls this, so bad text is reported before any work instead of crashing a tokenizer or a
    writer later."""
    found = _unencodable(value, "")
    if found is not None:
        field, char = found
        raise QembedError(f"{where}: {field or 'the text'} holds a lone UTF-16 surrogate (U+{ord(char):04X}), "
                          "which is not valid Unicode text: fix or remove it in the file")  # fmt: skip


def _unencodable(value: Any, field: str) -> tuple[str, str] | None:
    """(field path, first bad character) of the first string that UTF-8 cannot encode, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return field, value[exc.start]
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unencodable(key, field or "a key") or _unencodable(item, f"{field}[{key!r}]" if field else repr(key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unencodable(item, f"{field}[{index}]")
            if found is not None:
                return found
    return None


def check_encodable_json(data: Any, text: str, path: str | Path) -> None:
    """`check_encodable` for a whole JSON document: `data` parsed from `text`; the error names `path` and the
    line of the bad escape."""
    if _SURROGATE_ESCAPE[1].search(text) and _unencodable(data, "") is not None:
        check_encodable(data, f"{path}:{surrogate_line(text)}")


def surrogate_line(text: str) -> int:
    """The 1-based line of `text` (a JSON document) holding its first escape of a lone UTF-16 surrogate (a
    high one not followed by a low one, or a low one on its own); 1 when none is found."""
    for match in _SURROGATE_ESCAPE[1].finditer(text):
        code = int(match.group()[2:], 16)
        after = text[match.end() : match.end() + 6]
        before = text[max(0, match.start() - 6) : match.start()]
        paired = (code < 0xDC00 and bool(_SURROGATE_ESCAPE[1].fullmatch(after)) and int(after[2:], 16) >= 0xDC00) or (
            code >= 0xDC00 and bool(_SURROGATE_ESCAPE[1].fullmatch(before)) and int(before[2:], 16) < 0xDC00)
        if not paired:
            return text.count("\n", 0, match.start()) + 1
    return 1


class UniqueIds:
    """The one rule for ids in an input file (documents, queries): each appears once. `add(id, line)` raises
    `QembedError` naming the file and both lines when an id repeats.

    Memory holds the ids only: the line of an id's first appearance is found by reading the file again
    (`reread`, yielding `(line, id)`), which happens only when a repeat is found."""

    def __init__(self, path: str | Path, what: str, reread: Callable[[], Iterable[tuple[int, str]]]) -> None:
        self.path, self.what, self._reread = path, what, reread
        self._seen: set[str] = set()

    def add(self, item_id: str, number: int) -> None:
        if item_id in self._seen:
            first = next((n for n, i in self._reread() if i == item_id), None)
            raise QembedError(f"{self.path}:{number}: duplicate {self.what} {item_id!r}, first on line {first}: "
                              f"every {self.what} must be unique (remove or rename one)")  # fmt: skip
        self._seen.add(item_id)

    def __len__(self) -> int:
        return len(self._seen)


def check_unique_ids(path: str | Path, what: str, numbered_ids: Iterable[tuple[int, str]],
                     reread: Callable[[], Iterable[tuple[int, str]]]) -> int:
    """`UniqueIds`' rule in bounded memory, for files too large to hold their ids: 8 bytes per id (a hash in
    a numpy array, sorted once at the end); only when two hashes are equal is the file read again, with the
    suspects' ids in a set, to name both lines. Returns how many ids were read."""
    import numpy as np

    hashes = np.fromiter((_id_hash(item_id) for _, item_id in numbered_ids), dtype=np.int64)
    hashes.sort()
    same = hashes[1:][hashes[1:] == hashes[:-1]]
    if len(same):
        suspects = set(same.tolist())
        ids = UniqueIds(path, what, reread)
        for number, item_id in reread():
            if _id_hash(item_id) in suspects:
                ids.add(item_id, number)
    return len(hashes)


def _id_hash(item_id: str) -> int:
    import hashlib

    digest = hashlib.blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def read_jsonl(path: str | Path, **kwargs: Any) -> list[dict[str, Any]]:
    return list(iter_jsonl(path, **kwargs))


def drop_truncated_tail(path: str | Path) -> int:
    """Cut a partial last line (no trailing newline) left by a killed writer. Returns bytes removed.

    Reads backwards from the end only as far as the last newline, never the whole file."""
    path = Path(path)
    if not path.exists():
        return 0
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end, keep = size, 0
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            block = f.read(end - start)
            if end == size and block.endswith(b"\n"):
                return 0
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        f.truncate(keep)
        return size - keep


class JsonlAppender:
    """Append records to a JSONL file, one flushed (and fsynced) line each, safe to resume.

    Opening first removes a truncated tail left by a killed run, so appended lines never
    join a partial one.
    """

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_truncated_tail(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self._fsync = fsync

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records to a fresh JSONL file (atomically replaced)."""
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
