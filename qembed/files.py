"""Files and folders qembed writes: atomic replacement, and output folders a verb has marked as its own.

Atomic writes: the data goes to a temporary file beside the target, is flushed to disk, then renamed over
the target, so a reader (or a run killed mid-write) sees the old file or the new one, never a mixture.

Owned folders: a verb that writes a folder of results (`adapt --output`, `eval --output`, `index build`)
first claims it with `claim_output_dir`: a new or empty folder gets a marker file naming the verb; a folder
that holds the same verb's marker is accepted; anything else is refused with a one-line error. Only a
folder that carries a marker is ever removed (`remove_owned_dir`), so qembed never deletes what it did not
create.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from qembed.errors import QembedError

MARKER = ".qembed-output.json"


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing (`mode` "w" text UTF-8, or "wb"); when the block ends
    without an exception it is flushed to disk and renamed over `path`, otherwise it is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open(mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with UTF-8 `text` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, **dumps_options: Any) -> None:
    """Replace `path` with `obj` as JSON (UTF-8, non-ASCII kept, trailing newline) atomically."""
    dumps_options.setdefault("ensure_ascii", False)
    atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_options) + "\n")


def read_marker(folder: str | Path) -> dict | None:
    """The owner marker of `folder` (`{"verb": ..., "created": ...}`), or None if it has none."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def mark_owned(folder: str | Path, verb: str) -> Path:
    """Create `folder` if needed and write its owner marker (kept if it already names `verb`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = read_marker(folder)
    if marker is None or marker.get("verb") != verb:
        atomic_write_json(folder / MARKER, {"verb": verb, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return folder


def is_owned(folder: str | Path, verb: str | None = None) -> bool:
    """Whether `folder` carries a qembed owner marker (of `verb`, when given)."""
    marker = read_marker(folder)
    return marker is not None and (verb is None or marker.get("verb") == verb)


def claim_output_dir(folder: str | Path, verb: str, *, flag: str = "--output",
                     also_ours: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """Make `folder` the output folder of `verb`, or refuse it in one line.

    Accepted: a folder that does not exist or is empty, one already marked by `verb`, or one holding any of
    `also_ours` (files by which earlier qembed versions recognised their own output, e.g. `state.json`).
    A folder that holds anything else is the user's: `QembedError` naming `flag`. The marker is written.
    """
    check_output_dir(folder, verb, flag=flag, also_ours=also_ours)
    return mark_owned(folder, verb)


def check_output_dir(folder: str | Path, verb: str, *, flag: str = "--output",
                     also_ours: tuple[str, ...] = ()) -> None:  # fmt: skip
    """The refusals of `claim_output_dir`, writing nothing (for a dry run)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise QembedError(f"{flag} {folder} is a file, not a folder")
    if folder.is_dir() and not is_owned(folder, verb) and not any((folder / name).exists() for name in also_ours):
        if any(folder.iterdir()):
            raise QembedError(f"{flag} {folder} is not empty and is not the output of an earlier `qembed {verb}`: "
                              "choose a new or empty folder (qembed never overwrites files it did not write)")


def remove_owned_dir(folder: str | Path, verb: str | None = None) -> bool:
    """Remove `folder` only if its marker proves qembed (`verb`, when given) created it; returns whether it did.
    A folder without the marker is left alone."""
    folder = Path(folder)
    if not folder.is_dir() or not is_owned(folder, verb):
        return False
    shutil.rmtree(folder)
    return True
