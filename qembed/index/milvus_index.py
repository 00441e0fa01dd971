"""Vector index on Milvus through `pymilvus`: a Milvus Lite file (`./name.db`) or a server (`http://host:19530`).

The collection holds `row` (INT64 primary key = insertion order), `doc_id` (VARCHAR) and `vector`
(FLOAT_VECTOR) with a FLAT (exact) inner-product index by default, so rankings match the FAISS flat index.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qembed.errors import QembedError
from qembed.index.base import as_matrix, chunk_ranges, progress

MAX_TOP_K = 16384  # Milvus limit on `limit` (top-k) and on queries per search request
MAX_ID_LENGTH = 65535  # Milvus VARCHAR max_length
INSERT_BYTES = 32 * 2**20  # stay well under the 64 MB gRPC message limit per insert
CONNECT_TIMEOUT = 60  # seconds (pymilvus' default of 10 is short for a loaded server)


def is_lite_uri(uri: str) -> bool:
    return "://" not in uri


GRPC_OPTIONS = {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False}


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

    if is_lite_uri(uri):
        path = Path(uri).expanduser().resolve()
        if not path.exists():
            return False
        uri = str(path)
    client = connect(uri, token)
    try:
        return bool(client.has_collection(collection))
    finally:
        client.close()


class MilvusIndex:
    """Inner-product index in a Milvus collection.

    `uri` is a Milvus Lite database file (any path without a scheme, e.g. `./index.db`) or a server URI.
    With `overwrite=True` (default) an existing collection of that name is dropped and created afresh;
    with `overwrite=False` it is reopened and new vectors are appended after its rows.
    `index_type`/`index_params` choose the Milvus index (default FLAT: exact search).
    """

    def __init__(
        self,
        uri: str,
        dim: int,
        *,
        collection: str = "qembed",
        overwrite: bool = True,
        token: str = "",
        index_type: str = "FLAT",
        index_params: dict | None = None,
    ) -> None:
        from pymilvus import DataType, MilvusClient

        lite = is_lite_uri(uri)
        if lite:
            path = Path(uri).expanduser().resolve()
            if path.suffix != ".db":
                raise QembedError(f"a Milvus Lite path must end with .db, got {uri!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            uri = str(path)
        self.uri, self.collection, self.dim = uri, collection, int(dim)
        self._token = token
        self._client = connect(uri, token)
        exists = self._client.has_collection(collection)
        if exists and overwrite:
            self._client.drop_collection(collection)
            exists = False
        if exists:
            field = next(
                f for f in self._client.describe_collection(collection)["fields"] if f["name"] == "vector"
            )
            found = int(field["params"]["dim"])
            if found != self.dim:
                raise QembedError(f"Milvus collection {collection!r} has dim {found}, expected {self.dim}")
            self._client.load_collection(collection)
            self._count = self._row_count()
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_ID_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        params = self._client.prepare_index_params()
        params.add_index(
            field_name="vector", index_type=index_type, metric_type="IP", params=index_params or {}
        )
        if not lite:
            self._client.create_collection(
                collection, schema=schema, index_params=params, consistency_level="Strong"
            )
        else:  # waiting for the index calls AllocTimestamp, which Milvus Lite lacks (a logged traceback)
            self._client.create_collection(collection, schema=schema, consistency_level="Strong")
            self._client.create_index(collection, params, sync=False)
            self._client.load_collection(collection)
        self._count = 0

    def _row_count(self) -> int:
        result = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    def __len__(self) -> int:
        return self._count

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Append vectors with their ids, in inserts small enough for Milvus' message limit."""
        vectors = as_matrix(vectors, self.dim, "vectors")
        if len(ids) != len(vectors):
            raise QembedError(f"add: {len(ids)} ids for {len(vectors)} vectors")
        ids = [str(i) for i in ids]
        too_long = next((i for i in ids if len(i.encode("utf-8")) > MAX_ID_LENGTH), None)
        if too_long is not None:
            raise QembedError(f"document id longer than Milvus' {MAX_ID_LENGTH} bytes: {too_long[:40]!r}...")
        per_insert = max(1, INSERT_BYTES // (4 * self.dim + 64))
        for start, stop in chunk_ranges(len(ids), per_insert):
            rows = [
                {"row": self._count + i, "doc_id": ids[i], "vector": vectors[i]} for i in range(start, stop)
            ]
            self._client.insert(self.collection, rows)
        self._count += len(ids)

    def _search(self, queries: np.ndarray, k: int, batch_size: int, show_progress: bool):
        queries = as_matrix(queries, self.dim, "queries")
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
            hits = self._client.search(
                self.collection,
                data=[q for q in queries[start:stop]],
                limit=k,
                output_fields=["doc_id"],
                search_params={"metric_type": "IP"},
            )
            for offset, query_hits in enumerate(hits):
                i = start + offset
                for j, hit in enumerate(query_hits):
                    rows[i, j] = hit["row"] if "row" in hit else hit["id"]
                    scores[i, j] = hit["distance"]
                    doc_ids[i].append(hit["entity"]["doc_id"])
        return rows, scores, doc_ids

    def search_rows(
        self, queries: np.ndarray, k: int, *, batch_size: int = 256, show_progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (int64, -1 where none) and inner-product scores (float32, -inf where none), (nq, k')."""
        rows, scores, _ = self._search(queries, k, batch_size, show_progress)
        return rows, scores

    def search(
        self, queries: np.ndarray, k: int, *, batch_size: int = 256, show_progress: bool = False
    ) -> tuple[list[list[str]], np.ndarray]:
        """Top-k document ids per query (best first) and their scores, float32 (nq, min(k, len))."""
        _, scores, doc_ids = self._search(queries, k, batch_size, show_progress)
        return doc_ids, scores

    def save(self, path: str | Path) -> None:
        """Flush the collection and write `meta.json` in folder `path` so `load_index(path)` reconnects."""
        self._client.flush(self.collection)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"backend": "milvus", "uri": self.uri, "collection": self.collection, "dim": self.dim}
        # the token is never written: `load_index(path, token=...)` takes it from the caller
        (path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, *, token: str = "") -> MilvusIndex:
        meta = json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))
        return cls(meta["uri"], meta["dim"], collection=meta["collection"], overwrite=False, token=token)

    def close(self) -> None:
        self._client.close()
