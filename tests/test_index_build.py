"""`qembed index build` at scale and under faults: bounded memory per document, a SIGKILLed first build
continued by the same command (re-encoding nothing cached, the same result as an uninterrupted build),
progress lines, a lone surrogate as a one-line error, and vectors shared with `eval` through the cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from qembed.cache import EmbeddingCache, cache_key, text_key
from qembed.cli import main
from qembed.data.beir import write_beir
from qembed.index import build_index

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def embedder(tiny_embedder_path):
    from qembed import Embedder

    return Embedder.from_pretrained(tiny_embedder_path)


def _doc_cache(embedder, cache_dir) -> EmbeddingCache:
    return EmbeddingCache(cache_dir, cache_key(embedder, embedder.resolve_query_format(None, embedder.document_prompt)))


def _run_cli(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "QEMBED_PROGRESS_INTERVAL": "0", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "qembed", *args], cwd=ROOT, env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)  # fmt: skip


def test_200k_documents_in_bounded_memory(embedder, tmp_path, one_torch_thread):
    """A 200,000-document build (vectors already in the cache, so the test does not spend minutes encoding)
    needs at most 64 bytes of Python/numpy memory per document besides the vectors (which FAISS holds):
    tracemalloc's peak over the whole build (ids, offsets, id hashes, the cache's key index), per document
    beyond a 20,000-document build (which carries the fixed costs: read-ahead chunks, buffers, imports).
    With tracemalloc this takes about 30 s on a busy 2-core machine (6 s without)."""
    n = 200_000
    texts = [f"doc {i}" for i in range(n)]
    lines = [f'{{"_id": "d{i}", "text": "{text}"}}\n' for i, text in enumerate(texts)]
    (tmp_path / "small.jsonl").write_text("".join(lines[: n // 10]), encoding="utf-8")
    (tmp_path / "corpus.jsonl").write_text("".join(lines), encoding="utf-8")
    vectors = np.random.default_rng(0).standard_normal((n, embedder.hidden_size)).astype(np.float32)
    keys = [text_key(t) for t in texts]
    for name, size in (("small", n // 10), ("corpus", n)):  # each build's own cache: its index counts too
        with _doc_cache(embedder, tmp_path / f"cache-{name}") as cache:
            cache.add(keys[:size], vectors[:size])
    del texts, lines, vectors, keys
    peaks = {}
    for name in ("small", "corpus"):
        tracemalloc.start()
        try:
            result = build_index(embedder, tmp_path / f"{name}.jsonl", tmp_path / f"idx-{name}",
                                 cache_dir=tmp_path / f"cache-{name}", show_progress=False)  # fmt: skip
            peaks[name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert (result.encoded, result.cached, result.manifest.count) == (0, n, n)
    per_document = (peaks["corpus"] - peaks["small"]) / (n - n // 10)
    assert 0 < per_document <= 64, f"{per_document:.1f} bytes per document"
    offsets = np.load(tmp_path / "idx-corpus" / "docs.offsets.npy")
    with (tmp_path / "idx-corpus" / "docs.jsonl").open("rb") as f:
        f.seek(int(offsets[123_456]))
        assert json.loads(f.readline()) == {"id": "d123456", "text": "doc 123456"}


def test_killed_first_build_is_continued_by_the_same_command(embedder, tiny_embedder_path, tmp_path):
    """SIGKILL during a first build (no manifest yet): the folder says a build is in progress, `search`
    says to rerun, and the same command finishes it, encoding only what the cache did not have; the result
    equals an uninterrupted build's."""
    n = 600
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"d{i}", "text": f"document {i} on rice blast, maize rust and wet "
                                f"weather, note {i * 7919 % 1000}"}) + "\n")  # fmt: skip
    idx, cache = tmp_path / "idx", tmp_path / "cache"
    command = ["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus), "--output", str(idx),
               "--cache-dir", str(cache), "--batch-tokens", "512"]  # fmt: skip
    run = _run_cli(*command, env={"OMP_NUM_THREADS": "1"})
    done = 0
    for line in run.stderr:  # plain progress lines: "qembed: index: 384/1500 text (26%), ..."
        if line.startswith("qembed: index: "):
            done = int(line.split(": ")[2].split("/")[0])
            if done >= n // 4:
                run.send_signal(signal.SIGKILL)
                break
    run.wait()
    assert run.returncode == -signal.SIGKILL and 0 < done < n, (run.returncode, done)
    assert not (idx / "manifest.json").exists() and (idx / ".build.json").is_file()
    cached = len(_doc_cache(embedder, cache))
    assert cached >= done - 256  # the cache is written batch by batch

    search = _run_cli("search", "--index", str(idx), "--query", "rice")
    _, err = search.communicate(timeout=120)
    assert search.returncode == 2 and "did not finish" in err and "Traceback" not in err

    again = _run_cli(*command)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"{n - cached} encoded, {cached} from the cache" in out
    assert not (idx / ".build.json").exists()
    assert sum(line.startswith("qembed: index: ") for line in err.splitlines()) >= 2  # progress while it runs

    fresh = build_index(embedder, corpus, tmp_path / "fresh", cache_dir=tmp_path / "fresh-cache", batch_tokens=512)
    assert fresh.encoded == n
    for name in ("docs.jsonl", "docs.offsets.npy", "vectors/ids.bin"):
        assert (idx / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    import faiss

    got, want = (faiss.read_index(str(folder / "vectors" / "index.faiss")) for folder in (idx, tmp_path / "fresh"))
    np.testing.assert_allclose(got.reconstruct_n(0, n), want.reconstruct_n(0, n), atol=1e-6)


def test_lone_surrogate_is_a_one_line_error(tiny_embedder_path, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "a", "text": "fine"}\n{"_id": "b", "text": "half a pair \\ud800 here"}\n')
    code = main(["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus), "--output",
                 str(tmp_path / "idx"), "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"{corpus}:2:" in err and "surrogate" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_index_build_after_eval_encodes_nothing(tiny_embedder_path, tmp_path, monkeypatch, capsys):
    """The cache is shared and keyed by the model's fingerprint: `index build` after `eval` with the same model
    (or a copy of its folder, as `adapt` copies its choice to `best/`) encodes nothing."""
    monkeypatch.setenv("QEMBED_CACHE", str(tmp_path / "shared-cache"))
    corpus = {f"d{i}": {"title": "", "text": f"note {i} about {topic}"}
              for i, topic in enumerate(["rice", "maize", "tea", "soil", "water", "sugar"] * 4)}  # fmt: skip
    write_beir(tmp_path / "beir", corpus, {"q1": "rice?"}, {"test": {"q1": {"d0": 1}}})
    assert main(["eval", "--model", str(tiny_embedder_path), "--dataset", str(tmp_path / "beir"), "--k", "1,5",
                 "--output", str(tmp_path / "eval")]) == 0  # fmt: skip
    copy = tmp_path / "best"
    shutil.copytree(tiny_embedder_path, copy)
    capsys.readouterr()
    for model, folder in ((tiny_embedder_path, "idx"), (copy, "idx-best")):
        assert main(["index", "build", "--model", str(model), "--corpus", str(tmp_path / "beir"), "--output",
                     str(tmp_path / folder)]) == 0  # fmt: skip
        assert f"indexed {len(corpus)} documents" in (out := capsys.readouterr().out)
        assert f"0 encoded, {len(corpus)} from the cache" in out, out
