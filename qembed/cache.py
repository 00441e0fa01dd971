"""The embedding cache: full-size, unnormalised float32 vectors of texts already encoded, on disk, so that no
verb encodes the same text with the same model twice (`eval`, `mine`, `index build`, `adapt`, `embed`).

Layout: `<cache root>/<key>/` per `cache_key` (model fingerprint, dtype, device type, query-format prefix),
holding `meta.json` and shards. A shard is two append-only files, `<name>.keys` (the 20-byte sha1 of each
row's text, back to back) and `<name>.d<dim>.vec` (float32 rows), rolled over at `SHARD_ROWS` rows, so a
cache of N texts has about N / 65,536 shards. A writer appends the vectors first and the keys after them, and
a row counts only once its key and its vector are both complete, so a run killed mid-write never yields a bad
row; the incomplete tail is cut when a writer next appends to that shard. Each `add` is written through to the
operating system at once, so a killed run loses only the batch in flight. A shard being appended to is locked
(`flock`): concurrent runs each append to a shard of their own.

Memory: the text keys stay on disk (memory-mapped); RAM holds 16 bytes per cached row (the first 8 key bytes
and the row's location, in sorted numpy arrays; lookups are vectorised binary searches, verified against the
full key on disk). Vectors are memory-mapped and read on demand.

Shards of the earlier layout (`<name>.keys.npy` + `<name>.vec.npy`, 1,024 rows each) are still read.
Matryoshka sizes and normalisation are derived on reading (`truncate_and_normalize`, as `Embedder.encode`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qembed.arrays import GrowingArray
from qembed.files import atomic_write_bytes
from qembed.models.prompts import QueryFormat

log = logging.getLogger(__name__)

KEY_BYTES = 20  # sha1 digest, stored as raw bytes (numpy bytes strings would drop trailing zero bytes)
SHARD_ROWS = 65_536  # rows per shard file before a new one is started
FSYNC_SECONDS = 5.0  # written data is also forced to the disk at most this often (a kill needs no fsync)
_ROW_BITS = 32  # a row's location: shard number << 32 | row


def default_cache_dir() -> Path:
    """`$QEMBED_CACHE` if set, else `~/.cache/qembed/embeddings`."""
    return Path(os.environ.get("QEMBED_CACHE") or Path.home() / ".cache" / "qembed" / "embeddings").expanduser()


def text_key(text: str) -> bytes:
    """The cache key of a text: its sha1 (lone surrogates hashed as they are)."""
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()


def key_array(keys: Sequence[bytes] | np.ndarray) -> np.ndarray:
    """Text keys as a `(n, 20)` uint8 array (from a list of `text_key` digests, or such an array)."""
    if isinstance(keys, np.ndarray):
        return np.ascontiguousarray(keys, dtype=np.uint8).reshape(-1, KEY_BYTES)
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES)


@dataclass
class CacheStats:
    """How many texts came from the cache and how many were encoded."""

    hits: int = 0
    encoded: int = 0


def cache_key(embedder, query_format: QueryFormat) -> dict:
    """What identifies a cached vector besides its text: the model's weights, dtype and device type
    (`embedder.cache_identity`) and the exact prefix the (resolved) query format puts before the text."""
    return {**embedder.cache_identity, "prefix": query_format.prefix}


def _prefixes(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys[:, :8]).view("<u8").reshape(-1)


class _Shard:
    """One shard: its keys and vectors (memory-mapped, or in memory for a cache that does not persist)."""

    def __init__(self, dim: int, rows: int = 0, keys_path: Path | None = None, vec_path: Path | None = None,
                 *, old: bool = False) -> None:  # fmt: skip
        self.dim, self.rows, self.keys_path, self.vec_path, self.old = dim, rows, keys_path, vec_path, old
        self._keys: np.ndarray | None = None  # mapped or held keys, covering `_mapped` rows
        self._vectors: np.ndarray | None = None
        self._mapped = 0
        self.number = -1  # its place in the cache's shard list
        self.files = None  # (keys file, vectors file) while this process appends to the shard

    def _map(self) -> None:
        if self._mapped == self.rows:
            return
        if self.old:
            self._keys = np.load(self.keys_path, mmap_mode="r")
            self._vectors = np.load(self.vec_path, mmap_mode="r")
        else:
            self._keys = np.memmap(self.keys_path, np.uint8, "r", shape=(self.rows, KEY_BYTES))  # vectors: pread
        self._mapped = self.rows

    def keys(self, rows: np.ndarray) -> np.ndarray:
        self._map()
        return np.asarray(self._keys[rows])

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        if self.old or self.vec_path is None:  # a numpy file of an older cache, or rows in memory
            self._map()
            return np.asarray(self._vectors[rows], dtype=np.float32)
        return _read_rows(self.vec_path, np.asarray(rows, dtype=np.int64), self.dim)


def _read_rows(path: Path, rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows of a raw float32 vectors file, read with `pread` (runs of consecutive rows at once) rather than
    mapped: the pages a long run reads back then stay in the page cache, not in the process's memory."""
    out = np.empty((len(rows), dim), dtype=np.float32)
    if not len(rows):
        return out
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    row_bytes = 4 * dim
    got = np.empty_like(out)
    with path.open("rb") as f:
        for start, end in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)]):
            data = os.pread(f.fileno(), (end - start) * row_bytes, int(ordered[start]) * row_bytes)
            got[start:end] = np.frombuffer(data, dtype=np.float32).reshape(end - start, dim)
    out[order] = got
    return out


class _MemoryShard(_Shard):
    """The rows of a cache that does not persist, in growing arrays."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._key_rows = GrowingArray((KEY_BYTES,), np.uint8)
        self._vector_rows = GrowingArray((dim,), np.float32)

    def append(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self._key_rows.extend(keys)
        self._vector_rows.extend(vectors)
        self._keys, self._vectors = self._key_rows.data, self._vector_rows.data
        self.rows = self._key_rows.size

    def _map(self) -> None:
        pass


class EmbeddingCache:
    """Full-size vectors of one `cache_key`, looked up by text key (`text_key`); `persist=False` keeps them in
    memory only. `add(keys, vectors)` stores rows, `get(keys)` reads them back in order, `key in cache` and
    `find(keys)` look them up. Thread-safe."""

    def __init__(self, root: str | Path | None, key: dict, *, persist: bool = True) -> None:
        self.persist = persist
        self.path: Path | None = None
        self._shards: list[_Shard] = []
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # sorted (key prefix, location) runs
        self._count = 0
        self._lock = threading.RLock()
        self._writer: _Shard | None = None
        self._synced = time.monotonic()
        if not persist:
            return
        meta = json.dumps(key, sort_keys=True, ensure_ascii=False)
        self.path = Path(root or default_cache_dir()) / hashlib.sha1(meta.encode()).hexdigest()[:24]
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "meta.json").exists():
            atomic_write_bytes(self.path / "meta.json", json.dumps(key, indent=1, ensure_ascii=False).encode())
        for keys_path in sorted(self.path.glob("*.keys.npy")):
            self._open_old_shard(keys_path)
        for keys_path in sorted(self.path.glob("*.keys")):
            self._open_shard(keys_path)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: bytes) -> bool:
        return bool(self.find([key])[0] >= 0)

    def find(self, keys: Sequence[bytes] | np.ndarray) -> np.ndarray:
        """The location of each key's row (int64), -1 where it is not cached."""
        keys = key_array(keys)
        found = np.full(len(keys), -1, dtype=np.int64)
        if not len(keys):
            return found
        prefixes = _prefixes(keys)
        with self._lock:
            for sorted_prefixes, locations in self._runs:
                todo = np.flatnonzero(found < 0)
                if not len(todo):
                    break
                at = np.searchsorted(sorted_prefixes, prefixes[todo])
                inside = at < len(sorted_prefixes)
                todo, at = todo[inside], at[inside]
                same = sorted_prefixes[at] == prefixes[todo]
                todo, at = todo[same], at[same]
                if not len(todo):
                    continue
                exact = (self._keys_at(locations[at]) == keys[todo]).all(axis=1)
                found[todo[exact]] = locations[at[exact]]
                for i, position in zip(todo[~exact], at[~exact]):  # another key with the same 8-byte prefix
                    position += 1
                    while position < len(sorted_prefixes) and sorted_prefixes[position] == prefixes[i]:
                        if (self._keys_at(locations[position : position + 1])[0] == keys[i]).all():
                            found[i] = locations[position]
                            break
                        position += 1
        return found

    def get(self, keys: Sequence[bytes] | np.ndarray) -> np.ndarray:
        """Stored (full-size, unnormalised) vectors for keys that are all in the cache, in order."""
        locations = self.find(keys)
        if (locations < 0).any():
            raise KeyError(f"{int((locations < 0).sum())} key(s) not in the embedding cache")
        return self.rows(locations)

    def all_keys(self) -> np.ndarray:
        """Every cached text key, sorted, as an `S20` array (20 bytes per row), e.g. to tell workers elsewhere
        which texts to skip."""
        with self._lock:
            parts = [shard.keys(np.arange(shard.rows)) for shard in self._shards if shard.rows]
        if not parts:
            return np.empty(0, dtype=f"S{KEY_BYTES}")
        return np.sort(np.ascontiguousarray(np.concatenate(parts)).view(f"S{KEY_BYTES}").reshape(-1))

    def rows(self, locations: np.ndarray) -> np.ndarray:
        """The vectors at `locations` (from `find`), in order."""
        locations = np.asarray(locations, dtype=np.int64)
        if not len(locations):
            dim = self._shards[0].dim if self._shards else 0
            return np.empty((0, dim), dtype=np.float32)
        numbers = locations >> _ROW_BITS
        rows = locations & ((1 << _ROW_BITS) - 1)
        with self._lock:
            first = self._shards[int(numbers[0])]
            if (numbers == numbers[0]).all():
                return first.vectors(rows)
            out = np.empty((len(locations), first.dim), dtype=np.float32)
            for number in np.unique(numbers):
                picked = numbers == number
                out[picked] = self._shards[int(number)].vectors(rows[picked])
        return out

    def _keys_at(self, locations: np.ndarray) -> np.ndarray:
        numbers = locations >> _ROW_BITS
        rows = locations & ((1 << _ROW_BITS) - 1)
        out = np.empty((len(locations), KEY_BYTES), dtype=np.uint8)
        for number in np.unique(numbers):
            picked = numbers == number
            out[picked] = self._shards[int(number)].keys(rows[picked])
        return out

    # ------------------------------------------------------------------ writing
    def add(self, keys: Sequence[bytes] | np.ndarray, vectors: np.ndarray) -> None:
        """Store rows (full-size, unnormalised vectors of the texts with these keys); written through at once."""
        keys = key_array(keys)
        if not len(keys):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"add: {len(keys)} keys for vectors of shape {vectors.shape}")
        with self._lock:
            done = 0
            while done < len(keys):
                shard = self._writable(vectors.shape[1])
                take = min(len(keys) - done, SHARD_ROWS - shard.rows) if self.persist else len(keys) - done
                part_keys, part_vectors = keys[done : done + take], vectors[done : done + take]
                start = shard.rows
                if self.persist:
                    keys_file, vec_file = shard.files
                    vec_file.write(part_vectors.tobytes())
                    vec_file.flush()  # the vectors reach the OS before their keys: a key means a whole row
                    keys_file.write(part_keys.tobytes())
                    keys_file.flush()
                    shard.rows += take
                    if shard.rows >= SHARD_ROWS:
                        self._release_writer()
                    elif time.monotonic() - self._synced > FSYNC_SECONDS:
                        self.flush()
                else:
                    shard.append(part_keys, part_vectors)
                self._index(part_keys, shard.number, start)
                done += take

    def flush(self) -> None:
        """Force what was written to the disk (a killed process needs no flush; a power failure does)."""
        with self._lock:
            if self._writer is not None and self._writer.files is not None:
                for f in reversed(self._writer.files):  # vectors first
                    os.fsync(f.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        """Flush and stop appending (the cache can still be read; a later `add` starts or takes a shard)."""
        with self._lock:
            self._release_writer()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _release_writer(self) -> None:
        if self._writer is None:
            return
        if self._writer.files is not None:
            self.flush()
            for f in self._writer.files:
                f.close()  # also releases the lock
            self._writer.files = None
        self._writer = None

    def _writable(self, dim: int) -> _Shard:
        """The shard this process appends to: its own, or an unfinished one it can lock, or a new one."""
        if self._writer is not None and self._writer.dim == dim:
            return self._writer
        self._release_writer()
        if not self.persist:
            self._writer = _MemoryShard(dim)
            self._writer.number = len(self._shards)
            self._shards.append(self._writer)
            return self._writer
        import fcntl

        for number, shard in enumerate(self._shards):
            if shard.old or shard.dim != dim or shard.rows >= SHARD_ROWS:
                continue
            keys_file = shard.keys_path.open("r+b")
            try:
                fcntl.flock(keys_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                keys_file.close()
                continue
            rows = self._complete_rows(shard.keys_path, shard.vec_path, dim)
            if rows >= SHARD_ROWS:
                keys_file.close()
                continue
            if rows > shard.rows:  # rows another run appended since this cache was opened
                extra = np.fromfile(shard.keys_path, np.uint8, count=rows * KEY_BYTES)
                self._index(extra.reshape(-1, KEY_BYTES)[shard.rows :], number, shard.rows)
                shard.rows = rows
            keys_file.truncate(rows * KEY_BYTES)  # cut a tail a killed writer left
            with shard.vec_path.open("r+b") as vec_file:
                vec_file.truncate(rows * dim * 4)
            keys_file.seek(0, os.SEEK_END)
            shard.files = (keys_file, shard.vec_path.open("ab"))
            self._writer = shard
            return shard
        name = f"{time.time_ns():020d}-{os.getpid()}"
        shard = _Shard(dim, 0, self.path / f"{name}.keys", self.path / f"{name}.d{dim}.vec")
        vec_file = shard.vec_path.open("ab")
        keys_file = shard.keys_path.open("ab")
        fcntl.flock(keys_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shard.files = (keys_file, vec_file)
        shard.number = len(self._shards)
        self._shards.append(shard)
        self._writer = shard
        return shard

    # ------------------------------------------------------------------ the index
    def _index(self, keys: np.ndarray, number: int, start: int) -> None:
        """Add rows `start, start+1, ...` of shard `number` with these keys to the sorted runs."""
        if not len(keys):
            return
        prefixes = _prefixes(keys)
        locations = (np.int64(number) << _ROW_BITS) + np.arange(start, start + len(keys), dtype=np.int64)
        order = np.argsort(prefixes, kind="stable")
        self._runs.append((prefixes[order], locations[order]))
        self._count += len(keys)
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (p1, l1), (p2, l2) = self._runs.pop(), self._runs.pop()
            merged = np.concatenate([p2, p1])
            order = np.argsort(merged, kind="stable")
            self._runs.append((merged[order], np.concatenate([l2, l1])[order]))

    @staticmethod
    def _complete_rows(keys_path: Path, vec_path: Path, dim: int) -> int:
        return min(keys_path.stat().st_size // KEY_BYTES, vec_path.stat().st_size // (4 * dim))

    def _open_shard(self, keys_path: Path) -> None:
        name = keys_path.name.removesuffix(".keys")
        vec_paths = list(keys_path.parent.glob(f"{name}.d*.vec"))
        try:
            dim = int(vec_paths[0].name.removeprefix(f"{name}.d").removesuffix(".vec")) if len(vec_paths) == 1 else 0
            rows = self._complete_rows(keys_path, vec_paths[0], dim) if dim > 0 else -1
        except (OSError, ValueError):
            rows = -1
        if rows < 0:
            log.warning("embedding cache: ignoring shard %s without its vectors", keys_path.name)
            return
        number = len(self._shards)
        self._shards.append(_Shard(dim, rows, keys_path, vec_paths[0]))
        self._shards[-1].number = number
        if rows:
            keys = np.fromfile(keys_path, np.uint8, count=rows * KEY_BYTES).reshape(-1, KEY_BYTES)
            self._index(keys, number, 0)

    def _open_old_shard(self, keys_path: Path) -> None:
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
        self._shards.append(_Shard(vectors.shape[1], len(keys), keys_path, vec_path, old=True))
        self._shards[-1].number = number
        self._index(keys, number, 0)
