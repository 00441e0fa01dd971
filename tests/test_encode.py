"""The encode pipeline (`qembed.encode`): the same vectors as `Embedder.encode` (tiny Qwen3, the real
MiniLM, int8), tokenisation in a background thread, errors of the reader raised in order, the cache written
batch by batch."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qembed.cache import EmbeddingCache, cache_key
from qembed.encode import CachedEncoder, NoCache, encode_texts, encode_with_cache
from qembed.errors import QembedError
from qembed.models.prompts import MODEL_DEFAULT

TEXTS = ["how do I control rice blast?", "Rice blast is controlled with resistant varieties and balanced nitrogen.",
         "稻瘟病的防治方法有哪些？", "", "x", "Fungicides such as tricyclazole protect rice against blast. " * 12,
         "how do I control rice blast?"] * 5  # fmt: skip


@pytest.mark.parametrize("which", ["tiny", "minilm", "tiny-int8"])
def test_same_vectors_as_embedder_encode(which, tiny_embedder_path, minilm_path, tmp_path, one_torch_thread):
    from qembed import Embedder

    path = minilm_path if which == "minilm" else tiny_embedder_path
    emb = Embedder.from_pretrained(path, quantize="int8" if which.endswith("int8") else None)
    for options in [{}, {"instruction": MODEL_DEFAULT}, {"instruction": "find the answer", "dim": 32},
                    {"prompt": emb.document_prompt, "normalize": False}]:  # fmt: skip
        want = emb.encode(TEXTS, **{"normalize": True, **options})
        atol = 1e-6 * max(1.0, float(np.abs(want).max()))  # 1e-6 of the scale (unnormalised rows reach ~5)
        for chunk_size in (3, 1024):  # several chunks through the read-ahead thread, and one
            got = encode_with_cache(emb, TEXTS, cache_dir=tmp_path / "c", chunk_size=chunk_size, **options)
            np.testing.assert_allclose(got, want, atol=atol, err_msg=str((which, options, chunk_size)))
        np.testing.assert_allclose(encode_texts(emb, TEXTS, **options), want, atol=atol)
    unnormalised = emb.encode(TEXTS, normalize=False)
    np.testing.assert_array_equal(emb.encode_token_ids(emb.prepare(TEXTS)), unnormalised)


def test_tokenisation_runs_in_a_background_thread_and_batches_are_cached(tiny_embedder_path, tmp_path):
    from qembed import Embedder

    emb = Embedder.from_pretrained(tiny_embedder_path)
    threads, batches = set(), []
    prepare, encode_batch = emb.prepare, emb.encode_batch
    emb.prepare = lambda *a, **k: threads.add(threading.current_thread().name) or prepare(*a, **k)
    encoder = CachedEncoder(emb, cache_dir=tmp_path, batch_tokens=256)
    cache = encoder.cache

    def counting_batch(ids, **options):
        batches.append(len(cache))  # rows cached before each batch: the earlier batches are in already
        return encode_batch(ids, **options)

    emb.encode_batch = counting_batch
    texts = TEXTS + [f"unique text number {i}" for i in range(40)]
    list(encoder.iter_chunks(texts, chunk_size=10))
    assert threads == {"qembed-tokenize"}
    assert len(batches) > 2 and batches == sorted(batches) and batches[-1] > batches[0]
    fmt = emb.resolve_query_format(None)
    # on disk, each text once: a text repeated in a later chunk is found although that chunk was looked up ahead
    assert len(EmbeddingCache(tmp_path, cache_key(emb, fmt))) == len(set(texts)) == encoder.stats.encoded


def test_a_reader_error_reaches_the_consumer_in_order(tiny_embedder_path, tmp_path):
    from qembed import Embedder

    emb = Embedder.from_pretrained(tiny_embedder_path)

    def reader():
        yield from ["one", "two", "three"]
        raise QembedError("corpus.jsonl:4: broken")

    got = []
    with pytest.raises(QembedError, match="corpus.jsonl:4"):
        for start, _ in CachedEncoder(emb, cache=NoCache()).iter_chunks(reader(), chunk_size=1):
            got.append(start)
    assert got == [0, 1, 2]  # every chunk before the bad line came out first
