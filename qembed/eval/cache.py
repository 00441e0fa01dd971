"""On-disk embedding cache, so a second evaluation (another reranker, another k list, another `--dim`) does
not re-encode.

Layout: `<cache root>/<key>/` per (model fingerprint, dtype, device type, query-format prefix), holding
`meta.json` and append-only shards `<name>.vec.npy` (full-size, unnormalised float32 rows) +
`<name>.keys.npy` (sha1 of each row's text, uint8). Matryoshka sizes and normalisation are derived on reading
(`truncate_and_normalize`, exactly what `Embedder.encode` does), so one shard serves every `dim`.
A shard counts only once both files exist with the same row count; each file is written to a temporary
name and renamed, the keys last, so a run killed mid-write leaves nothing that is read back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from qembed.files import atomic_write_bytes
from qembed.models.embedder import truncate_and_normalize
from qembed.models.prompts import QueryFormat
from qembed.progress import progress_bar

log = logging.getLogger(__name__)

KEY_BYTES = 20  # sha1 digest, stored as uint8 rows (numpy bytes strings would drop trailing zero bytes)
CHUNK_SIZE = 1024  # texts per encode call: large enough for full token-budget batches, small enough to resume


def default_cache_dir() -> Path:
    """`$QEMBED_CACHE` if set, else `~/.cache/qembed/embeddings`."""
    return Path(os.environ.get("QEMBED_CACHE") or Path.home() / ".cache" / "qembed" / "embeddings").expanduser()


def text_key(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()


@dataclass
class CacheStats:
    """How many texts came from the cache and how many were encoded."""

    hits: int = 0
    encoded: int = 0


def cache_key(embedder, query_format: QueryFormat) -> dict:
    """What identifies a cached vector besides its text: the model's weights, dtype and device type
    (`embedder.cache_identity`) and the exact prefix the (resolved) query format puts before the text."""
    return {**embedder.cache_identity, "prefix": query_format.prefix}


class EmbeddingCache:
    """Full-size vectors of one `cache_key`, looked up by text hash; `persist=False` keeps them in memory only."""

    def __init__(self, root: str | Path | None, key: dict, *, persist: bool = True) -> None:
        self.persist = persist
        self.path: Path | None = None
        self._where: dict[bytes, tuple[int, int]] = {}  # key -> (shard number, row)
        self._shards: list[np.ndarray] = []
        if not persist:
            return
        meta = json.dumps(key, sort_keys=True, ensure_ascii=False)
        self.path = Path(root or default_cache_dir()) / hashlib.sha1(meta.encode()).hexdigest()[:24]
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "meta.json").exists():
            atomic_write_bytes(self.path / "meta.json", json.dumps(key, indent=1, ensure_ascii=False).encode())
        for keys_path in sorted(self.path.glob("*.keys.npy")):
            self._open_shard(keys_path)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: bytes) -> bool:
        return key in self._where

    def get(self, keys: list[bytes]) -> np.ndarray:
        """Stored (full-size, unnormalised) vectors for keys that are all in the cache, in order."""
        out = None
        for i, key in enumerate(keys):
            shard, row = self._where[key]
            vector = self._shards[shard][row]
            if out is None:
                out = np.empty((len(keys), vector.shape[0]), dtype=np.float32)
            out[i] = vector
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def add(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Append one shard (crash-safe: temporary files renamed into place, keys last)."""
        if not keys:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        assert len(keys) == len(vectors)
        if not self.persist:
            self._index_shard(vectors, np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES))
            return
        name = f"{time.time_ns():020d}-{os.getpid()}"
        atomic_write_bytes(self.path / f"{name}.vec.npy", _npy_bytes(vectors))
        keys_path = self.path / f"{name}.keys.npy"
        atomic_write_bytes(keys_path, _npy_bytes(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES)))
        self._open_shard(keys_path)

    def _open_shard(self, keys_path: Path) -> None:
        vec_path = keys_path.with_name(keys_path.name.replace(".keys.npy", ".vec.npy"))
        try:
            keys = np.load(keys_path)
            vectors = np.load(vec_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            log.warning("embedding cache: ignoring unreadable shard %s (%s)", keys_path.name, exc)
            return
        if keys.dtype != np.uint8 or keys.shape[1:] != (KEY_BYTES,) or vectors.ndim != 2 or len(vectors) != len(keys):
            log.warning("embedding cache: ignoring inconsistent shard %s", keys_path.name)
            return
        self._index_shard(vectors, keys)

    def _index_shard(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        number = len(self._shards)
        self._shards.append(vectors)
        data = keys.tobytes()
        for row in range(len(keys)):
            self._where[data[row * KEY_BYTES : (row + 1) * KEY_BYTES]] = (number, row)


class CachedEncoder:
    """`texts -> vectors` for one embedder and query format through the embedding cache (opened once).

    `query_format`/`prompt` as in `Embedder.encode` (`MODEL_DEFAULT` is resolved against the embedder).
    Texts not yet cached are encoded together (one `encode` call per call of this object, so token-budget
    batches fill), stored full-size and unnormalised; `dim`/`normalize` are applied on the way out.
    """

    def __init__(self, embedder, *, query_format: QueryFormat | str | None = None, prompt: str = "",
                 dim: int | None = None, normalize: bool = True, cache_dir: str | Path | None = None,
                 persist: bool = True, batch_tokens: int | None = None) -> None:  # fmt: skip
        if dim is not None:
            embedder._check_dim(dim)  # the Matryoshka range, before anything is encoded
        self.embedder = embedder
        self.query_format = embedder.resolve_query_format(query_format, prompt)
        self.dim, self.normalize, self.batch_tokens = dim, normalize, batch_tokens
        self.cache = EmbeddingCache(cache_dir, cache_key(embedder, self.query_format), persist=persist)
        self.stats = CacheStats()

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Vectors of `texts` `(len(texts), dim)`, encoding only the texts not in the cache."""
        keys = [text_key(t) for t in texts]
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts):
            if key not in self.cache and key not in missing:
                missing[key] = text
        self.stats.hits += len(texts) - sum(1 for k in keys if k in missing)
        if missing:
            vectors = self.embedder.encode(list(missing.values()), instruction=self.query_format, normalize=False,
                                           batch_tokens=self.batch_tokens, show_progress=False)  # fmt: skip
            self.cache.add(list(missing), vectors)
            self.stats.encoded += len(missing)
        return self.rows(keys)

    def rows(self, keys: list[bytes]) -> np.ndarray:
        """Vectors (with `dim` and `normalize` applied) of texts already in the cache, by text key."""
        if not keys:
            return np.empty((0, self.dim or 0), dtype=np.float32)
        return truncate_and_normalize(self.cache.get(keys), self.dim, self.normalize)

    def iter_chunks(self, texts: Iterable[str], *, chunk_size: int = CHUNK_SIZE, total: int | None = None,
                    show_progress: bool | None = None, desc: str = "encoding") -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
        """Yield `(start, vectors)` for consecutive chunks of `texts` (read one chunk at a time, so a corpus
        can be indexed as its vectors come); each chunk is cached as it is done, so a killed run resumes
        from its last finished chunk."""
        if total is None and hasattr(texts, "__len__"):
            total = len(texts)
        iterator = iter(texts)
        start = 0
        with progress_bar(total=total, desc=desc, unit="text", enabled=show_progress) as bar:
            while chunk := list(islice(iterator, chunk_size)):
                yield start, self(chunk)
                start += len(chunk)
                bar.update(len(chunk))


def iter_encode_with_cache(embedder, texts: Iterable[str], *, instruction: QueryFormat | str | None = None,
                           prompt: str = "", dim: int | None = None, normalize: bool = True,
                           cache_dir: str | Path | None = None, chunk_size: int = CHUNK_SIZE, total: int | None = None,
                           show_progress: bool | None = None, desc: str = "encoding",
                           stats: CacheStats | None = None,
                           batch_tokens: int | None = None) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """Yield `(start, vectors)` for consecutive chunks of `texts`, encoding only texts not yet cached
    (see `CachedEncoder`); `stats`, if given, receives the hit/encoded counts."""
    encoder = CachedEncoder(embedder, query_format=instruction, prompt=prompt, dim=dim, normalize=normalize,
                            cache_dir=cache_dir, batch_tokens=batch_tokens)  # fmt: skip
    if stats is not None:
        encoder.stats = stats
    yield from encoder.iter_chunks(texts, chunk_size=chunk_size, total=total, show_progress=show_progress, desc=desc)


def encode_with_cache(embedder, texts: Iterable[str], **kwargs) -> np.ndarray:
    """All vectors of `texts` as one `(n, dim)` float32 array; see `iter_encode_with_cache` for the options."""
    parts = [vectors for _, vectors in iter_encode_with_cache(embedder, texts, **kwargs)]
    return np.concatenate(parts) if parts else np.empty((0, 0), dtype=np.float32)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
