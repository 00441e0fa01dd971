"""The vector-index interface and what the backends share: search parameters, the id store, recall probes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np

from qembed.arrays import GrowingArray
from qembed.errors import QembedError


@dataclass(frozen=True)
class SearchParams:
    """Search-time knobs of an approximate index; None keeps the index's own default.

    `nprobe`: inverted lists visited per query (FAISS IVF*, Milvus IVF_*/SCANN). `ef`: size of the
    candidate list (FAISS and Milvus HNSW, Milvus DISKANN's `search_list`); raised to k when smaller.
    """

    nprobe: int | None = None
    ef: int | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise QembedError(f"search parameter {item.name} must be a positive integer, got {value!r}")

    def over(self, defaults: SearchParams | None) -> SearchParams:
        """These parameters, with `defaults` filling the ones that are None."""
        if defaults is None:
            return self
        return SearchParams(
            **{f.name: _first(getattr(self, f.name), getattr(defaults, f.name)) for f in fields(self)}
        )

    def given(self) -> dict[str, int]:
        """The parameters that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _first(a, b):
    return a if a is not None else b


class VectorIndex(Protocol):
    """Inner-product vector index. Rows are numbered 0, 1, ... in insertion order; ids (optional) map rows to
    strings. `exact` says whether search is exhaustive; `close()` releases it (and drops what was temporary)."""

    dim: int
    exact: bool

    def add(self, ids: Sequence[str] | None, vectors: np.ndarray) -> None:
        """Append float32 `vectors` (n, dim) as the next rows; `ids` (n strings), or None for rows only."""

    def search(
        self, queries: np.ndarray, k: int, *, batch_size: int = ..., show_progress: bool = ...,
        params: SearchParams | None = ...,
    ) -> tuple[list[list[str]], np.ndarray]:  # fmt: skip
        """The top `k` ids per query row and their inner products (float32 (nq, k)), best first."""

    def search_rows(
        self, queries: np.ndarray, k: int, *, batch_size: int = ..., show_progress: bool = ...,
        params: SearchParams | None = ...,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """As `search`, with row numbers (int64 (nq, k), -1 and score -inf where fewer than `k` exist) instead of ids."""

    def check_params(self, params: SearchParams) -> None:
        """Raise `QembedError` (one line) when `params` sets a parameter this index has no use for."""

    def save(self, path: str | Path) -> None:
        """Write the index to the folder `path` (`load_index` reads it back)."""

    def close(self) -> None:
        """Release the index (a temporary Milvus collection is dropped)."""

    def __len__(self) -> int: ...


class IdList(Sequence[str]):
    """Document ids as one UTF-8 buffer plus an int64 end offset per id: 8 bytes + the id's bytes each,
    no Python object per id. Appends are amortised O(1); `save`/`load` write two flat files."""

    def __init__(self, ids: Iterable[str] = (), *, capacity: int = 1024) -> None:
        self._blob: bytearray | np.ndarray = bytearray()
        self._ends = GrowingArray(capacity=capacity)  # `capacity` ids fit without regrowth
        self.extend(ids)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = int(row)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(row)
        start = int(self._ends[row - 1]) if row else 0
        return bytes(self._blob[start : int(self._ends[row])]).decode("utf-8")

    def extend(self, ids: Iterable[str]) -> None:
        if not isinstance(self._blob, bytearray):
            raise QembedError("these ids were opened read-only (memory-mapped)")
        encoded = [str(i).encode("utf-8") for i in ids]
        if not encoded:
            return
        base = int(self._ends[-1]) if len(self) else 0
        self._ends.extend(base + np.cumsum([len(b) for b in encoded]))
        self._blob += b"".join(encoded)

    def save(self, path: str | Path) -> None:
        """Write `ids.bin` (the ids' UTF-8 bytes, back to back) and `ids.ends.npy` in the folder `path`."""
        path = Path(path)
        (path / "ids.bin").write_bytes(  # a view, not a copy
            memoryview(self._blob)[: int(self._ends[-1]) if len(self) else 0]
        )
        np.save(path / "ids.ends.npy", self._ends.array)

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = False) -> IdList:
        """Read ids written by `save` (memory-mapped and read-only with `mmap=True`)."""
        path = Path(path)
        ids = cls()
        ends = np.load(path / "ids.ends.npy", mmap_mode="r" if mmap else None)
        size = (path / "ids.bin").stat().st_size
        if mmap and size:
            ids._blob = np.memmap(path / "ids.bin", dtype=np.uint8, mode="r")
        else:
            ids._blob = bytearray((path / "ids.bin").read_bytes())
        ids._ends = GrowingArray.wrap(ends)
        if (int(ends[-1]) if len(ends) else 0) != size:
            raise QembedError(f"{path}: ids.bin holds {size} bytes, ids.ends.npy expects {int(ends[-1])}")
        return ids


def as_matrix(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    """`vectors` as a C-contiguous float32 (n, dim) array (a 1-d vector becomes one row)."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise QembedError(f"{what} must have shape (n, {dim}), got {tuple(np.shape(vectors))}")
    return np.ascontiguousarray(array)


def check_ids(ids: Sequence[str] | None, count: int) -> None:
    if ids is not None and len(ids) != count:
        raise QembedError(f"add: {len(ids)} ids for {count} vectors")


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


def measure_recall(
    index: VectorIndex,
    queries: np.ndarray,
    exact_rows: np.ndarray,
    *,
    k: int = 10,
    params: SearchParams | None = None,
    query_rows: np.ndarray | None = None,
) -> float:
    """Mean recall@k of `index` against the exact top-k rows `exact_rows` (nq, k; -1 padding) of `queries`.

    With `query_rows` (each query's own row in the index, as when documents serve as queries), that row is
    left out of the index's answer, as it is of the exact one.
    """
    if not len(queries):
        raise QembedError("recall needs at least one query")
    extra = 1 if query_rows is not None else 0
    rows, _ = index.search_rows(queries, k + extra, params=params)
    found = []
    for q, (got, truth) in enumerate(zip(rows.tolist(), np.asarray(exact_rows).tolist())):
        truth = {r for r in truth[:k] if r >= 0}
        if query_rows is not None:
            got = [r for r in got if r != int(query_rows[q])]
        if truth:
            found.append(len(truth & set(got[:k])) / len(truth))
    return float(np.mean(found)) if found else 1.0


class RecallProbe:
    """Exact top-k neighbours of a seeded sample of the indexed vectors, kept up to date as the vectors are
    added (`add` gets every batch the index gets, in the same order), so that `recall(index)` measures an
    approximate index's recall@k against exact search without a second pass or a second copy of the vectors.

    The sample (`queries` documents, each excluded from its own neighbours) is drawn from the first batch.
    Costs `queries` x dim multiply-adds per indexed vector.
    """

    def __init__(self, *, k: int = 10, queries: int = 100, seed: int = 0) -> None:
        self.k, self.wanted, self.seed = int(k), int(queries), int(seed)
        self.queries: np.ndarray | None = None
        self.query_rows = np.zeros(0, dtype=np.int64)
        self.top_rows = np.zeros((0, self.k), dtype=np.int64)
        self._top_scores = np.zeros((0, self.k), dtype=np.float32)
        self.count = 0

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if self.queries is None:
            picked = np.sort(np.random.default_rng(self.seed).permutation(len(vectors))[: self.wanted])
            self.queries = np.ascontiguousarray(vectors[picked])
            self.query_rows = picked.astype(np.int64)
            self.top_rows = np.full((len(picked), self.k), -1, dtype=np.int64)
            self._top_scores = np.full((len(picked), self.k), -np.inf, dtype=np.float32)
        if len(vectors) and len(self.queries):
            scores = self.queries @ vectors.T
            mine = (self.query_rows >= self.count) & (self.query_rows < self.count + len(vectors))
            scores[np.flatnonzero(mine), self.query_rows[mine] - self.count] = -np.inf
            rows = np.broadcast_to(np.arange(self.count, self.count + len(vectors)), scores.shape)
            all_scores = np.concatenate([self._top_scores, scores], axis=1)
            all_rows = np.concatenate([self.top_rows, rows], axis=1)
            best = np.argsort(-all_scores, axis=1, kind="stable")[:, : self.k]
            self._top_scores = np.take_along_axis(all_scores, best, axis=1)
            self.top_rows = np.where(
                np.isfinite(self._top_scores), np.take_along_axis(all_rows, best, axis=1), -1
            )
        self.count += len(vectors)

    def recall(self, index: VectorIndex, params: SearchParams | None = None) -> float:
        """Recall@k of `index` (holding exactly the vectors given to `add`) for the sampled queries."""
        if self.queries is None or not len(self.queries):
            raise QembedError("the recall probe saw no vectors")
        if len(index) != self.count:
            raise QembedError(f"the index holds {len(index)} vectors but the recall probe saw {self.count}")
        return measure_recall(
            index, self.queries, self.top_rows, k=self.k, params=params, query_rows=self.query_rows
        )
