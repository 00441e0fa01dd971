"""Embedded vector index on FAISS: exact inner product (`IndexFlatIP`) or approximate HNSW."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qembed.errors import QembedError
from qembed.index.base import as_matrix, chunk_ranges, progress, rows_to_ids


class FaissIndex:
    """Inner-product index held in memory. Rows are numbered in insertion order; ids map rows to strings.

    `kind="flat"` is exact search; `kind="hnsw"` builds an HNSW graph (`m` links per node,
    `ef_construction` while building, `ef_search` while searching; raised to k when smaller).
    `capacity` (number of vectors expected) reserves the storage of a flat index up front so streaming
    adds never hold two copies of it while it grows.
    """

    def __init__(
        self,
        dim: int,
        *,
        kind: str = "flat",
        m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        capacity: int | None = None,
    ) -> None:
        import faiss

        if kind not in ("flat", "hnsw"):
            raise QembedError(f"unknown FAISS index kind {kind!r}: use 'flat' or 'hnsw'")
        self.dim = int(dim)
        self.kind = kind
        self.ef_search = int(ef_search)
        if kind == "flat":
            self._index = faiss.IndexFlatIP(self.dim)
            if capacity:
                # std::vector keeps its capacity when shrunk: later adds fill this space without regrowth.
                self._index.codes.resize(int(capacity) * self.dim * 4)
                self._index.codes.resize(0)
        else:
            self._index = faiss.IndexHNSWFlat(self.dim, int(m), faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = int(ef_construction)
        self._ids: list[str] = []

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        """Document id of each row, in insertion order."""
        return self._ids

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Append a batch of vectors with their string ids."""
        vectors = as_matrix(vectors, self.dim, "vectors")
        if len(ids) != len(vectors):
            raise QembedError(f"add: {len(ids)} ids for {len(vectors)} vectors")
        if len(vectors):
            self._index.add(vectors)
            self._ids.extend(str(i) for i in ids)

    def search_rows(
        self, queries: np.ndarray, k: int, *, batch_size: int = 4096, show_progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (int64, -1 where none) and inner-product scores (float32, -inf where none), (nq, k').

        k' = min(k, len(self)). Queries are searched `batch_size` at a time, so memory stays bounded.
        """
        queries = as_matrix(queries, self.dim, "queries")
        k = min(int(k), len(self))
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        if k <= 0:
            return rows, scores
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = max(self.ef_search, k)
        for start, stop in progress(chunk_ranges(len(queries), batch_size), show_progress, len(queries)):
            s, r = self._index.search(queries[start:stop], k)
            rows[start:stop] = r
            scores[start:stop] = np.where(r >= 0, s, -np.inf)
        return rows, scores

    def search(
        self, queries: np.ndarray, k: int, *, batch_size: int = 4096, show_progress: bool = False
    ) -> tuple[list[list[str]], np.ndarray]:
        """Top-k document ids per query (best first) and their scores, float32 (nq, min(k, len))."""
        rows, scores = self.search_rows(queries, k, batch_size=batch_size, show_progress=show_progress)
        return rows_to_ids(rows, self._ids), scores

    def save(self, path: str | Path) -> None:
        """Write the index to the folder `path` (index.faiss, ids.json, meta.json)."""
        import faiss

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(path / "index.faiss"))
        (path / "ids.json").write_text(json.dumps(self._ids, ensure_ascii=False), encoding="utf-8")
        meta = {"backend": "faiss", "kind": self.kind, "dim": self.dim, "ef_search": self.ef_search}
        (path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> FaissIndex:
        import faiss

        path = Path(path)
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        index = cls(meta["dim"], kind=meta["kind"], ef_search=meta.get("ef_search", 128))
        index._index = faiss.read_index(str(path / "index.faiss"))
        index._ids = json.loads((path / "ids.json").read_text(encoding="utf-8"))
        if index._index.ntotal != len(index._ids):
            raise QembedError(f"{path}: index has {index._index.ntotal} vectors but {len(index._ids)} ids")
        return index
