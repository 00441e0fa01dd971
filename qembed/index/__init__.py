"""Vector indexes behind one interface: `add(ids, vectors)`, `search(queries, k) -> (ids, scores)`,
`search_rows`, `save(path)`, `close()`, `len()`, `exact`. Open one with `open_index(spec, dim)`, reopen a
saved one with `load_index(path)`. Search-time knobs travel as `SearchParams(nprobe=..., ef=...)`;
`RecallProbe`/`measure_recall` measure an approximate index's recall@k against exact search.

A persistent index folder (vectors + documents + manifest) for `qembed index build` / `qembed search` /
`qembed serve --index`: `build_index`, `open_search_index`, `search_index` (see `qembed.index.store`).

Specs (`SPEC[?OPTION=VALUE&...]`):
- `faiss`: exact inner product (FAISS flat), the default.
- `faiss:FACTORY`: any `faiss.index_factory` description, with inner product: `Flat` (exact), `HNSW32`,
  `HNSW32,SQ8`, `IVF4096,Flat`, `IVF16384,PQ64`, `OPQ64,IVF65536_HNSW32,PQ64`, ... Options: `nprobe`, `ef`
  (default search parameters; nprobe defaults to sqrt(lists), ef to 128), `efConstruction` (HNSW build),
  `train_size` (vectors that train an IVF/PQ/SQ index: default 40 per list, at least 10,000, at most 1M),
  `seed` (picks the training sample; default 0), `mmap=1` (`load_index` maps the saved index from disk
  instead of reading it into memory). Example: `faiss:IVF4096,Flat?nprobe=64`.
- `hnsw` or `hnsw:m=32,ef_search=128,ef_construction=200`: FAISS HNSW (the same as
  `faiss:HNSW32?ef=128&efConstruction=200`).
- `milvus:PATH.db` (Milvus Lite file) or `milvus:http://HOST:PORT` (server). Options: `index` (FLAT,
  the default and exact; HNSW, IVF_FLAT, IVF_SQ8, IVF_PQ, SCANN, DISKANN, AUTOINDEX), that type's build
  parameters under their Milvus names (HNSW: `M`, `efConstruction`; IVF_*/SCANN: `nlist`; IVF_PQ: also `m`,
  `nbits`), and the default search parameters `nprobe` (IVF_*, SCANN) and `ef` (HNSW; DISKANN's
  `search_list`). Example: `milvus:http://127.0.0.1:19530?index=HNSW&M=16&efConstruction=200&ef=64`.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qsl

from qembed.errors import QembedError
from qembed.index.base import IdList, RecallProbe, SearchParams, VectorIndex, measure_recall
from qembed.index.faiss_index import FaissIndex, check_factory

__all__ = [
    "FaissIndex", "Hit", "IdList", "Manifest", "RecallProbe", "SearchIndex", "SearchParams", "VectorIndex",
    "build_index", "load_index", "measure_recall", "open_index", "open_search_index", "parse_spec",
    "search_index",
]  # fmt: skip

_HNSW_OPTIONS = {"m": int, "ef_search": int, "ef_construction": int}
_FAISS_OPTIONS = {"nprobe": "nprobe", "ef": "ef", "efconstruction": "ef_construction", "ef_construction":
                  "ef_construction", "train_size": "train_size", "seed": "seed", "mmap": "mmap"}  # fmt: skip
_USAGE = ("use faiss, faiss:FACTORY[?nprobe=N], hnsw[:m=32,ef_search=128], milvus:PATH.db or "
          "milvus:http://HOST:PORT[?index=HNSW&M=16]")  # fmt: skip


def _int_option(spec: str, key: str, value: str, minimum: int = 1) -> int:
    if not value.strip().isdigit() or int(value) < minimum:
        raise QembedError(f"bad option {key}={value!r} in {spec!r}: expected an integer >= {minimum}")
    return int(value)


def _options(spec: str, query: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise QembedError(f"bad options {query!r} in {spec!r}: use KEY=VALUE&KEY=VALUE") from None


def _faiss_spec(spec: str, factory: str, query: str) -> dict:
    options: dict = {"factory": factory.strip()} if factory.strip() else {}
    if "factory" in options:
        check_factory(options["factory"])
    for key, value in _options(spec, query):
        name = _FAISS_OPTIONS.get(key.lower())
        if name is None:
            raise QembedError(
                f"unknown FAISS option {key!r} in {spec!r}: "
                f"use {', '.join(sorted(set(_FAISS_OPTIONS.values())))}"
            )
        if name == "mmap":
            if value.lower() not in ("0", "1", "true", "false"):
                raise QembedError(f"bad option mmap={value!r} in {spec!r}: use mmap=1 or mmap=0")
            options[name] = value.lower() in ("1", "true")
        else:
            options[name] = _int_option(spec, key, value, minimum=0 if name == "seed" else 1)
    return options


def _milvus_spec(spec: str, uri: str, query: str) -> dict:
    from qembed.index.milvus_index import INDEX_TYPES, SEARCH_KEYS

    options: dict = {"uri": uri.strip()}
    pairs = _options(spec, query)
    index_type = next((v.upper() for k, v in pairs if k.lower() in ("index", "index_type")), "FLAT")
    if index_type not in INDEX_TYPES:
        raise QembedError(
            f"unknown Milvus index type {index_type!r} in {spec!r}: use one of {', '.join(INDEX_TYPES)}"
        )
    if index_type != "FLAT":
        options["index_type"] = index_type
    build = {name.lower(): name for name in INDEX_TYPES[index_type]}
    for key, value in pairs:
        if key.lower() in ("index", "index_type"):
            continue
        if key.lower() in ("nprobe", "ef"):
            if key.lower() not in SEARCH_KEYS.get(index_type, {}):
                raise QembedError(f"{key} does not apply to a Milvus {index_type} index ({spec!r})")
            options[key.lower()] = _int_option(spec, key, value)
        elif key.lower() in build:
            options.setdefault("index_params", {})[build[key.lower()]] = _int_option(spec, key, value)
        else:
            known = ", ".join([*INDEX_TYPES[index_type], *SEARCH_KEYS.get(index_type, {})]) or "none"
            raise QembedError(
                f"unknown option {key!r} for a Milvus {index_type} index in {spec!r} (known: {known})"
            )
    return options


def parse_spec(spec: str) -> tuple[str, dict]:
    """Split an index spec (see the module docstring) into (backend, options): ("faiss", {factory, nprobe,
    ...}), ("hnsw", {m, ef_search, ef_construction}) or ("milvus", {uri, index_type, index_params, ...})."""
    head, _, query = spec.partition("?")
    name, _, rest = head.partition(":")
    name = name.strip().lower()
    if name in ("faiss", "flat"):
        return "faiss", _faiss_spec(spec, rest, query)
    if name == "hnsw" and not query:
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
        return "milvus", _milvus_spec(spec, rest, query)
    raise QembedError(f"unknown index {spec!r}: {_USAGE}")


def open_index(
    spec: str = "faiss",
    dim: int = 0,
    *,
    collection: str | None = None,
    overwrite: bool = False,
    temporary: bool | None = None,
    capacity: int | None = None,
    **options,
) -> VectorIndex:
    """A new, empty index for `dim`-dimensional vectors as described by `spec` (see the module docstring).

    `options` go to the backend and override the spec's (FAISS: nprobe, ef, ef_construction, train_size,
    seed; Milvus: token, index_type, index_params, nprobe, ef). `capacity` (expected number of vectors) lets
    a flat FAISS index reserve its memory up front. Milvus: `collection=None` is a new collection with a
    unique name, dropped by the index's `close()` (use `with open_index(...) as index:`), when it is
    collected, or at exit, unless `save()` keeps it; a named one is kept (`temporary` overrides both). An
    existing collection of that name is an error unless `overwrite=True`, which drops it.
    """
    if dim <= 0:
        raise QembedError(f"index dimension must be positive, got {dim}")
    backend, arg = parse_spec(spec)
    if backend == "faiss":
        return FaissIndex(dim, capacity=capacity, **{**arg, **options})
    if backend == "hnsw":
        hnsw = {**arg, **options}
        return FaissIndex(dim, factory=f"HNSW{hnsw.pop('m', 32)}", ef=hnsw.pop("ef_search", 128),
                          ef_construction=hnsw.pop("ef_construction", 200), **hnsw)  # fmt: skip
    from qembed.index.milvus_index import MilvusIndex

    arg = {**arg, **options}
    return MilvusIndex(
        arg.pop("uri"), dim, collection=collection, overwrite=overwrite, temporary=temporary, **arg
    )


def load_index(path: str | Path, **options) -> VectorIndex:
    """Reopen an index written by `save(path)`. Options: `mmap` (FAISS: True maps it from disk, read-only;
    default: as its spec said), `token` (Milvus)."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise QembedError(f"no saved index at {path} (missing meta.json)")
    backend = json.loads(meta_path.read_text(encoding="utf-8")).get("backend")
    if backend == "faiss":
        return FaissIndex.load(path, mmap=options.get("mmap"))
    if backend == "milvus":
        from qembed.index.milvus_index import MilvusIndex

        return MilvusIndex.load(path, **({"token": options["token"]} if options.get("token") else {}))
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
