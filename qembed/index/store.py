"""A persistent search index: a folder with the vectors, the documents and a manifest.

Layout of `DIR`:
- `manifest.json`: model name and fingerprint, dim, document prompt, count, backend spec, build time;
- `docs.jsonl` (one `{"id", "text"}` line per row, in row order, written as the vectors come) and
  `docs.offsets.npy` (byte offset of each line), so a hit's text is read without loading all texts;
- `vectors/`: the vector index (`load_index`); for a Milvus server only its connection facts;
- `.qembed-output.json` (the folder is qembed's) and, while a build runs or after it was killed, `.build.json`.
Vectors come through the shared embedding cache (`qembed.cache`), so rebuilding a grown corpus, or building
after `eval`/`adapt` with the same model, encodes only new or changed documents.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qembed.arrays import GrowingArray
from qembed.data.corpus import check_corpus, iter_corpus
from qembed.errors import QembedError
from qembed.files import atomic_write_json, is_owned, mark_owned
from qembed.index import RecallProbe, SearchParams, load_index, open_index, parse_spec
from qembed.index.milvus_index import build_collection, drop_collection, saved_collection

MANIFEST = "manifest.json"
FORMAT = "qembed-index-1"


@dataclass
class Manifest:
    """What an index folder holds and which model made it."""

    model: str
    fingerprint: str
    dim: int
    document_prompt: str
    count: int
    index: str
    built_at: str
    build_seconds: float
    encoded: int = 0  # documents encoded by the last build (the rest came from the cache)
    collection: str | None = None  # Milvus collection this folder created (and may replace)
    recall_at_10: float | None = None  # an approximate index's recall@10 against exact search, measured at build
    format: str = FORMAT

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            if (Path(directory) / BUILD_MARKER).is_file():
                raise QembedError(f"{directory}: its `qembed index build` did not finish (killed or failed): "
                                  "run the same command again to continue it")  # fmt: skip
            raise QembedError(f"{directory} is not a qembed index (no {MANIFEST}); build one with `qembed index build`")
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise QembedError(f"{path}: unknown index format {data.get('format')!r}")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Hit:
    """One search result: document id, similarity, text and, when reranked, the reranker's score."""

    id: str
    score: float
    text: str
    rerank_score: float | None = None


@dataclass
class BuildResult:
    manifest: Manifest
    encoded: int
    cached: int


BUILD_MARKER = ".build.json"  # an index build in progress (or killed): the same command continues it
VERB = "index build"


def claim_index_dir(output: Path) -> Manifest | None:
    """Mark `output` as an index folder before anything else is written (refusing a folder of the user's);
    returns the manifest of the index it already holds, if any."""
    previous = Manifest.read(output) if (output / MANIFEST).is_file() else None
    if output.exists() and previous is None and not is_owned(output, VERB) and any(output.iterdir()):
        raise QembedError(f"{output} exists and is not a qembed index: choose an empty or new folder")
    mark_owned(output, VERB)
    return previous


def build_index(
    embedder,
    corpus: str | Path,
    output: str | Path,
    *,
    index: str = "faiss",
    dim: int | None = None,
    batch_tokens: int | None = None,
    collection: str | None = None,
    overwrite: bool = False,
    token: str = "",
    chunk_size: int = 1024,
    show_progress: bool | None = None,
    cache_dir: str | Path | None = None,
    corpus_size: int | None = None,
    engine=None,
) -> BuildResult:
    """Encode `corpus` with `embedder` (documents: its document prompt) into the index folder `output`.

    Vectors come through the shared embedding cache (`cache_dir`, default `qembed.cache.default_cache_dir()`),
    so a rebuild, a build after `eval` or `adapt` with the same model, or a killed build run again encodes
    only what is not cached yet. The folder is marked as an index build from its first byte; a build that was
    killed (no manifest yet) is continued by the same command. Memory besides the vectors: about 30 bytes per
    document plus its id (offsets, ids, the cache's key index; 8 bytes per id while `check_corpus` checks the
    corpus first; a caller that ran it gives its count as `corpus_size`), no Python object per document.
    For Milvus, the collection is `collection` or a fresh unique name; an existing collection that this
    folder did not create is never dropped unless `overwrite=True`. A rebuild writes a new collection and
    drops the one it replaces only after the manifest has switched to the new one.
    An approximate index's recall@10 against exact search (`RecallProbe`) goes into the manifest.
    `engine`: a `qembed.ray_engine.RayOptions` to encode the corpus on Ray (into the embedding cache) first.
    """
    from qembed.encode import CachedEncoder

    start = time.perf_counter()
    output = Path(output)
    backend, arg = parse_spec(index)
    out_dim = embedder._check_dim(dim) if dim is not None else embedder.hidden_size
    # bad records, repeated ids or a missing corpus fail now, before anything is written or encoded; the count
    # (blank documents included: an upper bound) sizes the index and the progress total
    expected = corpus_size if corpus_size is not None else check_corpus(corpus)
    previous = claim_index_dir(output)
    atomic_write_json(output / BUILD_MARKER, {"corpus": str(corpus), "index": index, "model": embedder.name_or_path,
                                              "fingerprint": embedder.fingerprint, "dim": out_dim})  # fmt: skip
    options: dict = {}
    replaced = saved_collection(output / "vectors") if previous is not None and previous.collection else None
    if backend == "milvus":
        collection = build_collection(arg["uri"], collection, previous.collection if previous else None,
                                      overwrite=overwrite, token=token, owner=str(output))  # fmt: skip
        options = {"collection": collection, "overwrite": overwrite, "temporary": True, "token": token}
    tmp_docs = output / ".docs.jsonl.tmp"
    vectors_tmp = output / ".vectors.tmp"
    shutil.rmtree(vectors_tmp, ignore_errors=True)
    vector_index = probe = None
    encoder = CachedEncoder(embedder, prompt=embedder.document_prompt, dim=dim, cache_dir=cache_dir,
                            normalize=embedder.search_normalize, batch_tokens=batch_tokens)  # fmt: skip
    if engine is not None:
        from qembed.ray_engine import fill_cache

        fill_cache(encoder, corpus, engine, show_progress=show_progress)
    stats = encoder.stats
    offsets = GrowingArray(capacity=expected)
    pending: list[str] = []  # ids of the documents read but not yet indexed (read-ahead: a few chunks)

    def texts(docs_file):
        """Write each document line as it passes, remember its offset and id, and yield its text."""
        for doc_id, text in iter_corpus(corpus, check_ids=False):  # checked above, in bounded memory
            line = (json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n").encode("utf-8")
            offsets.append(docs_file.tell())
            pending.append(doc_id)
            docs_file.write(line)
            yield text

    try:
        with tmp_docs.open("wb") as docs_file:
            for _, vectors in encoder.iter_chunks(texts(docs_file), chunk_size=chunk_size, total=expected,
                                                  show_progress=show_progress, desc="index"):  # fmt: skip
                if vector_index is None:
                    vector_index = open_index(index, out_dim, capacity=expected, **options)
                    probe = None if vector_index.exact else RecallProbe()
                ids = pending[: len(vectors)]
                del pending[: len(vectors)]
                vector_index.add(ids, vectors)
                if probe is not None:
                    probe.add(vectors)
        if vector_index is None:
            raise QembedError(f"{corpus}: the corpus is empty")
        recall = round(probe.recall(vector_index), 4) if probe is not None else None
        vector_index.save(vectors_tmp)
    except BaseException:
        if vector_index is not None and backend == "milvus":
            vector_index.close()  # a failed build drops the new collection
        raise
    count = len(offsets)
    np.save(output / ".docs.offsets.tmp.npy", offsets.array)
    # Swap the new files in (each rename is atomic; the manifest comes last).
    shutil.rmtree(output / "vectors", ignore_errors=True)
    vectors_tmp.rename(output / "vectors")
    tmp_docs.replace(output / "docs.jsonl")
    (output / ".docs.offsets.tmp.npy").replace(output / "docs.offsets.npy")
    local = Path(embedder.name_or_path).expanduser()
    manifest = Manifest(
        model=str(local.resolve()) if local.is_dir() else embedder.name_or_path, fingerprint=embedder.fingerprint, dim=out_dim,
        document_prompt=embedder.document_prompt, count=count, index=index,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(time.perf_counter() - start, 3), encoded=stats.encoded,
        collection=collection if backend == "milvus" else None, recall_at_10=recall,
    )  # fmt: skip
    atomic_write_json(output / MANIFEST, asdict(manifest), indent=1)
    (output / BUILD_MARKER).unlink(missing_ok=True)
    if replaced is not None and replaced[1] == previous.collection:  # switched: the old collection can go
        drop_collection(*replaced, token=token)
    return BuildResult(manifest, encoded=stats.encoded, cached=stats.hits)


class SearchIndex:
    """An index folder opened for searching with the model that built it."""

    def __init__(self, directory: str | Path, embedder, *, token: str = "", params: SearchParams | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory)
        if embedder.fingerprint != self.manifest.fingerprint:
            raise QembedError(
                f"{self.directory} was built with model {self.manifest.model!r} (fingerprint "
                f"{self.manifest.fingerprint}), not with {embedder.name_or_path!r} ({embedder.fingerprint}): "
                "search it with the same model or rebuild it"
            )
        self.embedder = embedder
        self.vectors = load_index(self.directory / "vectors", **({"token": token} if token else {}))
        self.params = params  # default search parameters (`SearchParams`) over the index's own
        if params is not None:
            self.vectors.check_params(params)
        self._offsets = np.load(self.directory / "docs.offsets.npy")
        if len(self._offsets) != len(self.vectors):
            raise QembedError(f"{self.directory}: {len(self.vectors)} vectors but {len(self._offsets)} documents")

    def __len__(self) -> int:
        return len(self._offsets)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def document(self, row: int) -> tuple[str, str]:
        """(id, text) of a row, read from `docs.jsonl` at its offset."""
        with (self.directory / "docs.jsonl").open("rb") as f:
            f.seek(int(self._offsets[row]))
            record = json.loads(f.readline())
        return record["id"], record["text"]

    def search_vectors(self, queries: np.ndarray, top_k: int = 10, params: SearchParams | None = None) -> list[list[Hit]]:
        """Hits (best first) for each query vector; `params` override this index's search parameters."""
        params = params.over(self.params) if params is not None else self.params
        rows, scores = self.vectors.search_rows(queries, top_k, params=params)
        hits = []
        for row_list, score_list in zip(rows.tolist(), scores.tolist()):
            found = []
            for row, score in zip(row_list, score_list):
                if row >= 0:
                    doc_id, text = self.document(row)
                    found.append(Hit(doc_id, float(score), text))
            hits.append(found)
        return hits

    def encode_queries(self, queries: list[str], instruction: str | None = None) -> np.ndarray:
        """Query vectors as the index expects them: the model's default instruction unless one is given."""
        options = {"dim": self.dim if self.dim != self.embedder.hidden_size else None,
                   "normalize": self.embedder.search_normalize}  # fmt: skip
        if instruction is not None:
            return self.embedder.encode_queries(queries, instruction=instruction, **options)
        return self.embedder.encode_queries(queries, **options)

    def search(self, query: str, top_k: int = 10, *, instruction: str | None = None, reranker=None,
               rerank_top: int | None = None, params: SearchParams | None = None) -> list[Hit]:  # fmt: skip
        """Hits for one query; with `reranker`, the first `rerank_top` (default top_k) are re-scored and re-sorted."""
        hits = self.search_vectors(self.encode_queries([query], instruction), top_k, params)[0]
        if reranker is not None:
            hits = rerank_hits(reranker, query, hits, rerank_top, instruction)
        return hits


def rerank_hits(reranker, query: str, hits: list[Hit], rerank_top: int | None, instruction: str | None,
                scores: list[float] | None = None) -> list[Hit]:  # fmt: skip
    """Re-score the first `rerank_top` hits with `reranker` (or the given `scores`), best first; the rest follow."""
    head = hits[: rerank_top or len(hits)]
    if scores is None:
        scores = reranker.score(query, [h.text for h in head], instruction=instruction)
    for hit, score in zip(head, scores):
        hit.rerank_score = float(score)
    head = sorted(head, key=lambda h: -h.rerank_score)
    return head + hits[len(head) :]


def open_search_index(directory: str | Path, embedder, *, token: str = "",
                      params: SearchParams | None = None) -> SearchIndex:  # fmt: skip
    """Open an index folder for searching; refuses an embedder other than the one that built it. `params`:
    default search parameters (nprobe, ef) over the ones the index was built with."""
    return SearchIndex(directory, embedder, token=token, params=params)


def search_index(directory: str | Path, embedder, query: str, top_k: int = 10, **kwargs) -> list[Hit]:
    """One-shot search of an index folder (see `SearchIndex.search`)."""
    return open_search_index(directory, embedder, token=kwargs.pop("token", "")).search(query, top_k, **kwargs)
