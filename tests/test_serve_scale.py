"""Scale-out path: index in a real Milvus gRPC server (collections qembed never drops unless it made them,
rebuilds that switch collections only when complete, index type and search parameters from the spec),
`qembed serve --index` over it; overload, client disconnects and SIGTERM on that server."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest
from serve_helpers import ROOT, free_port, start_server

from qembed.cli import main
from qembed.data.beir import write_beir
from qembed.errors import QembedError
from qembed.index.milvus_index import MilvusIndex
from qembed.index.store import Manifest, open_search_index

pytest.importorskip("pymilvus")


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    from pymilvus import MilvusClient

    port = free_port()
    data = tmp_path_factory.mktemp("milvus-server")
    process = subprocess.Popen(["milvus-lite", "server", "--data-dir", str(data), "--host", "127.0.0.1",
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            probe = MilvusClient(uri=uri, timeout=5, dedicated=True)
            probe.list_collections()
            probe.close()
            break
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.5)
    yield uri
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def milvus(milvus_uri):
    from qembed.index.milvus_index import connect

    client = connect(milvus_uri, token="root:Milvus")
    yield client
    client.close()


def _user_collection(milvus, name: str) -> None:
    """A collection of the user's (not qembed's): one row, another schema."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    milvus.create_collection(name, schema=schema)
    milvus.insert(name, [{"pk": 1, "v": [0.1, 0.2, 0.3, 0.4]}])


def _rows(milvus, name: str) -> int:
    return int(milvus.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])


def _temporaries(milvus) -> list[str]:
    return [name for name in milvus.list_collections() if name.startswith("qembed_tmp_")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale-corpus") / "corpus.jsonl"
    lines = (ROOT.parent / "shared/data/nfcorpus/corpus.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_milvus_server_index_ownership_and_serving(milvus_uri, milvus, corpus, tiny_embedder_path, tmp_path, capsys,
                                                   monkeypatch, one_torch_thread):  # fmt: skip
    monkeypatch.setenv("QEMBED_TEST_MILVUS_TOKEN", "root:Milvus")
    _user_collection(milvus, "someone_elses")
    base = ["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus),
            "--index", f"milvus:{milvus_uri}", "--milvus-token-env", "QEMBED_TEST_MILVUS_TOKEN"]  # fmt: skip

    # a collection this folder did not create is never dropped without --overwrite
    assert main([*base, "--output", str(tmp_path / "taken"), "--collection", "someone_elses"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert milvus.has_collection("someone_elses")

    # default: a new unique collection; an HNSW index with its build and search parameters from the spec
    # (Milvus Lite searches every index type exactly, so the ranking still equals FAISS flat's below)
    folder = tmp_path / "milvus-index"
    hnsw = ["--index", f"milvus:{milvus_uri}?index=HNSW&M=16&efConstruction=64&ef=32"]
    assert main([*base, *hnsw, "--output", str(folder)]) == 0
    assert "recall@10 1.000 of exact" in capsys.readouterr().out
    manifest = Manifest.read(folder)
    assert manifest.collection.startswith("qembed_") and manifest.count == 30 and manifest.encoded == 30
    assert manifest.recall_at_10 == 1.0 and milvus.describe_index(manifest.collection, "vector")["index_type"] == "HNSW"
    assert json.loads((folder / "vectors" / "meta.json").read_text())["ef"] == 32
    assert milvus.has_collection("someone_elses") and "root:Milvus" not in (folder / "manifest.json").read_text()
    assert "root:Milvus" not in (folder / "vectors" / "meta.json").read_text()

    # the same corpus in FAISS ranks the same
    assert main(["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus), "--output",
                 str(tmp_path / "faiss-index")]) == 0  # fmt: skip
    capsys.readouterr()

    def cli_search(index, *extra):
        assert main(["search", "--index", str(index), "--query", "breast cancer", "--top-k", "5", "--json",
                     "--milvus-token-env", "QEMBED_TEST_MILVUS_TOKEN", *extra]) == 0  # fmt: skip
        return json.loads(capsys.readouterr().out)["results"]

    expected = cli_search(folder)
    assert [h["id"] for h in expected] == [h["id"] for h in cli_search(tmp_path / "faiss-index")]
    assert [h["id"] for h in cli_search(folder, "--ef", "8")] == [h["id"] for h in expected]
    assert main(["search", "--index", str(folder), "--query", "x", "--nprobe", "4", "--milvus-token-env",
                 "QEMBED_TEST_MILVUS_TOKEN"]) == 2  # fmt: skip
    assert "nprobe does not apply to a Milvus HNSW index" in capsys.readouterr().err

    server = start_server(["--model", str(tiny_embedder_path), "--index", str(folder), "--max-concurrent-requests", "4",
                           "--max-batch-tokens", "256", "--milvus-token-env", "QEMBED_TEST_MILVUS_TOKEN", "--ef", "48"],
                          tmp_path / "server.log")  # fmt: skip
    try:
        got = httpx.post(f"{server.url}/v1/search", json={"query": "breast cancer", "top_k": 5}).json()["results"]
        assert [h["id"] for h in got] == [h["id"] for h in expected]
        assert [h["text"] for h in got] == [h["text"] for h in expected]
        for a, b in zip(got, expected):
            assert abs(a["score"] - b["score"]) <= 1e-5
        with_ef = httpx.post(f"{server.url}/v1/search", json={"query": "breast cancer", "top_k": 5, "ef": 16})
        assert with_ef.status_code == 200 and [h["id"] for h in with_ef.json()["results"]] == [h["id"] for h in got]
        for bad in ({"nprobe": 4}, {"ef": 0}):
            refused = httpx.post(f"{server.url}/v1/search", json={"query": "breast cancer", **bad})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == next(iter(bad)), refused.text
        _overload(server)
        _client_gone(server)
        _sigterm(server)
    finally:
        server.stop()

    # --overwrite replaces the foreign collection
    assert main([*base, "--output", str(tmp_path / "taken"), "--collection", "someone_elses", "--overwrite"]) == 0
    assert milvus.get_collection_stats("someone_elses")["row_count"] == 30


def test_rebuild_switches_to_a_new_collection_when_complete(milvus_uri, milvus, corpus, tiny_embedder_path, tmp_path,
                                                            monkeypatch, one_torch_thread):  # fmt: skip
    """A replica serving the folder keeps the whole old collection while a rebuild runs; the manifest then
    names the new collection and the old one is dropped."""
    from qembed import Embedder

    lines = corpus.read_text(encoding="utf-8").splitlines()
    (tmp_path / "first.jsonl").write_text("\n".join(lines[:20]) + "\n", encoding="utf-8")
    folder = tmp_path / "idx"
    build = ["index", "build", "--model", str(tiny_embedder_path), "--output", str(folder), "--index",
             f"milvus:{milvus_uri}", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip  (a cache of its own)
    assert main([*build, "--corpus", str(tmp_path / "first.jsonl")]) == 0
    old = Manifest.read(folder)
    assert old.recall_at_10 is None  # FLAT: exact, nothing to measure
    reader = open_search_index(folder, Embedder.from_pretrained(tiny_embedder_path))
    before = [h.id for h in reader.search("breast cancer", 5)]
    during = []
    add = MilvusIndex.add

    def watched_add(self, ids, vectors):
        add(self, ids, vectors)
        self.flush()
        during.append((self.collection, _rows(milvus, old.collection), [h.id for h in reader.search("breast cancer", 5)]))

    monkeypatch.setattr(MilvusIndex, "add", watched_add)
    assert main([*build, "--corpus", str(corpus)]) == 0  # 10 more documents
    new = Manifest.read(folder)
    assert new.collection != old.collection and (new.count, new.encoded) == (30, 10)
    assert during and all(c == new.collection and rows == 20 and hits == before for c, rows, hits in during)
    assert not milvus.has_collection(old.collection) and _rows(milvus, new.collection) == 30
    reader.vectors.close()
    assert len(open_search_index(folder, reader.embedder).search("breast cancer", 40)) == 30


def test_eval_and_mine_never_drop_a_user_collection(milvus_uri, milvus, corpus, tiny_embedder_path, tmp_path, capsys,
                                                    monkeypatch, one_torch_thread):  # fmt: skip
    """`eval`/`mine --index milvus:URI` work in a temporary collection of their own, dropped when they end,
    also when they fail; the user's collections named `qembed` and `qembed_mine` are left alone."""
    for name in ("qembed", "qembed_mine"):
        _user_collection(milvus, name)
    docs = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    dataset = tmp_path / "beir"
    write_beir(dataset, {d["_id"]: d["text"] for d in docs}, {"q1": "breast cancer", "q2": "vitamin D"},
               {"test": {"q1": {docs[0]["_id"]: 1}, "q2": {docs[1]["_id"]: 1}}})  # fmt: skip
    index = ["--index", f"milvus:{milvus_uri}"]
    seen = []
    search_rows = MilvusIndex.search_rows

    def watched(self, *args, **kwargs):
        seen.append((self.collection, milvus.has_collection(self.collection), len(self)))
        return search_rows(self, *args, **kwargs)

    monkeypatch.setattr(MilvusIndex, "search_rows", watched)
    model = ["--model", str(tiny_embedder_path)]
    assert main(["eval", *model, "--dataset", str(dataset), *index, "--output", str(tmp_path / "eval")]) == 0
    assert main(["mine", *model, "--input", str(dataset), "--split", "test", "--output", str(tmp_path / "mined.jsonl"),
                 *index]) == 0  # fmt: skip
    assert len({c for c, _, _ in seen}) == 2 and all(c.startswith("qembed_tmp_") and there and n == 30
                                                     for c, there, n in seen)  # fmt: skip

    def failing(self, *args, **kwargs):  # a fault after the run has made and filled its collection
        seen.append((self.collection, milvus.has_collection(self.collection), len(self)))
        raise QembedError("injected failure")

    monkeypatch.setattr(MilvusIndex, "search_rows", failing)
    assert main(["eval", *model, "--dataset", str(dataset), *index, "--output", str(tmp_path / "failed")]) == 2
    assert "injected failure" in capsys.readouterr().err
    assert seen[-1][0].startswith("qembed_tmp_") and seen[-1][1]
    assert not _temporaries(milvus)
    assert _rows(milvus, "qembed") == 1 and _rows(milvus, "qembed_mine") == 1


SLOW = {"model": "x", "input": ["nutrition and chronic disease " * 60] * 64}


def _slow_body(server) -> dict:
    models = httpx.get(f"{server.url}/v1/models").json()
    return {**SLOW, "model": models["data"][0]["id"]}


def _overload(server) -> None:
    """50 simultaneous slow requests with --max-concurrent-requests 4: the excess get 429 + Retry-After."""
    body, barrier, responses = _slow_body(server), threading.Barrier(50), []

    def send():
        with httpx.Client(timeout=300) as http:
            barrier.wait()
            responses.append(http.post(f"{server.url}/v1/embeddings", json=body))

    threads = [threading.Thread(target=send) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 4 and statuses.count(429) >= 1, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "rate_limit_exceeded"
        else:
            assert len(r.json()["data"]) == 64
    assert httpx.get(f"{server.url}/health").status_code == 200


def _dropped(server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith('qembed_dropped_inputs_total{model="embed"}'):
            return float(line.split()[-1])
    return 0.0


def _client_gone(server) -> None:
    """A client that gives up: its queued inputs are dropped, not embedded."""
    body = _slow_body(server)
    before = _dropped(server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/embeddings", json={**body, "input": body["input"] * 8}, timeout=0.5)
    deadline = time.monotonic() + 60
    while _dropped(server) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _dropped(server) > before


def _sigterm(server) -> None:
    """SIGTERM lets the request in flight finish, then the process exits cleanly."""
    body, result = _slow_body(server), {}
    deadline = time.monotonic() + 30
    while "qembed_requests_in_flight 0.0" not in httpx.get(f"{server.url}/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    def send():
        result["response"] = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=300)

    thread = threading.Thread(target=send)
    thread.start()
    deadline = time.monotonic() + 30
    while "qembed_requests_in_flight 1.0" not in httpx.get(f"{server.url}/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.process.send_signal(signal.SIGTERM)
    thread.join()
    assert result["response"].status_code == 200 and len(result["response"].json()["data"]) == 64
    assert server.process.wait(timeout=60) == 0
