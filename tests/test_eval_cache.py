"""Embedding cache: second run encodes nothing, a changed text re-encodes only it, killed runs, streaming."""

from __future__ import annotations

import hashlib

import numpy as np

from qembed.eval.cache import (
    CachedEncoder,
    EmbeddingCache,
    cache_key,
    default_cache_dir,
    encode_with_cache,
    iter_encode_with_cache,
)
from qembed.models.embedder import truncate_and_normalize
from qembed.models.prompts import DEFAULT_QUERY_INSTRUCTION, MODEL_DEFAULT, QueryFormat


class CountingEmbedder:
    """Deterministic fake with the Embedder's cache-facing interface: a vector derived from the hash of the
    formatted text, recording every text it encodes and every call."""

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

    def encode(self, texts, *, instruction=None, dim=None, normalize=True, batch_tokens=None, show_progress=None,
               prompt=""):  # fmt: skip
        prefix = self.resolve_query_format(instruction, prompt).prefix
        self.encoded += texts
        self.calls.append({"prefix": prefix, "dim": dim, "normalize": normalize, "n": len(texts)})
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.md5(f"{prefix}{text}".encode()).digest()[:4], "little")
            rows.append(np.random.default_rng(seed).standard_normal(self.hidden))
        return truncate_and_normalize(np.asarray(rows, dtype=np.float32), dim, normalize)


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
    assert all(call["dim"] is None and call["normalize"] is False for call in emb.calls)


def test_whole_chunks_go_to_the_encoder(tmp_path):
    emb = CountingEmbedder()
    encode_with_cache(emb, [f"t{i}" for i in range(700)], cache_dir=tmp_path)
    assert [call["n"] for call in emb.calls] == [700]  # one call: token-budget batches can fill


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

    stream = iter_encode_with_cache(emb, generate(), cache_dir=tmp_path, chunk_size=10)
    start, first = next(stream)
    assert start == 0 and first.shape == (10, 8) and len(consumed) == 10  # only one chunk read so far
    rest = list(stream)
    assert [s for s, _ in rest] == [10, 20] and [len(v) for _, v in rest] == [10, 5]
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
    assert list((tmp_path / "env").glob("*/*.keys.npy"))


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
