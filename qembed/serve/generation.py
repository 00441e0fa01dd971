"""The index generation a server searches, opened so that rebuilding its folder does not change it.

`qembed index build` swaps new files into the folder by renaming them (`vectors/`, `docs.jsonl`,
`docs.offsets.npy`, then `manifest.json`). The server keeps what it opened: the vectors and offsets are in
memory and `docs.jsonl` is read through the handle opened with them, so the replaced file's old contents
stay readable (POSIX keeps a renamed-over file alive while it is open). `open_generation` retries while the
folder changes under it, so what it returns is one build's files, never a mix of two; the server switches
to a new generation only when told to reload (`POST /admin/reload` or SIGHUP).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from qembed.errors import QembedError
from qembed.index import SearchParams
from qembed.index.store import MANIFEST, Manifest, SearchIndex

_WATCHED = (MANIFEST, "docs.jsonl", "docs.offsets.npy", "vectors", "vectors/meta.json")


class PinnedSearchIndex(SearchIndex):
    """A `SearchIndex` whose document texts come from the `docs.jsonl` handle it was opened with."""

    def __init__(self, directory: str | Path, embedder, *, docs_file, token: str = "",
                 params: SearchParams | None = None) -> None:  # fmt: skip
        super().__init__(directory, embedder, token=token, params=params)
        self._docs = docs_file
        size = os.fstat(docs_file.fileno()).st_size
        self._ends = np.append(np.asarray(self._offsets[1:], dtype=np.int64), size)
        if self.manifest.count != len(self) or (len(self) and size and self._read(len(self) - 1)[-1:] != b"\n"):
            raise QembedError(f"{self.directory}: its files are not from one build")

    def _read(self, row: int) -> bytes:
        start = int(self._offsets[row])
        return os.pread(self._docs.fileno(), int(self._ends[row]) - start, start)

    def document(self, row: int) -> tuple[str, str]:
        """(id, text) of a row of this generation (`os.pread`: safe from several threads at once)."""
        record = json.loads(self._read(row))
        return record["id"], record["text"]

    def close(self) -> None:
        self._docs.close()


def _snapshot(directory: Path) -> tuple:
    """Identity (inode, size, mtime) of each file a build replaces; None for a missing one."""
    result = []
    for name in _WATCHED:
        try:
            st = os.stat(directory / name)
            result.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            result.append(None)
    return tuple(result)


def open_generation(directory: str | Path, embedder, *, token: str = "", params: SearchParams | None = None,
                    timeout: float = 30.0) -> PinnedSearchIndex:  # fmt: skip
    """Open the index folder's current build consistently.

    While a rebuild is swapping files in (the folder changes during the open, or its files disagree), the
    open is retried for up to `timeout` seconds. An error from a folder that did not change while it was
    being opened (not an index, built by another model) is raised at once.
    """
    directory = Path(directory)
    deadline = time.monotonic() + timeout
    while True:
        before = _snapshot(directory)
        docs_file = index = error = None
        try:
            docs_file = (directory / "docs.jsonl").open("rb")
            index = PinnedSearchIndex(directory, embedder, docs_file=docs_file, token=token, params=params)
        except Exception as exc:  # noqa: BLE001 - a file replaced mid-open fails in many ways; judged below
            error = exc
        after = _snapshot(directory)
        if index is not None and before == after and os.fstat(docs_file.fileno()).st_ino == after[1][0]:
            return index
        if docs_file is not None:
            docs_file.close()
        if before == after and error is not None:  # nothing moved: the error is the folder's own
            if isinstance(error, QembedError):
                raise error
            Manifest.read(directory)  # "not a qembed index" when that is the reason
            raise QembedError(f"{directory}: cannot open the index ({type(error).__name__}: {error})") from None
        if time.monotonic() > deadline:
            raise QembedError(f"{directory}: the index kept changing while it was opened (a rebuild in progress?): "
                              "retry when the build is done")  # fmt: skip
        time.sleep(0.2)
