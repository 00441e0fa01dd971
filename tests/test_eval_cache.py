"""Embedding cache: second run encodes nothing, a changed text re-encodes only it, killed runs, streaming."""

from __future__ import annotations

import hashlib

import numpy as np

from qembed.eval.cache import EmbeddingCache, default_cache_dir, encode_with_cache, iter_encode_with_cache


class CountingEmbedder:
    """Deterministic fake: a vector derived from the text's hash, recording every text it encodes."""

    def __init__(self, fingerprint="fake-1", dim=8):
        self.fingerprint = fingerprint
        self.hidden = dim
        self.encoded: list[str] = []
        self.calls: list[dict] = []

    def encode(self, texts, *, instruction=None, dim=None, normalize=True, show_progress=None, prompt=""):
        self.encoded += texts
        self.calls.append({"instruction": instruction, "dim": dim, "prompt": prompt})
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.md5(f"{instruction}|{prompt}|{text}".encode()).digest()[:4], "little")
            rows.append(np.random.default_rng(seed).standard_normal(dim or self.hidden))
        return np.asarray(rows, dtype=np.float32)


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


def test_key_includes_model_instruction_dim_and_prompt(tmp_path):
    texts = ["a", "b"]
    emb = CountingEmbedder()
    encode_with_cache(emb, texts, cache_dir=tmp_path)
    for kwargs in [{"instruction": "find it"}, {"dim": 4}, {"prompt": "passage: "}, {"normalize": False}]:
        emb.encoded.clear()
        encode_with_cache(emb, texts, cache_dir=tmp_path, **kwargs)
        assert emb.encoded == texts, kwargs
    other = CountingEmbedder(fingerprint="fake-2")
    encode_with_cache(other, texts, cache_dir=tmp_path)
    assert other.encoded == texts
    assert emb.calls[-1] == {"instruction": None, "dim": None, "prompt": ""}
    assert {"instruction": None, "dim": None, "prompt": "passage: "} in emb.calls


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
    cache = EmbeddingCache(tmp_path, fingerprint="fake-1", instruction=None, dim=None, normalize=True)
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
