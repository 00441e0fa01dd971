"""`qembed serve` end to end: a real server process on 127.0.0.1 driven by the official `openai` client and httpx.

One server per model for the whole module: the real all-MiniLM-L6-v2 (with an API key), and a tiny random
Qwen3 embedder with a tiny Qwen3 reranker and an index folder.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serve_helpers import ROOT, start_server

openai = pytest.importorskip("openai")

KEY = "test-key-0123456789"
TEXTS = ["What is the capital of France?", "Paris is the capital and largest city of France.",
         "水稻 的 种植 需要 充足 的 水分", "a", "Nutrition facts about vitamin D " * 20]  # fmt: skip


@pytest.fixture(scope="module")
def minilm_server(minilm_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-minilm") / "server.log"
    server = start_server(["--model", str(minilm_path), "--served-model-name", "minilm", "--api-key-env",
                           "QEMBED_TEST_KEY"], log, env={"QEMBED_TEST_KEY": KEY})  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def minilm(minilm_path):
    from qembed import Embedder

    return Embedder.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def qwen_index(tiny_embedder_path, tmp_path_factory):
    """An index folder over 40 NFCorpus documents, built with the CLI."""
    folder = tmp_path_factory.mktemp("serve-index")
    corpus = folder / "corpus.jsonl"
    lines = (ROOT.parent / "shared/data/nfcorpus/corpus.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "qembed", "index", "build", "--model", str(tiny_embedder_path),
                          "--corpus", str(corpus), "--output", str(folder / "index")],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return folder / "index"


@pytest.fixture(scope="module")
def qwen_server(tiny_embedder_path, tiny_reranker_path, qwen_index, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-qwen") / "server.log"
    server = start_server(["--model", str(tiny_embedder_path), "--reranker", str(tiny_reranker_path),
                           "--index", str(qwen_index), "--max-client-batch-size", "64"], log)  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def qwen(tiny_embedder_path):
    from qembed import Embedder

    return Embedder.from_pretrained(tiny_embedder_path)


def client(server, key=KEY):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_openai_client_minilm_equals_encode(minilm_server, minilm, one_torch_thread):
    c = client(minilm_server)
    expected = minilm.encode(TEXTS)
    default = c.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64 by default
    as_float = c.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    short = c.embeddings.create(model="minilm", input=TEXTS, dimensions=128)
    for response in (default, as_float):
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert [d.index for d in response.data] == list(range(len(TEXTS)))
        assert response.model == "minilm"
        assert response.usage.prompt_tokens == sum(map(len, minilm.prepare(TEXTS)))
        assert response.usage.total_tokens == response.usage.prompt_tokens
    got = np.array([d.embedding for d in short.data], dtype=np.float32)
    np.testing.assert_allclose(got, minilm.encode(TEXTS, dim=128), atol=1e-5)
    single = c.embeddings.create(model="minilm", input=TEXTS[1])
    np.testing.assert_allclose(single.data[0].embedding, expected[1], atol=1e-5)


def test_openai_client_qwen3_equals_encode(qwen_server, qwen, one_torch_thread):
    c = client(qwen_server, key="unused")
    name = str(qwen.name_or_path)
    expected = qwen.encode(TEXTS)
    for fmt in ("base64", "float"):
        response = c.embeddings.create(model=name, input=TEXTS, encoding_format=fmt)
        got = np.array([d.embedding for d in response.data], dtype=np.float32) if fmt == "float" else np.stack(
            [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in response.data])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert response.usage.prompt_tokens == sum(map(len, qwen.prepare(TEXTS)))
    response = c.embeddings.create(model=name, input=TEXTS, dimensions=32)
    np.testing.assert_allclose([d.embedding for d in response.data], qwen.encode(TEXTS, dim=32), atol=1e-5)
    # the extensions: input_type and instruction make the Qwen3 query template explicit
    queries = TEXTS[:2]
    response = c.embeddings.create(model=name, input=queries, extra_body={"input_type": "query"})
    np.testing.assert_allclose([d.embedding for d in response.data], qwen.encode_queries(queries), atol=1e-5)
    response = c.embeddings.create(model=name, input=queries, extra_body={"instruction": "Find recipes"})
    np.testing.assert_allclose([d.embedding for d in response.data],
                               qwen.encode(queries, instruction="Find recipes"), atol=1e-5)  # fmt: skip
    # token-id inputs: the model's own token ids embed exactly like the text
    ids = qwen.prepare(TEXTS[:2])
    response = c.embeddings.create(model=name, input=ids)
    np.testing.assert_allclose([d.embedding for d in response.data], expected[:2], atol=1e-5)
    assert response.usage.prompt_tokens == sum(map(len, ids))
    response = c.embeddings.create(model=name, input=ids[0][:-1])  # one id array, without the end-of-text
    np.testing.assert_allclose(response.data[0].embedding, expected[0], atol=1e-5)


def test_concurrent_mixed_requests_each_equal_encoding_alone(qwen_server, qwen, one_torch_thread):
    rng = random.Random(0)
    pool = (ROOT.parent / "shared/data/nfcorpus/queries.jsonl").read_text(encoding="utf-8").splitlines()[:300]
    pool = [json.loads(line)["text"] for line in pool] + TEXTS
    requests = []
    for _ in range(200):
        texts = [rng.choice(pool) * rng.choice([1, 1, 1, 3]) for _ in range(rng.randint(1, 64))]
        body = {"model": str(qwen.name_or_path), "input": texts, "encoding_format": rng.choice(["float", "base64"])}
        if rng.random() < 0.3:
            body["instruction"] = rng.choice(["Find the answer", "Classify the topic"])
        if rng.random() < 0.3:
            body["dimensions"] = rng.choice([32, 48])
        requests.append(body)

    def send(body):
        with httpx.Client(timeout=300) as http:
            return http.post(f"{qwen_server.url}/v1/embeddings", json=body)

    with ThreadPoolExecutor(32) as pool_:
        responses = list(pool_.map(send, requests))
    for body, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        if body["encoding_format"] == "base64":
            got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
        else:
            got = np.array([d["embedding"] for d in data], dtype=np.float32)
        expected = qwen.encode(body["input"], instruction=body.get("instruction"), dim=body.get("dimensions"))
        assert [d["index"] for d in data] == list(range(len(body["input"])))
        np.testing.assert_allclose(got, expected, atol=1e-5)
    metrics = httpx.get(f"{qwen_server.url}/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith('qembed_batch_size_count{model="embed"}')]
    assert sizes and float(sizes[0].split()[-1]) > 0
