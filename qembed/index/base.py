"""The vector-index interface and helpers shared by the backends."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from qembed.errors import QembedError


class VectorIndex(Protocol):
    """Inner-product vector index with string ids. Rows are numbered 0, 1, ... in insertion order."""

    dim: int

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None: ...

    def search(
        self, queries: np.ndarray, k: int, *, batch_size: int = ..., show_progress: bool = ...
    ) -> tuple[list[list[str]], np.ndarray]: ...

    def search_rows(
        self, queries: np.ndarray, k: int, *, batch_size: int = ..., show_progress: bool = ...
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, path: str | Path) -> None: ...

    def __len__(self) -> int: ...


def as_matrix(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    """`vectors` as a C-contiguous float32 (n, dim) array (a 1-d vector becomes one row)."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise QembedError(f"{what} must have shape (n, {dim}), got {tuple(np.shape(vectors))}")
    return np.ascontiguousarray(array)


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    size = max(1, int(size))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def progress(ranges: list[tuple[int, int]], enabled: bool | None, total: int) -> Iterator[tuple[int, int]]:
    """Iterate over (start, stop) ranges, counting queries with `qembed.progress` unless `enabled` is False."""
    if enabled is False:
        yield from ranges
        return
    from qembed.progress import progress_bar

    with progress_bar(total=total, desc="search", unit="query", enabled=enabled) as bar:
        for start, stop in ranges:
            yield start, stop
            bar.update(stop - start)


def rows_to_ids(rows: np.ndarray, ids: Sequence[str]) -> list[list[str]]:
    """Map a (nq, k) array of rows to id lists, dropping the -1 padding."""
    return [[ids[r] for r in row if r >= 0] for row in rows.tolist()]

