"""Vector indexes behind one interface: `add(ids, vectors)`, `search(queries, k) -> (ids, scores)`,
`search_rows`, `save(path)`, `len()`. Open one with `open_index(spec, dim)`, reopen a saved one with
`load_index(path)`.

A persistent index folder (vectors + documents + manifest) for `qembed index build` / `qembed search` /
`qembed serve --index`: `build_index`, `open_search_index`, `search_index` (see `qembed.index.store`).

Specs: `faiss` (exact inner product, the default), `hnsw` or `hnsw:m=32,ef_search=128,ef_construction=200`
(approximate, FAISS HNSW), `milvus:PATH.db` (Milvus Lite file) or `milvus:http://host:19530` (server).
"""

from __future__ import annotations

import json
from pathlib import Path

from qembed.errors import QembedError
from qembed.index.base import VectorIndex
from qembed.index.faiss_index import FaissIndex

__all__ = [
    "FaissIndex", "Hit", "Manifest", "SearchIndex", "VectorIndex", "build_index", "load_index", "open_index",
    "open_search_index", "parse_spec", "search_index",
]  # fmt: skip

_HNSW_OPTIONS = {"m": int, "ef_search": int, "ef_construction": int}


def parse_spec(spec: str) -> tuple[str, str | dict]:
    """Split an index spec into (backend, argument): ("faiss", {}), ("hnsw", {options}) or ("milvus", uri)."""
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name in ("faiss", "flat") and not rest:
        return "faiss", {}
    if name == "hnsw":
        options: dict = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, _, value = item.partition("=")
            key = (
                key.strip()
                .lower()
                .replace("efsearch", "ef_search")
                .replace("efconstruction", "ef_construction")
            )
            if key not in _HNSW_OPTIONS or not value.strip().isdigit():
                raise QembedError(
                    f"bad HNSW option {item!r} in {spec!r}: use m=INT, ef_search=INT, ef_construction=INT"
                )
            options[key] = int(value)
        return "hnsw", options
    if name == "milvus" and rest.strip():
        return "milvus", rest.strip()
    raise QembedError(
        f"unknown index {spec!r}: use faiss, hnsw[:m=32,ef_search=128], milvus:PATH.db or milvus:http://HOST:PORT"
    )


def open_index(
    spec: str = "faiss",
    dim: int = 0,
    *,
    collection: str = "qembed",
    overwrite: bool = True,
    capacity: int | None = None,
    **options,
) -> VectorIndex:
    """A new, empty index for `dim`-dimensional vectors as described by `spec` (see the module docstring).

    `options` go to the backend (HNSW: m, ef_search, ef_construction; Milvus: token, index_type, index_params).
    `capacity` (expected number of vectors) lets the exact FAISS index reserve its memory up front.
    For Milvus, `collection` names the collection; `overwrite=True` replaces an existing one.
    """
    if dim <= 0:
        raise QembedError(f"index dimension must be positive, got {dim}")
    backend, arg = parse_spec(spec)
    if backend == "faiss":
        return FaissIndex(dim, kind="flat", capacity=capacity)
    if backend == "hnsw":
        return FaissIndex(dim, kind="hnsw", **{**arg, **options})
    from qembed.index.milvus_index import MilvusIndex

    return MilvusIndex(arg, dim, collection=collection, overwrite=overwrite, **options)


def load_index(path: str | Path, **options) -> VectorIndex:
    """Reopen an index written by `save(path)`."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise QembedError(f"no saved index at {path} (missing meta.json)")
    backend = json.loads(meta_path.read_text(encoding="utf-8")).get("backend")
    if backend == "faiss":
        return FaissIndex.load(path)
    if backend == "milvus":
        from qembed.index.milvus_index import MilvusIndex

        return MilvusIndex.load(path, **options)
    raise QembedError(f"{meta_path}: unknown index backend {backend!r}")


# The persistent index folder (`qembed index build` / `qembed search`) builds on the functions above.
from qembed.index.store import (  # noqa: E402
    Hit,
    Manifest,
    SearchIndex,
    build_index,
    open_search_index,
    search_index,
)
