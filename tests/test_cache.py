"""Embedding cache: second run encodes nothing, a changed text re-encodes only it, killed runs, streaming."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from qembed.cache import EmbeddingCache, cache_key, default_cache_dir, text_key
from qembed.encode import CachedEncoder, encode_with_cache, iter_encode_with_cache
from qembed.models.embedder import truncate_and_normalize
from qembed.models.prompts import DEFAULT_QUERY_INSTRUCTION, MODEL_DEFAULT, QueryFormat


class CountingEmbedder:
    """Deterministic fake with the Embedder's pipeline-facing interface (`prepare`, `token_batches`,
    `encode_batch`): a vector derived from the hash of the formatted text, recording every text it encodes
    and every call."""

    def __init__(self, fingerprint="fake-1", dim=8, dtype="float32", device="cpu"):
        self.cache_identity = {"fingerprint": fingerprint, "dtype": dtype, "device": device}
        self.hidden = dim
        self.encoded: list[str] = []
        self.calls: list[dict] = []

    def resolve_query_format(self, instruction, prompt=""):
        fmt = QueryFormat.of(instruction, prompt)
        return QueryFormat("prompt", "query: ") if fmt == MODEL_DEFAULT else fmt

    def _check_dim(self, dim):
        assert 1 <= dim <= self.hidden
        return dim

    def prepare(self, texts, *, instruction=None, prompt=""):
        prefix = self.resolve_query_format(instruction, prompt).prefix
        self.encoded += texts
        self.calls.append({"prefix": prefix, "n": len(texts)})
        return [list((prefix + text).encode()) for text in texts]

    def token_batches(self, token_ids, batch_tokens=None):
        return [list(range(i, min(i + 64, len(token_ids)))) for i in range(0, len(token_ids), 64)]

    def encode_batch(self, token_ids, *, steady_shape=False, batch_tokens=None):
        return np.asarray([self._vector(bytes(ids).decode()) for ids in token_ids], dtype=np.float32)

    def _vector(self, formatted):
        seed = int.from_bytes(hashlib.md5(formatted.encode()).digest()[:4], "little")
        return np.random.default_rng(seed).standard_normal(self.hidden)

    def encode(self, texts, *, instruction=None, dim=None, normalize=True, prompt=""):
        prefix = self.resolve_query_format(instruction, prompt).prefix
        rows = np.asarray([self._vector(prefix + t) for t in texts], dtype=np.float32)
        return truncate_and_normalize(rows, dim, normalize)


def test_second_run_encodes_nothing_and_changed_text_only_it(tmp_path):
    texts = [f"document {i}" for i in range(50)]
    emb = CountingEmbedder()
    first = encode_with_cache(emb, texts, cache_dir=tmp_path, chunk_size=16)
    assert first.shape == (50, 8) and sorted(emb.encoded) == sorted(texts)

    emb.encoded.clear()
    second = encode_with_cache(emb, texts, cache_dir=tmp_path, chunk_size=16)
    assert emb.encoded == []
    np.testing.assert_array_equal(first, second)

    changed = list(texts)
    changed[7] = "document 7, revised"
    third = encode_with_cache(emb, changed, cache_dir=tmp_path)
    assert emb.encoded == ["document 7, revised"]
    assert not np.allclose(third[7], first[7])
    np.testing.assert_array_equal(np.delete(third, 7, 0), np.delete(first, 7, 0))
    np.testing.assert_array_equal(third, CountingEmbedder().encode(changed))  # same as encoding fresh


def test_key_is_model_dtype_device_and_query_format(tmp_path):
    texts = ["a", "b"]
    emb = CountingEmbedder()
    encode_with_cache(emb, texts, cache_dir=tmp_path)
    for kwargs in [{"instruction": "find it"}, {"prompt": "passage: "}, {"instruction": MODEL_DEFAULT}]:
        emb.encoded.clear()
        encode_with_cache(emb, texts, cache_dir=tmp_path, **kwargs)
        assert emb.encoded == texts, kwargs
    # bf16 vectors are never reused by an fp32 run, nor GPU vectors by a CPU run, nor another model's.
    for other in [CountingEmbedder(dtype="bfloat16"), CountingEmbedder(device="cuda"), CountingEmbedder("fake-2")]:
        encode_with_cache(other, texts, cache_dir=tmp_path)
        assert other.encoded == texts, other.cache_identity
    # One format value: an instruction and the raw prompt it expands to are the same inputs, hence one entry;
    # MODEL_DEFAULT is resolved (here to the prompt "query: ") before it keys anything.
    emb.encoded.clear()
    encode_with_cache(emb, texts, cache_dir=tmp_path, instruction=QueryFormat("prompt", "Instruct: find it\nQuery:"))
    encode_with_cache(emb, texts, cache_dir=tmp_path, instruction=QueryFormat("prompt", "query: "))
    assert emb.encoded == []
    assert cache_key(emb, QueryFormat("instruction", "x")) == {**emb.cache_identity, "prefix": "Instruct: x\nQuery:"}


def test_only_full_vectors_are_cached_and_dims_are_derived(tmp_path):
    texts = [f"text {i}" for i in range(20)]
    emb = CountingEmbedder()
    full = encode_with_cache(emb, texts, cache_dir=tmp_path, normalize=False)
    emb.encoded.clear()
    for dim, normalize in [(4, True), (6, False), (None, True)]:
        got = encode_with_cache(emb, texts, cache_dir=tmp_path, dim=dim, normalize=normalize)
        np.testing.assert_array_equal(got, CountingEmbedder().encode(texts, dim=dim, normalize=normalize))
        np.testing.assert_array_equal(got, truncate_and_normalize(full, dim, normalize))
    assert emb.encoded == []


def test_whole_chunks_go_to_the_encoder(tmp_path):
    emb = CountingEmbedder()
    encode_with_cache(emb, [f"t{i}" for i in range(700)], cache_dir=tmp_path)
    assert [call["n"] for call in emb.calls] == [700]  # one chunk: token-budget batches can fill


def test_real_embedder_dims_formats_and_dtypes(tiny_embedder_path, tmp_path, one_torch_thread):
    """The tiny Qwen3 model: cached vectors equal `encode`'s exactly for every dim; MODEL_DEFAULT is the
    model's instruction; a bf16 model on the same cache folder encodes everything afresh."""
    import torch

    from qembed import Embedder

    emb = Embedder.from_pretrained(tiny_embedder_path, dtype=torch.float32)
    texts = ["rice blast", "maize rust in wet weather", "水稻稻瘟病", ""]
    queries = CachedEncoder(emb, query_format=MODEL_DEFAULT, cache_dir=tmp_path)
    np.testing.assert_array_equal(queries(texts), emb.encode_queries(texts))
    for dim in (32, 48):
        derived = CachedEncoder(emb, query_format=DEFAULT_QUERY_INSTRUCTION, dim=dim, cache_dir=tmp_path)
        np.testing.assert_array_equal(derived(texts), emb.encode_queries(texts, dim=dim))
        assert derived.stats.encoded == 0 and derived.stats.hits == len(texts)
    half = Embedder.from_pretrained(tiny_embedder_path, dtype=torch.bfloat16)
    assert half.cache_identity != emb.cache_identity and half.cache_identity["dtype"] == "bfloat16"
    again = CachedEncoder(half, query_format=MODEL_DEFAULT, cache_dir=tmp_path)
    again(texts)
    assert again.stats.encoded == len(texts)


def test_duplicates_in_a_batch_are_encoded_once(tmp_path):
    emb = CountingEmbedder()
    vectors = encode_with_cache(emb, ["x", "y", "x", "x"], cache_dir=tmp_path)
    assert sorted(emb.encoded) == ["x", "y"]
    np.testing.assert_array_equal(vectors[0], vectors[2])


def test_streaming_reads_lazily_and_yields_in_order(tmp_path):
    emb = CountingEmbedder()
    consumed = []

    def generate():
        for i in range(25):
            consumed.append(i)
            yield f"t{i}"

    stream = iter_encode_with_cache(emb, generate(), cache_dir=tmp_path, chunk_size=5)
    start, first = next(stream)
    time.sleep(0.2)  # let the read-ahead thread go as far as it may
    assert start == 0 and first.shape == (5, 8) and len(consumed) <= 5 * 4  # a bounded read-ahead, not all 25
    rest = list(stream)
    assert [s for s, _ in rest] == [5, 10, 15, 20] and [len(v) for _, v in rest] == [5] * 4
    full = np.concatenate([first] + [v for _, v in rest])
    np.testing.assert_array_equal(full, CountingEmbedder().encode([f"t{i}" for i in range(25)]))


def test_killed_run_partial_shard_is_ignored(tmp_path):
    emb = CountingEmbedder()
    encode_with_cache(emb, ["a", "b"], cache_dir=tmp_path)
    cache = EmbeddingCache(tmp_path, cache_key(emb, QueryFormat("none")))
    # A run killed mid-shard: vectors written, keys never renamed in; plus a stray temporary file.
    (cache.path / "99999999999999999999-1.vec.npy").write_bytes(b"\x93NUMPY partial")
    (cache.path / ".99999999999999999999-1.keys.npy.1.tmp").write_bytes(b"junk")
    # And a shard whose keys and vectors disagree.
    np.save(cache.path / "99999999999999999998-1.vec.npy", np.zeros((1, 8), dtype=np.float32))
    np.save(cache.path / "99999999999999999998-1.keys.npy", np.zeros((2, 20), dtype=np.uint8))
    emb.encoded.clear()
    vectors = encode_with_cache(emb, ["a", "b", "c"], cache_dir=tmp_path)
    assert emb.encoded == ["c"]
    np.testing.assert_array_equal(vectors, CountingEmbedder().encode(["a", "b", "c"]))


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QEMBED_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("QEMBED_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "qembed", "embeddings")
    emb = CountingEmbedder()
    monkeypatch.setenv("QEMBED_CACHE", str(tmp_path / "env"))
    encode_with_cache(emb, ["z"])
    assert list((tmp_path / "env").glob("*/*.keys"))


def test_empty_input(tmp_path):
    assert encode_with_cache(CountingEmbedder(), [], cache_dir=tmp_path).shape[0] == 0


def test_hash_with_trailing_zero_byte_round_trips(tmp_path):
    # numpy byte strings drop trailing NULs; the cache must keep the full 20-byte digest.
    text = next(f"t{i}" for i in range(100000) if hashlib.sha1(f"t{i}".encode()).digest().endswith(b"\0"))
    emb = CountingEmbedder()
    encode_with_cache(emb, [text], cache_dir=tmp_path)
    emb.encoded.clear()
    np.testing.assert_array_equal(encode_with_cache(emb, [text], cache_dir=tmp_path), CountingEmbedder().encode([text]))
    assert emb.encoded == []


def _old_layout_shard(folder, name, keys, vectors):
    """A shard as qembed wrote them before `qembed.cache` (one .keys.npy + .vec.npy pair per 1,024 rows)."""
    np.save(folder / f"{name}.vec.npy", vectors)
    np.save(folder / f"{name}.keys.npy", np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 20))


def test_old_layout_shards_are_read(tmp_path):
    emb = CountingEmbedder()
    key = cache_key(emb, QueryFormat("none"))
    folder = EmbeddingCache(tmp_path, key).path
    texts = ["old a", "old b", "old c"]
    full = CountingEmbedder().encode(texts, normalize=False)
    _old_layout_shard(folder, "00000000000000000001-1", [text_key(t) for t in texts], full)
    vectors = encode_with_cache(emb, [*texts, "new d"], cache_dir=tmp_path, normalize=False)
    assert emb.encoded == ["new d"]
    np.testing.assert_array_equal(vectors[:3], full)


def test_shards_roll_and_a_torn_tail_is_never_read(tmp_path, monkeypatch):
    """Append-only shards roll at SHARD_ROWS rows; a writer killed mid-row leaves a tail that is ignored
    by readers and cut by the next writer; a shard being written is locked, so a second cache opened on the
    same folder at the same time appends to a shard of its own."""
    import qembed.cache as cache_module

    monkeypatch.setattr(cache_module, "SHARD_ROWS", 100)
    emb = CountingEmbedder()
    texts = [f"row {i}" for i in range(250)]
    want = CountingEmbedder().encode(texts, normalize=False)
    cache = EmbeddingCache(tmp_path, cache_key(emb, QueryFormat("none")))
    cache.add([text_key(t) for t in texts], want)
    shards = sorted(cache.path.glob("*.keys"))
    assert [p.stat().st_size // 20 for p in shards] == [100, 100, 50]
    # A second writer while the first still holds its unfinished shard: a shard of its own.
    other = EmbeddingCache(tmp_path, cache_key(emb, QueryFormat("none")))
    other.add([text_key("other")], CountingEmbedder().encode(["other"], normalize=False))
    assert len(list(cache.path.glob("*.keys"))) == 4
    other.close()
    cache.close()
    # A kill mid-write: half a vector row and a third of a key at the end of the last shard.
    last = shards[-1]
    vec = next(cache.path.glob(last.name.removesuffix(".keys") + ".d*.vec"))
    with vec.open("ab") as f:
        f.write(b"\x01" * 16)
    with last.open("ab") as f:
        f.write(b"\x02" * 7)
    reread = EmbeddingCache(tmp_path, cache_key(emb, QueryFormat("none")))
    assert len(reread) == 251
    np.testing.assert_array_equal(reread.get([text_key(t) for t in texts]), want)
    # The next writer takes the unfinished shard, cuts the torn tail and appends whole rows.
    reread.add([text_key("more")], CountingEmbedder().encode(["more"], normalize=False))
    reread.close()
    assert last.stat().st_size == 51 * 20 and vec.stat().st_size == 51 * 8 * 4
    final = EmbeddingCache(tmp_path, cache_key(emb, QueryFormat("none")))
    np.testing.assert_array_equal(final.get([text_key("more")]), CountingEmbedder().encode(["more"], normalize=False))
    assert len(final) == 252


def test_keys_sharing_a_prefix_are_told_apart(tmp_path):
    """Lookups search on the first 8 key bytes and verify the whole key."""
    keys = [bytes(8) + bytes([i]) * 12 for i in range(5)]
    vectors = np.arange(40, dtype=np.float32).reshape(5, 8)
    cache = EmbeddingCache(tmp_path, {"fingerprint": "x"})
    for i in (3, 0, 4):
        cache.add([keys[i]], vectors[i : i + 1])
    cache = EmbeddingCache(tmp_path, {"fingerprint": "x"})
    cache.add([keys[1]], vectors[1:2])
    assert list(cache.find(keys) >= 0) == [True, True, False, True, True]
    np.testing.assert_array_equal(cache.get([keys[4], keys[0], keys[1], keys[3]]), vectors[[4, 0, 1, 3]])


def test_index_memory_is_bounded_per_row(tmp_path):
    """RAM besides the vectors: 16 bytes per cached row (key prefix + location), no Python object per row."""
    import tracemalloc

    n = 100_000
    keys = np.random.default_rng(0).integers(0, 256, size=(n, 20), dtype=np.uint8)
    cache = EmbeddingCache(tmp_path, {"fingerprint": "mem"})
    for start in range(0, n, 5000):
        cache.add(keys[start : start + 5000], np.zeros((5000, 4), dtype=np.float32))
    cache.close()
    tracemalloc.start()
    reopened = EmbeddingCache(tmp_path, {"fingerprint": "mem"})
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(reopened) == n and (reopened.find(keys[::997]) >= 0).all()
    assert held / n < 24, held / n
