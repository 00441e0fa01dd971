import numpy as np
import pytest

import qembed.index.milvus_index as milvus_index
from qembed.errors import QembedError
from qembed.index import FaissIndex, load_index, open_index, parse_spec


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    docs = unit(rng, 1500, 32)
    queries = unit(rng, 120, 32)
    ids = [f"doc-{i}" for i in range(len(docs))]
    scores = queries @ docs.T
    order = np.argsort(-scores, axis=1, kind="stable")
    return docs, queries, ids, scores, order


@pytest.fixture(scope="module")
def milvus_db(tmp_path_factory):
    """One Milvus Lite database for the whole module (its startup costs seconds)."""
    path = tmp_path_factory.mktemp("milvus") / "test.db"
    yield str(path)


def add_streaming(index, ids, vectors, batch=97):
    for start in range(0, len(ids), batch):
        index.add(ids[start : start + batch], vectors[start : start + batch])


def test_flat_is_exact_and_streams(data):
    docs, queries, ids, scores, order = data
    index = open_index("faiss", 32, capacity=len(docs))
    add_streaming(index, ids, docs)
    assert len(index) == len(docs)
    got_ids, got_scores = index.search(queries, 10, batch_size=7)  # many query chunks
    assert got_scores.dtype == np.float32 and got_scores.shape == (len(queries), 10)
    for q in range(len(queries)):
        assert got_ids[q] == [ids[j] for j in order[q, :10]]
        np.testing.assert_allclose(got_scores[q], scores[q, order[q, :10]], rtol=1e-5, atol=1e-5)
    rows, row_scores = index.search_rows(queries, 10)
    np.testing.assert_array_equal(rows, order[:, :10])
    np.testing.assert_array_equal(row_scores, got_scores)


def test_k_larger_than_index_and_bad_shapes():
    index = FaissIndex(4)
    index.add(["a", "b"], np.eye(4, dtype=np.float32)[:2])
    ids, scores = index.search(np.array([1, 0.5, 0, 0], dtype=np.float32), 5)
    assert ids == [["a", "b"]] and scores.shape == (1, 2)
    with pytest.raises(QembedError):
        index.add(["c"], np.ones((1, 3), dtype=np.float32))
    with pytest.raises(QembedError):
        index.add(["c", "d"], np.ones((1, 4), dtype=np.float32))
    with pytest.raises(QembedError):
        open_index("faiss", 0)
    empty_ids, empty_scores = FaissIndex(4).search(np.ones((3, 4), dtype=np.float32), 5)
    assert empty_ids == [[], [], []] and empty_scores.shape == (3, 0)


def test_hnsw_recall_and_options(data):
    docs, queries, ids, _, order = data
    index = open_index("hnsw:m=16,ef_search=64,ef_construction=100", 32)
    assert index._index.hnsw.efConstruction == 100 and index.ef_search == 64
    add_streaming(index, ids, docs)
    rows, _ = index.search_rows(queries, 10)
    recall = np.mean([len(set(rows[q]) & set(order[q, :10])) / 10 for q in range(len(queries))])
    assert recall > 0.9
    rows, _ = index.search_rows(queries, 200)  # efSearch is raised to k, so every slot is filled
    assert (rows >= 0).all()


@pytest.mark.parametrize("spec", ["faiss", "hnsw"])
def test_faiss_save_load(tmp_path, data, spec):
    docs, queries, ids, _, _ = data
    index = open_index(spec, 32)
    index.add(ids, docs)
    before = index.search(queries, 5)
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert len(loaded) == len(docs)
    after = loaded.search(queries, 5)
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])


def test_parse_spec_and_errors(tmp_path):
    assert parse_spec("faiss") == ("faiss", {})
    assert parse_spec("hnsw") == ("hnsw", {})
    assert parse_spec("hnsw:M=8,efSearch=32") == ("hnsw", {"m": 8, "ef_search": 32})
    assert parse_spec("milvus:./x.db") == ("milvus", "./x.db")
    assert parse_spec("milvus:http://host:19530") == ("milvus", "http://host:19530")
    for bad in ["annoy", "milvus:", "hnsw:m=x", "hnsw:depth=3"]:
        with pytest.raises(QembedError):
            parse_spec(bad)
    with pytest.raises(QembedError):
        load_index(tmp_path)
    with pytest.raises(QembedError):
        open_index(f"milvus:{tmp_path / 'x.sqlite'}", 8)


def test_milvus_matches_faiss(milvus_db, data, monkeypatch):
    docs, queries, ids, scores, _ = data
    monkeypatch.setattr(milvus_index, "INSERT_BYTES", 64 * 1024)  # force many inserts per add()
    index = open_index(f"milvus:{milvus_db}", 32, collection="match")
    add_streaming(index, ids, docs, batch=700)
    assert len(index) == len(docs)
    flat = open_index("faiss", 32)
    flat.add(ids, docs)
    m_ids, m_scores = index.search(queries, 20, batch_size=50)
    f_ids, f_scores = flat.search(queries, 20)
    np.testing.assert_allclose(m_scores, f_scores, atol=1e-5)
    for q in range(len(queries)):
        if m_ids[q] != f_ids[q]:  # only a near-tie may swap
            for a, b in zip(m_ids[q], f_ids[q]):
                if a != b:
                    assert abs(scores[q, ids.index(a)] - scores[q, ids.index(b)]) < 1e-5
    rows, _ = index.search_rows(queries[:3], 5)
    assert [[ids[r] for r in row] for row in rows.tolist()] == [m[:5] for m in m_ids[:3]]


def test_milvus_reopen_append_and_overwrite(milvus_db, tmp_path):
    rng = np.random.default_rng(1)
    vecs = unit(rng, 30, 8)
    index = open_index(f"milvus:{milvus_db}", 8, collection="reopen")
    index.add([f"a{i}" for i in range(20)], vecs[:20])
    index.save(tmp_path / "meta")
    again = load_index(tmp_path / "meta")
    assert len(again) == 20
    again.add([f"a{i}" for i in range(20, 30)], vecs[20:])  # rows continue after the existing ones
    rows, _ = again.search_rows(vecs[25:26], 1)
    assert rows[0, 0] == 25
    assert again.search(vecs[25:26], 1)[0] == [["a25"]]
    with pytest.raises(QembedError):
        open_index(f"milvus:{milvus_db}", 16, collection="reopen", overwrite=False)  # dim mismatch
    fresh = open_index(f"milvus:{milvus_db}", 8, collection="reopen")  # overwrite drops the old rows
    assert len(fresh) == 0
    with pytest.raises(QembedError):
        fresh.add(["x" * 70_000], vecs[:1])
