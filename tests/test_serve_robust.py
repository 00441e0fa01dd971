"""`qembed serve` under faults: an index rebuilt under a running server, slow request bodies, the key rule of
/metrics and the docs, a model thread that dies, an unexpected exception on a keep-alive connection.

One CLI server for the module (tiny Qwen3 embedder, an index folder of its own, an API key); the fault
tests run `create_app` with an embedder that fails on marker token ids, in uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import ROOT, raw_post, read_response, serve_app, start_server

from qembed.cli import main
from qembed.data.corpus import iter_corpus

KEY = "robust-key-42"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _corpus(folder, begin: int, end: int):
    lines = (ROOT.parent / "shared/data/nfcorpus/corpus.jsonl").read_text(encoding="utf-8").splitlines()[begin:end]
    path = folder / f"corpus-{begin}-{end}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, dict(iter_corpus(path))  # id -> the text an index holds


@pytest.fixture(scope="module")
def site(tiny_embedder_path, tmp_path_factory):
    """An index folder of 40 NFCorpus documents (generation A) and a second corpus of 40 others (B)."""
    folder = tmp_path_factory.mktemp("serve-robust")
    corpus_a, docs_a = _corpus(folder, 0, 40)
    corpus_b, docs_b = _corpus(folder, 40, 80)
    index = folder / "index"
    assert main(["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus_a), "--output",
                 str(index)]) == 0  # fmt: skip
    return {"index": index, "a": (corpus_a, docs_a), "b": (corpus_b, docs_b), "folder": folder}


@pytest.fixture(scope="module")
def server(tiny_embedder_path, site):
    server = start_server(["--model", str(tiny_embedder_path), "--index", str(site["index"]), "--api-key-env",
                           "QEMBED_TEST_KEY", "--metrics-require-key", "--body-timeout", "2",
                           "--max-concurrent-requests", "4", "--max-input-tokens", "64"],
                          site["folder"] / "server.log", env={"QEMBED_TEST_KEY": KEY})  # fmt: skip
    yield server
    server.stop()


def _search(http: httpx.Client, url: str, query: str = "vitamin D and bone health") -> httpx.Response:
    return http.post(f"{url}/v1/search", json={"query": query, "top_k": 5}, headers=AUTH)


def _generation(response: httpx.Response, docs: dict) -> bool:
    """Whether every hit is a document of `docs`, with its own text."""
    hits = response.json()["results"]
    return bool(hits) and all(docs.get(h["id"]) == h["text"] for h in hits)


def test_rebuild_under_a_running_server_serves_the_old_build_until_reload(server, site, tiny_embedder_path,
                                                                           one_torch_thread):  # fmt: skip
    (corpus_a, docs_a), (corpus_b, docs_b) = site["a"], site["b"]
    build = ["index", "build", "--model", str(tiny_embedder_path), "--output", str(site["index"]), "--corpus"]
    responses, stop = [], threading.Event()

    def search_loop():
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                responses.append(_search(http, server.url))

    thread = threading.Thread(target=search_loop)
    thread.start()
    try:
        assert main([*build, str(corpus_b)]) == 0  # the folder now holds generation B
        seen = len(responses)
        deadline = time.monotonic() + 60
        while len(responses) < seen + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert len(responses) >= 5
    assert [r.text for r in responses if r.status_code != 200] == []
    assert all(_generation(r, docs_a) for r in responses)  # never a mix: A's ids with A's texts
    with httpx.Client(timeout=60) as http:
        assert _generation(_search(http, server.url), docs_a)
        reloaded = http.post(f"{server.url}/admin/reload", headers=AUTH)
        assert reloaded.status_code == 200 and reloaded.json()["count"] == 40, reloaded.text
        assert http.post(f"{server.url}/admin/reload").status_code == 401
        assert _generation(_search(http, server.url), docs_b)
        # SIGHUP does the same: rebuild A (all from the folder's cache) and signal
        assert main([*build, str(corpus_a)]) == 0
        assert _generation(_search(http, server.url), docs_b)
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not _generation(_search(http, server.url), docs_a):
            assert time.monotonic() < deadline, "SIGHUP did not reload the index"
            time.sleep(0.2)
    assert "index reloaded" in server.log.read_text()


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed the connection: end of stream, or a reset when the trickling client's next byte
    reached the closed socket first."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_slow_bodies_time_out_and_free_their_slots(server, tiny_embedder_path):
    """4 clients sending their bodies at 1 byte per 0.5 s hold all 4 slots of --max-concurrent-requests 4
    only until --body-timeout (2 s): they get 408 and are closed, and normal requests get through."""
    body = json.dumps({"model": tiny_embedder_path.name, "input": "hello"}).encode()
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    host, port = server.url.removeprefix("http://").split(":")
    sockets = [socket.create_connection((host, int(port)), timeout=30) for _ in range(4)]
    stop = threading.Event()

    def trickle():
        for position in range(len(body) - 1):
            for sock in sockets:
                try:
                    sock.sendall(body[position : position + 1])
                except OSError:
                    pass
            if stop.wait(0.5):
                return

    for sock in sockets:
        sock.sendall(head)
    feeder = threading.Thread(target=trickle)
    feeder.start()
    try:
        deadline = time.monotonic() + 30
        while "qembed_requests_in_flight 4.0" not in httpx.get(f"{server.url}/metrics", headers=AUTH).text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        full = httpx.post(f"{server.url}/v1/embeddings", content=body, headers={**AUTH, "content-type": "application/json"})
        assert full.status_code == 429
        for sock in sockets:
            status, headers, answer = read_response(sock)
            assert status == 408 and json.loads(answer)["error"]["code"] == "body_timeout"
            assert headers["connection"] == "close" and closed_by_server(sock)
    finally:
        stop.set()
        feeder.join()
        for sock in sockets:
            sock.close()
    for _ in range(4):
        ok = httpx.post(f"{server.url}/v1/embeddings", content=body, headers={**AUTH, "content-type": "application/json"})
        assert ok.status_code == 200, ok.text


def test_key_rule_for_metrics_docs_and_admin(server):
    """With a key: /v1 and /admin need it, /metrics too with --metrics-require-key; /health and the API
    documentation (/docs and the /openapi.json it loads) are open."""
    url = server.url
    for path in ("/health", "/docs", "/openapi.json"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert "qembed_requests_total" in httpx.get(f"{url}/metrics", headers=AUTH).text
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.post(f"{url}/admin/reload").status_code == 401


def test_search_says_when_the_query_was_cut(server):
    with httpx.Client(timeout=60) as http:
        short = _search(http, server.url).json()
        long = _search(http, server.url, "vitamin D and calcium in bone health " * 40).json()
    assert short["query_truncated"] is False and long["query_truncated"] is True
    assert "/v1/search: 1 of 1 inputs cut to the limit of 64 tokens (query[0])" in server.log.read_text()


# ---------------------------------------------------------------------------------------------- faults
FAIL_ID, KILL_ID = 1000, 1001  # token ids that make the test model's forward pass fail / kill its thread


class Fatal(BaseException):
    """Not an `Exception`: escapes the per-batch guard, as an unexpected fault would."""


@pytest.fixture
def faulty(tiny_embedder_path, one_torch_thread):
    from qembed import Embedder

    class FaultyEmbedder(Embedder):
        entered, release = threading.Event(), threading.Event()

        def prepare(self, texts, **kwargs):
            if "raise-in-prepare" in texts:
                raise KeyError("an unexpected bug")
            return super().prepare(texts, **kwargs)

        def forward_features(self, batch):
            if (batch["input_ids"] == FAIL_ID).any():
                raise ValueError("one failed batch")
            if (batch["input_ids"] == KILL_ID).any():
                self.entered.set()
                self.release.wait(timeout=60)
                raise Fatal("injected fault")
            return super().forward_features(batch)

    return FaultyEmbedder.from_pretrained(tiny_embedder_path)


def test_errors_keep_the_connection_and_the_server_alive(faulty):
    """An unexpected exception (500) and a failed forward pass (500) leave the keep-alive connection usable."""
    from qembed.serve import ServeConfig, create_app

    with serve_app(create_app(faulty, config=ServeConfig(served_model_name="faulty"))) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            def post(value):
                status, _, body = raw_post(sock, "/v1/embeddings", json.dumps({"model": "faulty", "input": value}).encode())
                return status, json.loads(body)

            status, body = post("raise-in-prepare")
            assert status == 500 and body["error"]["code"] == "internal_error" and "KeyError" not in json.dumps(body)
            status, body = post([[FAIL_ID, 5, 6]])
            assert status == 500 and body["error"] == {"message": "model error: ValueError", "type": "server_error",
                                                       "param": None, "code": "model_error"}  # fmt: skip
            status, body = post("still served")
            assert status == 200 and len(body["data"][0]["embedding"]) == 64
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_dead_model_thread_fails_requests_and_health(faulty):
    """A fault that kills the model thread: the request in it, those queued behind it and every later one
    fail at once with 503 (no request waits forever), and /health turns 503."""
    from qembed.serve import ServeConfig, create_app

    with serve_app(create_app(faulty, config=ServeConfig(served_model_name="faulty"))) as url:
        responses: dict = {}

        def send(name, value):
            responses[name] = httpx.post(f"{url}/v1/embeddings", json={"model": "faulty", "input": value}, timeout=60)

        threads = [threading.Thread(target=send, args=("kill", [[KILL_ID, 5]]))]
        threads[0].start()
        assert faulty.entered.wait(timeout=60)
        for n in range(3):  # queued behind the batch that is about to kill the thread
            threads.append(threading.Thread(target=send, args=(n, [f"queued request {n}"] * (n + 1))))
            threads[-1].start()
        deadline = time.monotonic() + 30
        while "qembed_requests_in_flight 4.0" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        faulty.release.set()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(map(str, responses)) == ["0", "1", "2", "kill"]
        for response in responses.values():
            error = response.json()["error"]
            assert response.status_code == 503 and error["code"] == "model_unavailable", response.text
            assert "model thread stopped (Fatal: injected fault)" in error["message"]
        later = httpx.post(f"{url}/v1/embeddings", json={"model": "faulty", "input": "later"}, timeout=10)
        assert later.status_code == 503 and later.json()["error"]["code"] == "model_unavailable"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "restart the server" in health.json()["error"]["message"]
