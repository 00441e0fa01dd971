"""On-disk embedding cache, so a second evaluation (another reranker, another k list) does not re-encode.

Layout: `<cache root>/<key>/` per (model fingerprint, instruction, dim, normalize), holding `meta.json`
and append-only shards `<name>.vec.npy` (float32 rows) + `<name>.keys.npy` (sha1 of each row's text, uint8).
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

from qembed.progress import progress_bar

log = logging.getLogger(__name__)

KEY_BYTES = 20  # sha1 digest, stored as uint8 rows (numpy bytes strings would drop trailing zero bytes)
SUB_BATCH = 128  # texts per encode call inside a chunk (the progress bar moves at this pace)


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


class EmbeddingCache:
    """Vectors of one (model fingerprint, instruction or prompt, dim, normalize) setting, looked up by text hash."""

    def __init__(self, root: str | Path | None, *, fingerprint: str, instruction: str | None,
                 dim: int | None, normalize: bool, prompt: str = "") -> None:
        meta = {"fingerprint": fingerprint, "instruction": instruction, "dim": dim, "normalize": normalize}
        if prompt:
            meta["prompt"] = prompt
        digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        self.path = Path(root or default_cache_dir()) / digest
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "meta.json").exists():
            _atomic_write(self.path / "meta.json", json.dumps(meta, indent=1).encode())
        self._where: dict[bytes, tuple[int, int]] = {}  # key -> (shard number, row)
        self._shards: list[np.ndarray] = []
        for keys_path in sorted(self.path.glob("*.keys.npy")):
            self._open_shard(keys_path)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: bytes) -> bool:
        return key in self._where

    def get(self, keys: list[bytes]) -> np.ndarray:
        """Vectors for keys that are all in the cache, in order."""
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
        name = f"{time.time_ns():020d}-{os.getpid()}"
        _atomic_write(self.path / f"{name}.vec.npy", _npy_bytes(vectors))
        keys_path = self.path / f"{name}.keys.npy"
        _atomic_write(keys_path, _npy_bytes(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES)))
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
        number = len(self._shards)
        self._shards.append(vectors)
        data = keys.tobytes()
        for row in range(len(keys)):
            self._where[data[row * KEY_BYTES : (row + 1) * KEY_BYTES]] = (number, row)


def iter_encode_with_cache(
    embedder,
    texts: Iterable[str],
    *,
    instruction: str | None = None,
    prompt: str = "",
    dim: int | None = None,
    normalize: bool = True,
    cache_dir: str | Path | None = None,
    chunk_size: int = 4096,
    total: int | None = None,
    show_progress: bool | None = None,
    desc: str = "encoding",
    stats: CacheStats | None = None,
    batch_tokens: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(start, vectors)` for consecutive chunks of `texts`, encoding only texts not yet cached.

    `texts` may be any iterable (it is read one chunk at a time), so a corpus can be indexed as its
    vectors come without holding all texts or vectors in memory. Encoded vectors are appended to the
    cache chunk by chunk, so a killed run resumes from its last finished chunk. `instruction` (Qwen3 query
    template) and `prompt` (a raw prefix, e.g. a document prompt) are passed to `embedder.encode`.
    """
    cache = EmbeddingCache(cache_dir, fingerprint=embedder.fingerprint, instruction=instruction,
                           dim=dim, normalize=normalize, prompt=prompt)
    stats = stats if stats is not None else CacheStats()
    if total is None and hasattr(texts, "__len__"):
        total = len(texts)
    iterator = iter(texts)
    start = 0
    with progress_bar(total=total, desc=desc, unit="text", enabled=show_progress) as bar:
        while chunk := list(islice(iterator, chunk_size)):
            keys = [text_key(t) for t in chunk]
            missing: dict[bytes, str] = {}
            for key, text in zip(keys, chunk):
                if key not in cache and key not in missing:
                    missing[key] = text
            stats.hits += len(chunk) - sum(1 for k in keys if k in missing)
            bar.update(len(chunk) - len(missing))
            if missing:
                extra = {"prompt": prompt} if prompt else {}
                extra.update({"batch_tokens": batch_tokens} if batch_tokens is not None else {})
                new_keys, new_vectors = _encode(embedder, missing, bar, instruction=instruction, dim=dim,
                                                normalize=normalize, **extra)
                cache.add(new_keys, new_vectors)
                stats.encoded += len(new_keys)
            yield start, cache.get(keys)
            start += len(chunk)


def encode_with_cache(embedder, texts: Iterable[str], **kwargs) -> np.ndarray:
    """All vectors of `texts` as one `(n, dim)` float32 array; see `iter_encode_with_cache` for the options."""
    parts = [vectors for _, vectors in iter_encode_with_cache(embedder, texts, **kwargs)]
    return np.concatenate(parts) if parts else np.empty((0, 0), dtype=np.float32)


def _encode(embedder, missing: dict[bytes, str], bar, **options) -> tuple[list[bytes], np.ndarray]:
    # Sorted by length so each encode call pads little; the bar moves every SUB_BATCH texts.
    items = sorted(missing.items(), key=lambda kv: len(kv[1]))
    keys, parts = [], []
    for i in range(0, len(items), SUB_BATCH):
        batch = items[i : i + SUB_BATCH]
        vectors = embedder.encode([t for _, t in batch], show_progress=False, **options)
        keys += [k for k, _ in batch]
        parts.append(np.asarray(vectors, dtype=np.float32))
        bar.update(len(batch))
    return keys, np.concatenate(parts)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
