import json
import tracemalloc

import numpy as np
import pytest

import qembed.index.milvus_index as milvus_index
from qembed.cli import main
from qembed.errors import QembedError
from qembed.index import (
    FaissIndex,
    IdList,
    Manifest,
    RecallProbe,
    SearchParams,
    load_index,
    measure_recall,
    open_index,
    open_search_index,
    parse_spec,
)


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
    for start in range(0, len(vectors), batch):
        index.add(None if ids is None else ids[start : start + batch], vectors[start : start + batch])


def test_flat_is_exact_and_streams(data):
    docs, queries, ids, scores, order = data
    index = open_index("faiss", 32, capacity=len(docs))
    assert index.exact
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


def test_flat_capacity_is_reserved_up_front(data):
    docs, _, ids, _, _ = data

    def address(index):  # where the vectors are stored: a regrowth copies them elsewhere
        return int(index._index.codes.data())

    for capacity in (len(docs), None):
        index = open_index("faiss", 32, capacity=capacity)
        index.add(ids[:1], docs[:1])
        first = address(index)
        add_streaming(index, ids[1:], docs[1:])
        assert (address(index) == first) == (capacity is not None)


def test_k_larger_than_index_and_bad_shapes():
    index = FaissIndex(4)
    index.add(["a", "b"], np.eye(4, dtype=np.float32)[:2])
    ids, scores = index.search(np.array([1, 0.5, 0, 0], dtype=np.float32), 5)
    assert ids == [["a", "b"]] and scores.shape == (1, 2)
    with pytest.raises(QembedError):
        index.add(["c"], np.ones((1, 3), dtype=np.float32))
    with pytest.raises(QembedError):
        index.add(["c", "d"], np.ones((1, 4), dtype=np.float32))
    with pytest.raises(QembedError, match="ids with every batch"):
        index.add(None, np.ones((1, 4), dtype=np.float32))
    with pytest.raises(QembedError):
        open_index("faiss", 0)
    empty_ids, empty_scores = FaissIndex(4).search(np.ones((3, 4), dtype=np.float32), 5)
    assert empty_ids == [[], [], []] and empty_scores.shape == (3, 0)


def test_rows_only_index_keeps_no_ids(tmp_path, data):
    docs, queries, _, _, order = data
    index = open_index("faiss", 32)
    add_streaming(index, None, docs)
    np.testing.assert_array_equal(index.search_rows(queries, 5)[0], order[:, :5])
    with pytest.raises(QembedError, match="keeps no ids"):
        index.search(queries, 5)
    index.save(tmp_path / "rows")
    assert not (tmp_path / "rows" / "ids.bin").exists()
    np.testing.assert_array_equal(load_index(tmp_path / "rows").search_rows(queries, 5)[0], order[:, :5])


def test_id_list_holds_no_python_object_per_id(tmp_path):
    n = 100_000
    FaissIndex(4)  # faiss imported before measuring
    tracemalloc.start()
    index = FaissIndex(4, capacity=n)  # FAISS' own storage is not traced: what is traced is the ids' cost
    for start in range(0, n, 10_000):
        index.add([f"doc-{i:07d}" for i in range(start, start + 10_000)], np.ones((10_000, 4), np.float32))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held / n < 40  # a list of str holds ~70 bytes per id (object + pointer)
    assert index.search(np.ones(4, np.float32), 1)[0][0][0].startswith("doc-")
    ids = index.ids
    assert (
        len(ids) == n
        and ids[0] == "doc-0000000"
        and ids[n - 1] == f"doc-{n - 1:07d}"
        and ids[-2] == ids[n - 2]
    )
    ids.extend(["ünïcode id", ""])
    assert (
        ids[n] == "ünïcode id"
        and ids[n + 1] == ""
        and ids[n - 1 : n + 1] == [f"doc-{n - 1:07d}", "ünïcode id"]
    )
    ids.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.bin", "ids.ends.npy"]
    for mmap in (False, True):
        again = IdList.load(tmp_path, mmap=mmap)
        assert len(again) == n + 2 and again[n] == "ünïcode id" and again[12345] == "doc-0012345"
    with pytest.raises(QembedError, match="read-only"):
        IdList.load(tmp_path, mmap=True).extend(["x"])


def test_hnsw_recall_and_options(data):
    docs, queries, ids, _, order = data
    index = open_index("hnsw:m=16,ef_search=64,ef_construction=100", 32)
    assert index._hnsw.hnsw.efConstruction == 100 and index.defaults.ef == 64 and not index.exact
    add_streaming(index, ids, docs)
    rows, _ = index.search_rows(queries, 10)
    recall = np.mean([len(set(rows[q]) & set(order[q, :10])) / 10 for q in range(len(queries))])
    assert recall > 0.9
    rows, _ = index.search_rows(queries, 200)  # efSearch is raised to k, so every slot is filled
    assert (rows >= 0).all()
    assert measure_recall(index, queries, order[:, :10], params=SearchParams(ef=400)) >= recall


def test_ivf_factory_trains_on_a_sample_and_takes_search_parameters(tmp_path, data):
    docs, queries, ids, _, order = data
    index = open_index("faiss:IVF16,Flat?nprobe=1&train_size=1000&seed=3", 32)
    assert not index.exact and index.defaults.nprobe == 1 and index._ivf.cp.seed == 3
    add_streaming(index, ids[:900], docs[:900])
    assert not index.is_trained and len(index) == 900  # held back until 1,000 vectors have come
    add_streaming(index, ids[900:], docs[900:])
    assert index.is_trained and index._index.ntotal == len(docs)
    exact = order[:, :10]
    one = measure_recall(index, queries, exact)
    every = measure_recall(index, queries, exact, params=SearchParams(nprobe=16))
    assert one < 0.9 and every == 1.0  # all 16 lists probed: exact
    got_ids, _ = index.search(queries[:3], 10, params=SearchParams(nprobe=16))
    assert got_ids == [[ids[r] for r in row] for row in exact[:3]]
    with pytest.raises(QembedError, match="ef applies to HNSW"):
        index.search_rows(queries, 10, params=SearchParams(ef=32))
    with pytest.raises(QembedError, match="positive integer"):
        SearchParams(nprobe=0)
    index.save(tmp_path / "ivf")
    for mmap in (False, True):
        loaded = load_index(tmp_path / "ivf", mmap=mmap)
        assert loaded.defaults.nprobe == 1
        assert loaded.search(queries, 10)[0] == index.search(queries, 10)[0]
    with pytest.raises(QembedError, match="memory-mapped"):
        loaded.add(ids[:1], docs[:1])


@pytest.mark.parametrize("spec", ["faiss:IVF8,PQ8?nprobe=8", "faiss:HNSW16,SQ8?ef=64&efConstruction=80"])
def test_compressed_factories_report_recall(data, spec):
    docs, queries, ids, _, order = data
    index = open_index(spec, 32)
    probe = RecallProbe(queries=50, seed=1)
    for start in range(0, len(docs), 500):
        index.add(ids[start : start + 500], docs[start : start + 500])
        probe.add(docs[start : start + 500])
    assert not index.exact and len(index) == len(docs)
    assert len(probe.queries) == 50 and (probe.top_rows != probe.query_rows[:, None]).all()  # self left out
    exact = np.argsort(-(probe.queries @ docs.T), axis=1, kind="stable")[:, 1:11]
    np.testing.assert_array_equal(probe.top_rows, exact)
    recall = probe.recall(index)
    assert 0.3 < recall <= 1.0
    exact_index = open_index("faiss", 32)
    exact_index.add(ids, docs)
    assert probe.recall(exact_index) == 1.0


def test_mmap_spec_and_older_folders(tmp_path, data):
    docs, queries, ids, _, order = data
    index = open_index("faiss?mmap=1", 32)
    index.add(ids, docs)
    index.save(tmp_path / "mapped")
    mapped = load_index(tmp_path / "mapped")
    assert mapped._read_only and mapped.search(queries, 3)[0] == index.search(queries, 3)[0]
    assert not load_index(tmp_path / "mapped", mmap=False)._read_only
    # a folder written before ids.bin: ids.json and the old meta keys
    import faiss

    old = tmp_path / "old"
    old.mkdir()
    flat = faiss.IndexFlatIP(32)
    flat.add(docs)
    faiss.write_index(flat, str(old / "index.faiss"))
    (old / "ids.json").write_text(json.dumps(ids))
    (old / "meta.json").write_text(
        json.dumps({"backend": "faiss", "kind": "flat", "dim": 32, "ef_search": 128})
    )
    assert load_index(old).search(queries[:2], 4)[0] == [[ids[r] for r in row] for row in order[:2, :4]]


@pytest.mark.parametrize("spec", ["faiss", "hnsw"])
def test_faiss_save_load(tmp_path, data, spec):
    docs, queries, ids, _, _ = data
    index = open_index(spec, 32)
    index.add(ids, docs)
    before = index.search(queries, 5)
    index.save(tmp_path / "idx")
    assert not (tmp_path / "idx" / "ids.json").exists()
    loaded = load_index(tmp_path / "idx")
    assert len(loaded) == len(docs)
    after = loaded.search(queries, 5)
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])


def test_parse_spec_and_errors(tmp_path):
    assert parse_spec("faiss") == ("faiss", {})
    assert parse_spec("hnsw") == ("hnsw", {})
    assert parse_spec("hnsw:M=8,efSearch=32") == ("hnsw", {"m": 8, "ef_search": 32})
    assert parse_spec("faiss:IVF4096,Flat?nprobe=64&train_size=200000&seed=0&mmap=1") == (
        "faiss", {"factory": "IVF4096,Flat", "nprobe": 64, "train_size": 200000, "seed": 0, "mmap": True})  # fmt: skip
    assert parse_spec("faiss:IVF16384,PQ64") == ("faiss", {"factory": "IVF16384,PQ64"})
    assert parse_spec("faiss:HNSW32,SQ8?ef=64&efConstruction=100") == (
        "faiss", {"factory": "HNSW32,SQ8", "ef": 64, "ef_construction": 100})  # fmt: skip
    assert parse_spec("milvus:./x.db") == ("milvus", {"uri": "./x.db"})
    assert parse_spec("milvus:http://host:19530") == ("milvus", {"uri": "http://host:19530"})
    assert parse_spec("milvus:http://h:1?index=hnsw&m=16&efConstruction=200&ef=64") == (
        "milvus", {"uri": "http://h:1", "index_type": "HNSW", "index_params": {"M": 16, "efConstruction": 200},
                   "ef": 64})  # fmt: skip
    assert parse_spec("milvus:./x.db?index=IVF_PQ&nlist=128&m=8&nprobe=16")[1] == {
        "uri": "./x.db", "index_type": "IVF_PQ", "index_params": {"nlist": 128, "m": 8}, "nprobe": 16}  # fmt: skip
    bad = ["annoy", "milvus:", "hnsw:m=x", "hnsw:depth=3", "faiss:Bogus12", "faiss:IVF64,Flat?nprobe=0",
           "faiss:IVF64,Flat?colour=red", "faiss?mmap=maybe", "faiss:IVF64,Flat?nprobe", "milvus:h.db?index=BOGUS",
           "milvus:h.db?index=HNSW&nlist=4", "milvus:h.db?nprobe=4", "milvus:h.db?index=IVF_FLAT&ef=4"]  # fmt: skip
    for spec in bad:
        with pytest.raises(QembedError) as error:
            parse_spec(spec)
        assert "\n" not in str(error.value)
    with pytest.raises(QembedError, match="nprobe applies to IVF"):
        open_index("faiss:HNSW16?nprobe=4", 32)
    with pytest.raises(QembedError, match="dim 30"):
        open_index("faiss:IVF8,PQ16", 30)  # PQ16 needs a dimension divisible by 16
    with pytest.raises(QembedError, match="needs at least 64 vectors"):
        small = open_index("faiss:IVF64,Flat", 8)
        small.add(["a"], np.ones((1, 8), dtype=np.float32))
        small.search_rows(np.ones((1, 8), dtype=np.float32), 1)
    with pytest.raises(QembedError):
        load_index(tmp_path)
    with pytest.raises(QembedError):
        open_index(f"milvus:{tmp_path / 'x.sqlite'}", 8)


def test_index_build_and_search_cli_with_ivf(
    tmp_path, tiny_embedder_path, shared_dir, capsys, one_torch_thread
):
    corpus = tmp_path / "corpus.jsonl"
    source = (shared_dir / "data/nfcorpus/corpus.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    corpus.write_text("\n".join(source) + "\n", encoding="utf-8")
    model = ["--model", str(tiny_embedder_path), "--corpus", str(corpus)]
    assert main(["index", "build", *model, "--output", str(tmp_path / "ivf"), "--index",
                 "faiss:IVF4,Flat?nprobe=1&mmap=1"]) == 0  # fmt: skip
    assert "recall@10" in capsys.readouterr().out
    manifest = Manifest.read(tmp_path / "ivf")
    assert manifest.index == "faiss:IVF4,Flat?nprobe=1&mmap=1" and 0 < manifest.recall_at_10 <= 1
    assert main(["index", "build", *model, "--output", str(tmp_path / "flat")]) == 0
    assert Manifest.read(tmp_path / "flat").recall_at_10 is None  # exact: nothing to measure
    capsys.readouterr()

    def search(index, *extra):
        code = main(["search", "--index", str(index), "--query", "diet and breast cancer", "--top-k", "8",
                     "--json", *extra])  # fmt: skip
        return code, capsys.readouterr()

    exact = json.loads(search(tmp_path / "flat")[1].out)["results"]
    code, out = search(tmp_path / "ivf", "--nprobe", "4")  # every list: the exact answer
    assert code == 0 and [h["id"] for h in json.loads(out.out)["results"]] == [h["id"] for h in exact]
    code, out = search(tmp_path / "ivf", "--ef", "16")
    assert code == 2 and "ef applies to HNSW" in out.err and len(out.err.strip().splitlines()) == 1
    code, out = search(tmp_path / "ivf", "--nprobe", "0")
    assert code == 2 and "positive integer" in out.err
    from qembed import Embedder

    opened = open_search_index(tmp_path / "ivf", Embedder.from_pretrained(tiny_embedder_path))
    assert opened.vectors._read_only  # mmap=1 in the spec: the saved index is mapped, not read in


def test_milvus_matches_faiss(milvus_db, data, monkeypatch):
    docs, queries, ids, scores, _ = data
    monkeypatch.setattr(milvus_index, "INSERT_BYTES", 64 * 1024)  # force many inserts per add()
    index = open_index(f"milvus:{milvus_db}", 32, collection="match")
    assert index.exact and not index.temporary
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
    index.close()


def test_milvus_reopen_append_overwrite_and_temporary(milvus_db, tmp_path):
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
    with pytest.raises(QembedError, match="already exists"):
        open_index(f"milvus:{milvus_db}", 8, collection="reopen")  # never dropped without overwrite
    assert milvus_index.collection_exists(milvus_db, "reopen")
    fresh = open_index(f"milvus:{milvus_db}", 8, collection="reopen", overwrite=True)
    assert len(fresh) == 0
    with pytest.raises(QembedError):
        fresh.add(["x" * 70_000], vecs[:1])
    with pytest.raises(QembedError, match="dim 8, expected 16"):
        milvus_index.MilvusIndex(milvus_db, 16, collection="reopen", reopen=True)
    # no collection named: a unique temporary one, dropped on close (also when the block fails)
    with pytest.raises(RuntimeError):
        with open_index(f"milvus:{milvus_db}", 8) as temporary:
            name = temporary.collection
            assert name.startswith("qembed_tmp_") and temporary.temporary
            temporary.add(None, vecs)
            assert milvus_index.collection_exists(milvus_db, name)
            raise RuntimeError("a failing run")
    assert not milvus_index.collection_exists(milvus_db, name)
