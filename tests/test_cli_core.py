"""`qembed embed`, `qembed rerank`, `qembed demo` and their error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qembed import Embedder
from qembed.cli import main


def test_embed_npy_and_jsonl(tiny_embedder_path, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("first text\nsecond text\n\n", encoding="utf-8")
    assert main(["embed", "--model", str(tiny_embedder_path), "--input", str(texts), "--output", str(tmp_path / "o.npy")]) == 0
    vectors = np.load(tmp_path / "o.npy")
    embedder = Embedder.from_pretrained(tiny_embedder_path)
    np.testing.assert_allclose(vectors, embedder.encode_documents(["first text", "second text", ""]), atol=1e-6)

    records = tmp_path / "docs.jsonl"
    records.write_text('{"body": "alpha"}\n{"body": "beta"}\n', encoding="utf-8")
    args = ["embed", "--model", str(tiny_embedder_path), "--input", str(records), "--field", "body", "--queries",
            "--dim", "32", "--output", str(tmp_path / "o.jsonl")]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["alpha", "beta"] and len(rows[0]["embedding"]) == 32
    np.testing.assert_allclose([r["embedding"] for r in rows], embedder.encode_queries(["alpha", "beta"], dim=32), atol=1e-6)


@pytest.mark.parametrize(
    "content, extra, message",
    [
        (None, [], "file not found"),
        ('{"text": "ok"}\n{"text": broken\n', [], r"docs.jsonl:2: invalid JSON"),
        ('{"other": "x"}\n', [], "no field 'text'"),
        ('{"text": "ok"}\n', ["--dim", "8"], "dim must be an integer between 32 and 64"),
        ('{"text": "ok"}\n', ["--output-ext", ".csv"], "must end in .npy or .jsonl"),
    ],
)
def test_embed_errors_are_one_line(tiny_embedder_path, tmp_path, capsys, content, extra, message):
    source = tmp_path / "docs.jsonl"
    if content is not None:
        source.write_text(content, encoding="utf-8")
    output = str(tmp_path / "out") + (extra[1] if extra[:1] == ["--output-ext"] else ".npy")
    extra = [] if extra[:1] == ["--output-ext"] else extra
    code = main(["embed", "--model", str(tiny_embedder_path), "--input", str(source), "--output", output, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_unknown_model_exits_cleanly_without_traceback(tmp_path):
    source = tmp_path / "t.txt"
    source.write_text("x\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "qembed", "embed", "--model", "no-such-org/no-such-model",
                             "--input", str(source), "--output", str(tmp_path / "o.npy")],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no-such-org/no-such-model" in result.stderr and "local path" in result.stderr


def test_rerank_cli_prints_sorted_lines(tiny_reranker_path, tmp_path, capsys):
    docs = tmp_path / "docs.txt"
    docs.write_text("rice blast control\nthe eiffel tower\nnitrogen for maize\n", encoding="utf-8")
    assert main(["rerank", "--model", str(tiny_reranker_path), "--query", "rice disease", "--input", str(docs),
                 "--top-k", "2"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["score"] >= rows[1]["score"] and rows[0]["rank"] == 1


def test_demo_runs_with_named_models(tiny_embedder_path, tiny_reranker_path, capsys):
    assert main(["demo", "--model", str(tiny_embedder_path), "--reranker", str(tiny_reranker_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("reranked:") == 2


def test_demo_falls_back_offline_to_minilm(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "falling back to all-MiniLM-L6-v2" in out
    # the real model puts the maize-nitrogen document first for the yellow-leaves query
    first_hit = out.split("query: Why are the lower leaves")[1].splitlines()[1]
    assert "Nitrogen deficiency in maize" in first_hit
