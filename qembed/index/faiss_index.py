"""Embedded vector index on FAISS: any `faiss.index_factory` description with inner product ("Flat": exact;
"HNSW32", "IVF4096,Flat", "IVF16384,PQ64", "HNSW32,SQ8", ...: approximate)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qembed.errors import QembedError
from qembed.index.base import (
    IdList,
    SearchParams,
    as_matrix,
    check_ids,
    chunk_ranges,
    progress,
    rows_to_ids,
)

DEFAULT_EF = 128  # HNSW candidate list while searching (faiss' own default, 16, loses recall)
MIN_TRAIN = 10_000  # vectors to train an index that needs training (PQ/SQ codebooks), at the least
TRAIN_PER_LIST = 40  # and per IVF list (faiss warns under 39)
MAX_TRAIN = 1_000_000


def new_faiss_index(dim: int, factory: str):
    """`faiss.index_factory(dim, factory)` with inner product; a bad description is a one-line `QembedError`."""
    import faiss

    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown"
        raise QembedError(
            f"FAISS cannot build {factory!r} for dim {dim}: {reason.split('failed: ')[-1]}"
        ) from None


def check_factory(factory: str) -> None:
    """Fail early on a factory string that no dimension can build (the real dim is checked when it is known)."""
    errors = []
    for dim in (768, 1024, 3840):
        try:
            new_faiss_index(dim, factory)
            return
        except QembedError as exc:
            errors.append(exc)
    raise errors[0]


def _default_nprobe(nlist: int) -> int:
    return max(1, round(nlist**0.5))


class FaissIndex:
    """Inner-product index held in memory (or memory-mapped: `load(path, mmap=True)`). Rows are numbered in
    insertion order; `ids` (optional: pass None to `add` when the caller maps rows itself) map rows to strings.

    `factory` is a `faiss.index_factory` description ("Flat" exact, "HNSW32", "IVF4096,Flat", "IVF16384,PQ64",
    "HNSW32,SQ8", ...). An index that needs training is trained on `train_size` vectors (default: 40 per IVF
    list, at least 10,000, at most 1M): the vectors added are held back until that many have come (or until
    the first search or save), then a seeded random sample of them trains it; call `train(sample)` first to
    train on a sample of your own. `nprobe`/`ef` are the default search parameters (see `SearchParams`);
    `ef_construction` sets HNSW's build-time candidate list. `capacity` (vectors expected) reserves a flat
    index's storage up front so that adding never copies it. `mmap=True`: `load` maps the saved index from
    disk by default (read-only; the page cache holds what searches touch).
    """

    def __init__(
        self,
        dim: int,
        *,
        factory: str = "Flat",
        capacity: int | None = None,
        nprobe: int | None = None,
        ef: int | None = None,
        ef_construction: int | None = None,
        train_size: int | None = None,
        seed: int = 0,
        mmap: bool = False,
    ) -> None:
        import faiss

        self.dim, self.factory, self.seed, self.mmap = int(dim), factory, int(seed), bool(mmap)
        self._index = new_faiss_index(self.dim, factory)
        self._ivf = faiss.try_extract_index_ivf(self._index)
        self._hnsw = self._find(faiss.IndexHNSW)
        if ef_construction is not None:
            if self._hnsw is None:
                raise QembedError(f"ef_construction applies to HNSW indexes, not {factory!r}")
            self._hnsw.hnsw.efConstruction = int(ef_construction)
        if self._ivf is not None:
            self._ivf.cp.seed = self.seed
        for pq in (self._find(faiss.IndexPQ), self._find(faiss.IndexIVFPQ)):
            if (
                pq is not None
            ):  # qembed never uses polysemous (Hamming) filtering; training it is most of PQ's cost
                pq.do_polysemous_training = False
        self.defaults = SearchParams(
            nprobe=nprobe if nprobe is not None or self._ivf is None else _default_nprobe(self._ivf.nlist),
            ef=ef if ef is not None or self._hnsw is None else DEFAULT_EF,
        )
        self.check_params(self.defaults)
        needed = max(MIN_TRAIN, TRAIN_PER_LIST * (self._ivf.nlist if self._ivf is not None else 0))
        self.train_size = int(train_size) if train_size else min(needed, MAX_TRAIN)
        self._pending: list[np.ndarray] = []  # vectors added before the index was trained
        self._pending_count = 0
        self._ids: IdList | None = None
        self._has_ids: bool | None = None  # decided by the first add
        self._read_only = False
        self._capacity = int(capacity or 1024)
        if capacity and isinstance(self._index, faiss.IndexFlatCodes):
            # The codes vector keeps its capacity when shrunk: later adds fill this space without regrowth.
            self._index.codes.resize(int(capacity) * self._index.code_size)
            self._index.codes.resize(0)

    def _find(self, kind):
        """The part of the index (itself, or the one inside a pre-transform/refine wrapper) of type `kind`."""
        import faiss

        index = self._index
        while not isinstance(index, kind):
            if isinstance(index, faiss.IndexPreTransform):
                index = faiss.downcast_index(index.index)
            elif isinstance(index, faiss.IndexRefine):
                index = faiss.downcast_index(index.base_index)
            else:
                return None
        return index

    @property
    def exact(self) -> bool:
        """True for an exhaustive flat index."""
        import faiss

        return type(self._index) in (faiss.IndexFlat, faiss.IndexFlatIP)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def __len__(self) -> int:
        return int(self._index.ntotal) + self._pending_count

    @property
    def ids(self) -> IdList:
        """Document id of each row, in insertion order (an `IdList`)."""
        if self._has_ids is False:
            raise QembedError("this index keeps no ids (they were not given to add): use search_rows")
        return self._ids if self._ids is not None else IdList()

    def __enter__(self) -> FaissIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release for an in-memory index (here for the common interface)."""

    def add(self, ids: Sequence[str] | None, vectors: np.ndarray) -> None:
        """Append a batch of vectors with their string ids (or with `ids=None`: rows only, for every batch)."""
        vectors = as_matrix(vectors, self.dim, "vectors")
        check_ids(ids, len(vectors))
        if self._read_only:
            raise QembedError("this index was opened memory-mapped (read-only): load it without mmap to add")
        if self._has_ids is None:
            self._has_ids = ids is not None
            self._ids = IdList(capacity=self._capacity) if self._has_ids else None
        elif self._has_ids != (ids is not None):
            raise QembedError("add: give ids with every batch or with none")
        if not len(vectors):
            return
        if self._ids is not None:
            self._ids.extend(ids)
        if self._index.is_trained:
            self._index.add(vectors)
            return
        self._pending.append(vectors.copy())
        self._pending_count += len(vectors)
        if self._pending_count >= self.train_size:
            self._train_pending()

    def train(self, sample: np.ndarray) -> None:
        """Train the index on `sample` (a few tens of vectors per IVF list; at least 256 for PQ/SQ codebooks)
        and add the vectors held back so far."""
        sample = as_matrix(sample, self.dim, "training vectors")
        if not self._index.is_trained:
            try:
                self._index.train(sample)
            except RuntimeError as exc:
                reason = str(exc).strip().splitlines()[-1].split("failed: ")[-1]
                raise QembedError(
                    f"cannot train FAISS {self.factory!r} on {len(sample)} vectors: {reason}"
                ) from None
        pending, self._pending, self._pending_count = self._pending, [], 0
        for block in pending:
            self._index.add(block)

    def _train_pending(self) -> None:
        if self._index.is_trained or not self._pending:
            return
        held = np.concatenate(self._pending)
        if len(held) > self.train_size:
            held = held[
                np.sort(np.random.default_rng(self.seed).choice(len(held), self.train_size, replace=False))
            ]
        minimum = self._ivf.nlist if self._ivf is not None else 1
        if len(held) < minimum:
            raise QembedError(
                f"FAISS {self.factory!r} needs at least {minimum} vectors to train, got {len(held)}: "
                "use fewer IVF lists for a corpus this small"
            )
        self.train(held)

    def check_params(self, params: SearchParams) -> None:
        """A `QembedError` when `params` sets a parameter this index has no use for (nprobe on HNSW, ...)."""
        if params.nprobe is not None and self._ivf is None:
            raise QembedError(f"nprobe applies to IVF indexes; {self.factory!r} has none (use ef for HNSW)")
        if params.ef is not None and self._hnsw is None and not self._ivf_over_hnsw():
            raise QembedError(f"ef applies to HNSW indexes; {self.factory!r} has none (use nprobe for IVF)")

    def _ivf_over_hnsw(self) -> bool:
        import faiss

        return self._ivf is not None and isinstance(
            faiss.downcast_index(self._ivf.quantizer), faiss.IndexHNSW
        )

    def _search_parameters(self, params: SearchParams, k: int, keep: list):
        """faiss SearchParameters for this index (None when nothing applies); `keep` holds the nested objects."""
        import faiss

        # wrapper index type -> (inner index field, its parameters class, field holding the inner parameters)
        wrappers = {
            faiss.IndexPreTransform: ("index", faiss.SearchParametersPreTransform, "index_params"),
            faiss.IndexRefine: ("base_index", faiss.IndexRefineSearchParameters, "base_index_params"),
        }

        def build(index):
            wrapped = next((w for kind, w in wrappers.items() if isinstance(index, kind)), None)
            if wrapped is not None:
                inner_field, kind, params_field = wrapped
                inner = build(faiss.downcast_index(getattr(index, inner_field)))
                if inner is None:
                    return None
                wrapper = kind()
                setattr(wrapper, params_field, inner)
            elif isinstance(index, faiss.IndexIVF):
                wrapper = faiss.SearchParametersIVF()
                wrapper.nprobe = int(params.nprobe or index.nprobe)
                if params.ef is not None and isinstance(
                    faiss.downcast_index(index.quantizer), faiss.IndexHNSW
                ):
                    quantizer = faiss.SearchParametersHNSW()
                    quantizer.efSearch = max(int(params.ef), int(wrapper.nprobe))
                    keep.append(quantizer)
                    wrapper.quantizer_params = quantizer
            elif isinstance(index, faiss.IndexHNSW):
                wrapper = faiss.SearchParametersHNSW()
                wrapper.efSearch = max(int(params.ef or DEFAULT_EF), k)
            else:
                return None
            keep.append(wrapper)
            return wrapper

        return build(self._index)

    def search_rows(
        self, queries: np.ndarray, k: int, *, batch_size: int = 4096, show_progress: bool = False,
        params: SearchParams | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Top-k rows (int64, -1 where none) and inner-product scores (float32, -inf where none), (nq, k').

        k' = min(k, len(self)). Queries are searched `batch_size` at a time, so memory stays bounded.
        `params` override the index's default search parameters for this call (thread-safe).
        """
        queries = as_matrix(queries, self.dim, "queries")
        if params is not None:
            self.check_params(params)
        self._train_pending()
        k = min(int(k), len(self))
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        if k <= 0:
            return rows, scores
        keep: list = []
        faiss_params = self._search_parameters((params or SearchParams()).over(self.defaults), k, keep)
        for start, stop in progress(chunk_ranges(len(queries), batch_size), show_progress, len(queries)):
            s, r = self._index.search(queries[start:stop], k, params=faiss_params)
            rows[start:stop] = r
            scores[start:stop] = np.where(r >= 0, s, -np.inf)
        return rows, scores

    def search(
        self, queries: np.ndarray, k: int, *, batch_size: int = 4096, show_progress: bool = False,
        params: SearchParams | None = None,
    ) -> tuple[list[list[str]], np.ndarray]:  # fmt: skip
        """Top-k document ids per query (best first) and their scores, float32 (nq, min(k, len))."""
        rows, scores = self.search_rows(
            queries, k, batch_size=batch_size, show_progress=show_progress, params=params
        )
        return rows_to_ids(rows, self.ids), scores

    def save(self, path: str | Path) -> None:
        """Write the index to the folder `path` (index.faiss, ids.bin + ids.ends.npy when it has ids, meta.json)."""
        import faiss

        self._train_pending()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(path / "index.faiss"))
        if self._has_ids:
            self._ids.save(path)
        meta = {"backend": "faiss", "factory": self.factory, "dim": self.dim, "count": len(self),
                "ids": bool(self._has_ids), "nprobe": self.defaults.nprobe, "ef": self.defaults.ef,
                "mmap": self.mmap}  # fmt: skip
        (path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool | None = None) -> FaissIndex:
        """Reopen a saved index; with `mmap=True` its vectors and ids stay on disk (read-only, paged in on use).
        `mmap=None`: as the index was made (its `mmap` option)."""
        import faiss

        path = Path(path)
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        factory = meta.get("factory") or ("HNSW32" if meta.get("kind") == "hnsw" else "Flat")  # older folders
        ef = meta.get("ef", meta.get("ef_search"))
        mmap = bool(meta.get("mmap")) if mmap is None else mmap
        index = cls(
            meta["dim"],
            factory=factory,
            nprobe=meta.get("nprobe"),
            ef=ef if "HNSW" in factory else None,
            mmap=bool(meta.get("mmap")),
        )
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index._index = faiss.read_index(str(path / "index.faiss"), flags)
        index._ivf = faiss.try_extract_index_ivf(index._index)
        index._hnsw = index._find(faiss.IndexHNSW)
        index._read_only = mmap
        if (path / "ids.ends.npy").is_file():
            index._ids, index._has_ids = IdList.load(path, mmap=mmap), True
        elif (path / "ids.json").is_file():  # folders written before ids.bin
            index._ids, index._has_ids = (
                IdList(json.loads((path / "ids.json").read_text(encoding="utf-8"))),
                True,
            )
        else:
            index._has_ids = False if meta.get("ids") is False else None
        if index._ids is not None and index._index.ntotal != len(index._ids):
            raise QembedError(f"{path}: index has {index._index.ntotal} vectors but {len(index._ids)} ids")
        return index
