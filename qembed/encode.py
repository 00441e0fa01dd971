"""The encode pipeline: the one place a corpus becomes vectors (`embed`, `eval`, `mine`, `synth filter`,
`index build` and `adapt` all encode through it).

    texts (a reader, streamed) -> chunks -> [background thread: text keys, cache lookup, tokenisation]
        -> token-budget batches -> model -> embedding cache (each batch as it is done) -> (start, vectors)

Texts are read one chunk at a time; a background thread looks each chunk up in the embedding cache
(`qembed.cache`) and tokenises the texts not yet cached while the model runs on the chunk before it. Each
model batch is written to the cache as soon as it is done, so a killed run loses one batch, and a rerun
encodes nothing that is cached. The consumer (the sink: an index, an output file, an array) receives each
chunk's vectors in input order with `dim`/`normalize` applied; they equal `Embedder.encode`'s.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from qembed.cache import CacheStats, EmbeddingCache, cache_key, key_array, text_key
from qembed.models.matryoshka import truncate_and_normalize
from qembed.models.prompts import QueryFormat
from qembed.progress import progress_bar

__all__ = ["CHUNK_SIZE", "CachedEncoder", "NoCache", "encode_texts", "encode_with_cache", "iter_encode_with_cache"]

CHUNK_SIZE = 1024  # texts read (and looked up, tokenised) at a time: enough for full token-budget batches
READ_AHEAD = 2  # chunks prepared ahead of the model


@dataclass
class _Prepared:
    """One chunk, ready for the model: its keys, where its cached rows are, and what is left to encode."""

    size: int
    keys: np.ndarray  # (size, 20) uint8
    locations: np.ndarray  # cache location of each row, -1 when not cached
    missing: np.ndarray  # rows to encode (first occurrence of each missing key)
    owner: np.ndarray  # for every row that is not cached, its index in `missing`
    token_ids: list[list[int]]  # of the `missing` rows


class CachedEncoder:
    """`texts -> vectors` for one embedder and query format through the embedding cache (opened once).

    `query_format`/`prompt` as in `Embedder.encode` (`MODEL_DEFAULT` is resolved against the embedder).
    Texts not yet cached are tokenised (in a background thread) and encoded in token-budget batches, stored
    full-size and unnormalised; `dim`/`normalize` are applied on the way out. `persist=False` keeps the
    vectors in memory (for weights that change, as in training); `cache` gives an open `EmbeddingCache`.
    """

    def __init__(self, embedder, *, query_format: QueryFormat | str | None = None, prompt: str = "",
                 dim: int | None = None, normalize: bool = True, cache_dir: str | Path | None = None,
                 persist: bool = True, batch_tokens: int | None = None,
                 cache: EmbeddingCache | None = None) -> None:  # fmt: skip
        if dim is not None:
            embedder._check_dim(dim)  # the Matryoshka range, before anything is encoded
        self.embedder = embedder
        self.query_format = embedder.resolve_query_format(query_format, prompt)
        self.dim, self.normalize, self.batch_tokens = dim, normalize, batch_tokens
        if cache is None:
            cache = EmbeddingCache(cache_dir, cache_key(embedder, self.query_format), persist=persist)
        self.cache = cache
        self.stats = CacheStats()

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Vectors of `texts` `(len(texts), dim)`, encoding (as one chunk) only the texts not in the cache."""
        texts = list(texts)
        if not texts:
            return np.empty((0, self.dim or 0), dtype=np.float32)
        return np.concatenate([v for _, v in self.iter_chunks(texts, chunk_size=len(texts), show_progress=False)])

    def rows(self, keys: list[bytes] | np.ndarray) -> np.ndarray:
        """Vectors (with `dim` and `normalize` applied) of texts already in the cache, by text key."""
        if not len(keys):
            return np.empty((0, self.dim or 0), dtype=np.float32)
        return truncate_and_normalize(self.cache.get(keys), self.dim, self.normalize)

    def iter_chunks(self, texts: Iterable[str], *, chunk_size: int = CHUNK_SIZE, total: int | None = None,
                    show_progress: bool | None = None, desc: str = "encoding") -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
        """Yield `(start, vectors)` for consecutive chunks of `texts`, read a chunk at a time (a corpus is
        never held whole); progress counts texts, updated after every model batch."""
        if total is None and hasattr(texts, "__len__"):
            total = len(texts)
        chunks = _chunks(iter(texts), chunk_size)
        start = 0
        with progress_bar(total=total, desc=desc, unit="text", enabled=show_progress) as bar:
            for prepared in _read_ahead(chunks, self._prepare):
                yield start, self._encode(prepared, bar)
                start += prepared.size
        self.cache.flush()

    # ------------------------------------------------------------------ the two halves of the pipeline
    def _prepare(self, texts: list[str]) -> _Prepared:
        """(background thread) keys, cache lookup and token ids of the texts still to encode."""
        keys = key_array([text_key(t) for t in texts])
        locations = self.cache.find(keys)
        first: dict[bytes, int] = {}
        owner = []
        for row in np.flatnonzero(locations < 0).tolist():
            owner.append(first.setdefault(keys[row].tobytes(), row))
        missing = np.asarray(list(first.values()), dtype=np.int64)
        index_of = {row: i for i, row in enumerate(missing.tolist())}
        owner_index = np.asarray([index_of[row] for row in owner], dtype=np.int64)
        token_ids = self.embedder.prepare([texts[i] for i in missing.tolist()], instruction=self.query_format)
        return _Prepared(len(texts), keys, locations, missing, owner_index, token_ids)

    def _encode(self, chunk: _Prepared, bar) -> np.ndarray:
        """(main thread) cached rows read back, the rest encoded batch by batch and cached as they come."""
        if len(chunk.missing):  # cached since the lookup ran ahead (a text repeated in the chunk before)
            late = self.cache.find(chunk.keys[chunk.missing])
            if (late >= 0).any():
                chunk.locations[chunk.locations < 0] = late[chunk.owner]
                keep = late < 0
                still = keep[chunk.owner]
                chunk.owner = (np.cumsum(keep) - 1)[chunk.owner[still]]
                chunk.missing = chunk.missing[keep]
                chunk.token_ids = [ids for ids, kept in zip(chunk.token_ids, keep.tolist()) if kept]
        hit = chunk.locations >= 0
        hits = int(hit.sum())
        out = None
        if hits:
            cached = self.cache.rows(chunk.locations[hit])
            out = np.empty((chunk.size, cached.shape[1]), dtype=np.float32)
            out[hit] = cached
            bar.update(hits)
        if len(chunk.missing):
            counts = np.bincount(chunk.owner, minlength=len(chunk.missing))
            new = None
            for indices in self.embedder.token_batches(chunk.token_ids, self.batch_tokens):
                vectors = self.embedder.encode_batch([chunk.token_ids[i] for i in indices], steady_shape=True,
                                                     batch_tokens=self.batch_tokens)  # fmt: skip
                if new is None:
                    new = np.empty((len(chunk.missing), vectors.shape[1]), dtype=np.float32)
                new[indices] = vectors
                self.cache.add(chunk.keys[chunk.missing[indices]], vectors)
                bar.update(int(counts[indices].sum()))
            if out is None:
                out = np.empty((chunk.size, new.shape[1]), dtype=np.float32)
            out[~hit] = new[chunk.owner]
        self.stats.hits += hits
        self.stats.encoded += len(chunk.missing)
        return truncate_and_normalize(out, self.dim, self.normalize)


class NoCache:
    """A cache that holds nothing (`CachedEncoder(..., cache=NoCache())`): for a verb whose output is the
    vectors themselves (`qembed embed`), so memory stays bounded and nothing is stored twice."""

    persist = False

    def __len__(self) -> int:
        return 0

    def find(self, keys) -> np.ndarray:
        return np.full(len(keys), -1, dtype=np.int64)

    def add(self, keys, vectors) -> None:
        pass

    def flush(self) -> None:
        pass


def _chunks(iterator: Iterator[str], size: int) -> Iterator[list[str]]:
    if size < 1:
        raise ValueError(f"chunk_size must be positive, got {size}")
    while chunk := list(islice(iterator, size)):
        yield chunk


_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _read_ahead(chunks: Iterator[list[str]], prepare, depth: int = READ_AHEAD) -> Iterator[_Prepared]:
    """`prepare(chunk)` of each chunk, computed in a background thread up to `depth` chunks ahead of the
    consumer; an error there is raised here, in order."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for chunk in chunks:
                if stop.is_set() or not put(prepare(chunk)):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failed(exc))

    worker = threading.Thread(target=work, name="qembed-tokenize", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()


def iter_encode_with_cache(embedder, texts: Iterable[str], *, instruction: QueryFormat | str | None = None,
                           prompt: str = "", dim: int | None = None, normalize: bool = True,
                           cache_dir: str | Path | None = None, chunk_size: int = CHUNK_SIZE, total: int | None = None,
                           show_progress: bool | None = None, desc: str = "encoding",
                           stats: CacheStats | None = None, batch_tokens: int | None = None,
                           persist: bool = True) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """Yield `(start, vectors)` for consecutive chunks of `texts`, encoding only texts not yet cached
    (see `CachedEncoder`); `stats`, if given, receives the hit/encoded counts."""
    encoder = CachedEncoder(embedder, query_format=instruction, prompt=prompt, dim=dim, normalize=normalize,
                            cache_dir=cache_dir, batch_tokens=batch_tokens, persist=persist)  # fmt: skip
    if stats is not None:
        encoder.stats = stats
    yield from encoder.iter_chunks(texts, chunk_size=chunk_size, total=total, show_progress=show_progress, desc=desc)


def encode_with_cache(embedder, texts: Iterable[str], **kwargs) -> np.ndarray:
    """All vectors of `texts` as one `(n, dim)` float32 array; see `iter_encode_with_cache` for the options."""
    parts = [vectors for _, vectors in iter_encode_with_cache(embedder, texts, **kwargs)]
    return np.concatenate(parts) if parts else np.empty((0, 0), dtype=np.float32)


def encode_texts(embedder, texts: Iterable[str], *, instruction: QueryFormat | str | None = None, prompt: str = "",
                 dim: int | None = None, normalize: bool = True, batch_tokens: int | None = None,
                 show_progress: bool | None = False) -> np.ndarray:  # fmt: skip
    """Vectors of in-memory texts through the pipeline without touching the disk cache (repeated texts are
    encoded once): what `synth filter` uses. For a corpus, use `CachedEncoder.iter_chunks`."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, embedder._check_dim(dim)), dtype=np.float32)
    return encode_with_cache(embedder, texts, instruction=instruction, prompt=prompt, dim=dim, normalize=normalize,
                             batch_tokens=batch_tokens, show_progress=show_progress, persist=False)  # fmt: skip
