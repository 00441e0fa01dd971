"""Vector index on Milvus through `pymilvus`: a Milvus Lite file (`./name.db`) or a server (`http://host:19530`).

The collection holds `row` (INT64 primary key = insertion order), `doc_id` (VARCHAR) and `vector`
(FLOAT_VECTOR) with an inner-product index: FLAT (exact, so rankings match the FAISS flat index) unless
another `index_type` is given (see `INDEX_TYPES`; Milvus Lite accepts them all but always searches exactly).

Collections qembed makes for one run (`collection=None`) get a unique name and are dropped by `close()`,
on leaving a `with` block, or at the latest when the object is collected or the process exits; `save()` keeps
one. A named collection that exists is never dropped unless `overwrite=True`.
"""

from __future__ import annotations

import json
import logging
import secrets
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qembed.errors import QembedError
from qembed.index.base import SearchParams, as_matrix, check_ids, chunk_ranges, progress

log = logging.getLogger(__name__)

MAX_TOP_K = 16384  # Milvus limit on `limit` (top-k) and on queries per search request
MAX_ID_LENGTH = 65535  # Milvus VARCHAR max_length
INSERT_BYTES = 32 * 2**20  # rows are sent in inserts of about this size (the gRPC message limit is 64 MB)
CONNECT_TIMEOUT = 60  # seconds (pymilvus' default of 10 is short for a loaded server)

# Milvus index types qembed knows: their build parameters, and which `SearchParams` field sets which
# search parameter. https://milvus.io/docs/index.md
INDEX_TYPES: dict[str, tuple[str, ...]] = {
    "FLAT": (),
    "HNSW": ("M", "efConstruction"),
    "IVF_FLAT": ("nlist",),
    "IVF_SQ8": ("nlist",),
    "IVF_PQ": ("nlist", "m", "nbits"),
    "SCANN": ("nlist",),
    "DISKANN": (),
    "AUTOINDEX": (),
}
SEARCH_KEYS: dict[str, dict[str, str]] = {
    "HNSW": {"ef": "ef"},
    "DISKANN": {"ef": "search_list"},
    **{name: {"nprobe": "nprobe"} for name in ("IVF_FLAT", "IVF_SQ8", "IVF_PQ", "SCANN")},
}


def is_lite_uri(uri: str) -> bool:
    return "://" not in uri


GRPC_OPTIONS = {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False}


def _resolve(uri: str) -> str:
    return str(Path(uri).expanduser().resolve()) if is_lite_uri(uri) else uri


def connect(uri: str, token: str = ""):
    """A `MilvusClient` for a Lite file or a server (a busy server gets `CONNECT_TIMEOUT` seconds to answer)."""
    from pymilvus import MilvusClient

    options = {"token": token} if token else {}
    if not is_lite_uri(uri):
        # Our own channel (pymilvus shares one per address by default, so another client's broken channel
        # would be ours too), pinging at most every 5 minutes: gRPC servers answer pymilvus' 10 s keepalive
        # on a quiet connection with GOAWAY "too_many_pings", after which every call fails.
        options.update(timeout=CONNECT_TIMEOUT, dedicated=True, grpc_options=GRPC_OPTIONS)
    try:
        return MilvusClient(uri=uri, **options)
    except Exception as exc:  # connection errors come in several pymilvus/grpc types
        raise QembedError(f"cannot open Milvus at {uri}: {exc}") from None


def collection_exists(uri: str, collection: str, *, token: str = "") -> bool:
    """Whether `collection` exists at `uri` (a Milvus Lite file that does not exist yet holds none)."""
    uri = _resolve(uri)
    if is_lite_uri(uri) and not Path(uri).exists():
        return False
    client = connect(uri, token)
    try:
        return bool(client.has_collection(collection))
    finally:
        client.close()


def unique_collection_name(prefix: str = "qembed") -> str:
    """`prefix_` + 16 random hex digits: a name no other run picks."""
    return f"{prefix}_{secrets.token_hex(8)}"


def build_collection(uri: str, requested: str | None, live: str | None, *, overwrite: bool = False,
                     token: str = "", owner: str = "this index folder") -> str:  # fmt: skip
    """The collection a (re)build writes into: never `live` (the one its readers use now, replaced only when
    the build is complete: see `drop_collection`), never an existing one that is not ours unless `overwrite`.

    `requested=None`: a new unique `qembed_<hex>`; `requested == live`: `<live>_<hex>`; otherwise `requested`.
    """
    if requested is None:
        return unique_collection_name()
    if requested == live:
        return unique_collection_name(requested)
    if not overwrite and collection_exists(uri, requested, token=token):
        raise QembedError(
            f"Milvus collection {requested!r} already exists and was not created by {owner}: "
            "pick another --collection or pass --overwrite to replace it"
        )
    return requested


def saved_collection(path: str | Path) -> tuple[str, str] | None:
    """(uri, collection) of the Milvus index saved in folder `path`, or None (no folder, or not Milvus)."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return (meta["uri"], meta["collection"]) if meta.get("backend") == "milvus" else None


def drop_collection(uri: str, collection: str, *, token: str = "") -> bool:
    """Drop `collection` at `uri` if it exists (the one a rebuild switched away from). A failure is logged,
    not raised: the build it follows has succeeded. Returns whether it was dropped."""
    try:
        if not collection_exists(uri, collection, token=token):
            return False
        client = connect(_resolve(uri), token)
        try:
            client.drop_collection(collection)
        finally:
            client.close()
        return True
    except Exception as exc:  # the server may be gone: the new index is in place all the same
        log.warning("could not drop the replaced Milvus collection %r at %s: %s", collection, uri, exc)
        return False


def _release(client, drop: list[str]) -> None:
    """Drop the collections in `drop` (a temporary one) and close the client; errors are logged."""
    try:
        for name in drop:
            client.drop_collection(name)
    except Exception as exc:
        log.warning("could not drop temporary Milvus collection(s) %s: %s", drop, exc)
    finally:
        drop.clear()
        try:
            client.close()
        except Exception:
            pass


def search_params_for(index_type: str, params: SearchParams) -> dict[str, int]:
    """Milvus search `params` for `index_type`; a parameter that does not apply is a `QembedError`."""
    keys = SEARCH_KEYS.get(index_type, {})
    out = {}
    for name, value in params.given().items():
        if name not in keys:
            raise QembedError(f"{name} does not apply to a Milvus {index_type} index")
        out[keys[name]] = value
    return out


class MilvusIndex:
    """Inner-product index in a Milvus collection.

    `uri` is a Milvus Lite database file (any path without a scheme, e.g. `./index.db`) or a server URI.
    `collection=None` makes a collection with a unique name that is temporary (dropped by `close()`, see the
    module docstring) unless `temporary=False`; a named one is kept unless `temporary=True`. `save()` keeps
    it. An existing collection of that name is an error unless `overwrite=True` (then it is dropped and made
    afresh) or `reopen=True` (then it is reopened and new vectors go after its rows).
    `index_type`/`index_params` choose the Milvus index (default FLAT: exact search); `nprobe`/`ef` are the
    default search parameters (`SearchParams`).
    """

    def __init__(
        self,
        uri: str,
        dim: int,
        *,
        collection: str | None = None,
        overwrite: bool = False,
        reopen: bool = False,
        temporary: bool | None = None,
        token: str = "",
        index_type: str = "FLAT",
        index_params: dict | None = None,
        nprobe: int | None = None,
        ef: int | None = None,
    ) -> None:
        from pymilvus import DataType, MilvusClient

        lite = is_lite_uri(uri)
        if lite and Path(uri).suffix != ".db":
            raise QembedError(f"a Milvus Lite path must end with .db, got {uri!r}")
        if lite and not reopen:
            Path(uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        uri = _resolve(uri)
        index_type = index_type.upper()
        if index_type not in INDEX_TYPES:
            raise QembedError(
                f"unknown Milvus index type {index_type!r}: use one of {', '.join(INDEX_TYPES)}"
            )
        self.defaults = SearchParams(nprobe=nprobe, ef=ef)
        search_params_for(index_type, self.defaults)
        if temporary is None:
            temporary = collection is None and not reopen
        collection = collection or unique_collection_name("qembed_tmp")
        self.uri, self.collection, self.dim, self.index_type = uri, collection, int(dim), index_type
        self._pending_ids: list[str] = []
        self._pending_vectors: list[np.ndarray] = []
        self._pending_bytes = 0
        if reopen and lite and not Path(uri).exists():
            raise QembedError(f"Milvus Lite file {uri} does not exist")
        self._client = connect(uri, token)
        self._drop: list[str] = []
        self._closer = weakref.finalize(self, _release, self._client, self._drop)
        exists = self._client.has_collection(collection)
        if reopen:
            if not exists:
                self.close()
                raise QembedError(
                    f"Milvus collection {collection!r} does not exist at {uri} (was it dropped?)"
                )
            self._reopen()
            return
        if exists and not overwrite:
            self.close()
            raise QembedError(
                f"Milvus collection {collection!r} already exists at {uri}: pass overwrite=True "
                "(--overwrite) to replace it"
            )
        if exists:
            self._client.drop_collection(collection)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_ID_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        params = self._client.prepare_index_params()
        params.add_index(
            field_name="vector", index_type=index_type, metric_type="IP", params=index_params or {}
        )
        if temporary:
            self._drop.append(collection)  # from here on, a failure drops what this run made
        if not lite:
            self._client.create_collection(
                collection, schema=schema, index_params=params, consistency_level="Strong"
            )
        else:  # waiting for the index calls AllocTimestamp, which Milvus Lite lacks (a logged traceback)
            self._client.create_collection(collection, schema=schema, consistency_level="Strong")
            self._client.create_index(collection, params, sync=False)
            self._client.load_collection(collection)
        self._count = 0

    def _reopen(self) -> None:
        fields = self._client.describe_collection(self.collection)["fields"]
        field = next((f for f in fields if f["name"] == "vector"), None)
        if field is None or {f["name"] for f in fields} < {"row", "doc_id"}:
            self.close()
            raise QembedError(
                f"Milvus collection {self.collection!r} was not made by qembed (no row/doc_id/vector)"
            )
        found = int(field["params"]["dim"])
        if found != self.dim:
            self.close()
            raise QembedError(f"Milvus collection {self.collection!r} has dim {found}, expected {self.dim}")
        described = self._client.describe_index(self.collection, "vector") or {}
        self.index_type = str(described.get("index_type", self.index_type)).upper()
        self._client.load_collection(self.collection)
        result = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        self._count = int(result[0]["count(*)"])

    def check_params(self, params: SearchParams) -> None:
        """A `QembedError` when `params` sets a parameter this index type has no use for."""
        search_params_for(self.index_type, params)

    @property
    def exact(self) -> bool:
        """True for a FLAT index (and on Milvus Lite, which searches every index type exactly)."""
        return self.index_type == "FLAT"

    @property
    def temporary(self) -> bool:
        """Whether `close()` drops the collection."""
        return bool(self._drop)

    def __len__(self) -> int:
        return self._count

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; a temporary collection is dropped."""
        self._closer()

    def add(self, ids: Sequence[str] | None, vectors: np.ndarray) -> None:
        """Append vectors with their ids (None: empty ids, for callers that map rows themselves). Rows are sent
        in inserts of about `INSERT_BYTES` (buffered across calls; searching or saving sends the rest)."""
        vectors = as_matrix(vectors, self.dim, "vectors")
        check_ids(ids, len(vectors))
        ids = [""] * len(vectors) if ids is None else [str(i) for i in ids]
        too_long = next((i for i in ids if len(i.encode("utf-8")) > MAX_ID_LENGTH), None)
        if too_long is not None:
            raise QembedError(f"document id longer than Milvus' {MAX_ID_LENGTH} bytes: {too_long[:40]!r}...")
        if not len(vectors):
            return
        self._pending_ids.extend(ids)
        self._pending_vectors.append(vectors)
        self._pending_bytes += vectors.nbytes + sum(map(len, ids)) + 16 * len(ids)
        self._count += len(ids)
        if self._pending_bytes >= INSERT_BYTES:
            self.flush()

    def flush(self) -> None:
        """Send the rows held back by `add`."""
        if not self._pending_ids:
            return
        ids, vectors = self._pending_ids, np.concatenate(self._pending_vectors)
        self._pending_ids, self._pending_vectors, self._pending_bytes = [], [], 0
        first = self._count - len(ids)
        per_insert = max(1, INSERT_BYTES // (4 * self.dim + 64))
        for start, stop in chunk_ranges(len(ids), per_insert):
            rows = [{"row": first + i, "doc_id": ids[i], "vector": vectors[i]} for i in range(start, stop)]
            self._client.insert(self.collection, rows)

    def _search(self, queries: np.ndarray, k: int, batch_size: int, show_progress: bool,
                params: SearchParams | None):  # fmt: skip
        queries = as_matrix(queries, self.dim, "queries")
        chosen = (params or SearchParams()).over(self.defaults)
        search_params = {"metric_type": "IP", "params": search_params_for(self.index_type, chosen)}
        for key in ("ef", "search_list"):  # the candidate list must hold k
            if key in search_params["params"]:
                search_params["params"][key] = max(search_params["params"][key], int(k))
        self.flush()
        k = min(int(k), len(self))
        if k > MAX_TOP_K:
            raise QembedError(f"Milvus returns at most {MAX_TOP_K} results per query, asked for {k}")
        rows = np.full((len(queries), max(k, 0)), -1, dtype=np.int64)
        scores = np.full((len(queries), max(k, 0)), -np.inf, dtype=np.float32)
        doc_ids: list[list[str]] = [[] for _ in range(len(queries))]
        if k <= 0:
            return rows, scores, doc_ids
        batch_size = min(batch_size, MAX_TOP_K)
        for start, stop in progress(chunk_ranges(len(queries), batch_size), show_progress, len(queries)):
            hits = self._client.search(self.collection, data=[q for q in queries[start:stop]], limit=k,
                                       output_fields=["doc_id"], search_params=search_params)  # fmt: skip
            for offset, query_hits in enumerate(hits):
                i = start + offset
                for j, hit in enumerate(query_hits):
                    rows[i, j] = hit["row"] if "row" in hit else hit["id"]
                    scores[i, j] = hit["distance"]
                    doc_ids[i].append(hit["entity"]["doc_id"])
        return rows, scores, doc_ids

    def search_rows(
        self, queries: np.ndarray, k: int, *, batch_size: int = 256, show_progress: bool = False,
        params: SearchParams | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Top-k rows (int64, -1 where none) and inner-product scores (float32, -inf where none), (nq, k')."""
        rows, scores, _ = self._search(queries, k, batch_size, show_progress, params)
        return rows, scores

    def search(
        self, queries: np.ndarray, k: int, *, batch_size: int = 256, show_progress: bool = False,
        params: SearchParams | None = None,
    ) -> tuple[list[list[str]], np.ndarray]:  # fmt: skip
        """Top-k document ids per query (best first) and their scores, float32 (nq, min(k, len))."""
        _, scores, doc_ids = self._search(queries, k, batch_size, show_progress, params)
        return doc_ids, scores

    def save(self, path: str | Path) -> None:
        """Flush the collection, keep it (no longer temporary) and write `meta.json` in folder `path` so that
        `load_index(path)` reconnects."""
        self.flush()
        self._client.flush(self.collection)
        self._drop.clear()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"backend": "milvus", "uri": self.uri, "collection": self.collection, "dim": self.dim,
                "index_type": self.index_type, "nprobe": self.defaults.nprobe,
                "ef": self.defaults.ef}  # fmt: skip
        # the token is never written: `load_index(path, token=...)` takes it from the caller
        (path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, *, token: str = "") -> MilvusIndex:
        meta = json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))
        return cls(meta["uri"], meta["dim"], collection=meta["collection"], reopen=True, token=token,
                   index_type=meta.get("index_type", "FLAT"), nprobe=meta.get("nprobe"),
                   ef=meta.get("ef"))  # fmt: skip
