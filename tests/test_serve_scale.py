"""Scale-out path: index in a real Milvus gRPC server, `qembed serve --index` over it; overload, client
disconnects and SIGTERM on that server."""

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
from qembed.index.store import Manifest

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
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale-corpus") / "corpus.jsonl"
    lines = (ROOT.parent / "shared/data/nfcorpus/corpus.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_milvus_server_index_ownership_and_serving(milvus_uri, corpus, tiny_embedder_path, tmp_path, capsys,
                                                   monkeypatch, one_torch_thread):  # fmt: skip
    from pymilvus import DataType, MilvusClient

    from qembed.index.milvus_index import connect

    monkeypatch.setenv("QEMBED_TEST_MILVUS_TOKEN", "root:Milvus")
    milvus = connect(milvus_uri, token="root:Milvus")
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    milvus.create_collection("someone_elses", schema=schema)
    milvus.insert("someone_elses", [{"pk": 1, "v": [0.1, 0.2, 0.3, 0.4]}])
    base = ["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus),
            "--index", f"milvus:{milvus_uri}", "--milvus-token-env", "QEMBED_TEST_MILVUS_TOKEN"]  # fmt: skip

    # a collection this folder did not create is never dropped without --overwrite
    assert main([*base, "--output", str(tmp_path / "taken"), "--collection", "someone_elses"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert milvus.has_collection("someone_elses")

    # default: a new unique collection; re-running the build rebuilds that one from the cache
    folder = tmp_path / "milvus-index"
    assert main([*base, "--output", str(folder)]) == 0
    manifest = Manifest.read(folder)
    assert manifest.collection.startswith("qembed_") and manifest.count == 30 and manifest.encoded == 30
    assert main([*base, "--output", str(folder)]) == 0
    assert Manifest.read(folder).collection == manifest.collection and Manifest.read(folder).encoded == 0
    assert milvus.has_collection("someone_elses") and "root:Milvus" not in (folder / "manifest.json").read_text()
    assert "root:Milvus" not in (folder / "vectors" / "meta.json").read_text()

    # the same corpus in FAISS ranks the same
    assert main(["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus), "--output",
                 str(tmp_path / "faiss-index")]) == 0  # fmt: skip
    capsys.readouterr()

    def cli_search(index):
        assert main(["search", "--index", str(index), "--query", "breast cancer", "--top-k", "5", "--json",
                     "--milvus-token-env", "QEMBED_TEST_MILVUS_TOKEN"]) == 0  # fmt: skip
        return json.loads(capsys.readouterr().out)["results"]

    expected = cli_search(folder)
    assert [h["id"] for h in expected] == [h["id"] for h in cli_search(tmp_path / "faiss-index")]

    server = start_server(["--model", str(tiny_embedder_path), "--index", str(folder), "--max-concurrent-requests", "4",
                           "--max-batch-tokens", "256", "--milvus-token-env", "QEMBED_TEST_MILVUS_TOKEN"],
                          tmp_path / "server.log")  # fmt: skip
    try:
        got = httpx.post(f"{server.url}/v1/search", json={"query": "breast cancer", "top_k": 5}).json()["results"]
        assert [h["id"] for h in got] == [h["id"] for h in expected]
        assert [h["text"] for h in got] == [h["text"] for h in expected]
        for a, b in zip(got, expected):
            assert abs(a["score"] - b["score"]) <= 1e-5
        _overload(server)
        _client_gone(server)
        _sigterm(server)
    finally:
        server.stop()

    # --overwrite replaces the foreign collection
    assert main([*base, "--output", str(tmp_path / "taken"), "--collection", "someone_elses", "--overwrite"]) == 0
    assert milvus.get_collection_stats("someone_elses")["row_count"] == 30


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
