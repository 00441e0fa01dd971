"""JSONL reading and crash-safe appending, shared by every long-running command."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
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
    return record


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
