"""`qembed embed` streams: each chunk appended and flushed, a SIGKILLed run continued by the same command
without duplicates (JSONL and NPY), the same vectors as `Embedder.encode`, Parquet output in row groups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qembed.cli import main

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["rice blast", "maize rust", "tea", "soil", "water", "sugar", "水稻稻瘟病"]


def _texts(n):
    return [f"text {i} about {TOPICS[i % len(TOPICS)]} in wet weather, note {i * 7919 % 1000}" for i in range(n)]


@pytest.mark.parametrize("suffix", [".jsonl", ".npy"])
def test_killed_embed_resumes_without_duplicates(tiny_embedder_path, tmp_path, suffix):
    n = 200
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(_texts(n)) + "\n", encoding="utf-8")
    output = tmp_path / f"out{suffix}"
    command = [sys.executable, "-m", "qembed", "embed", "--model", str(tiny_embedder_path), "--input", str(source),
               "--output", str(output), "--chunk-size", "20", "--batch-tokens", "512"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QEMBED_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = 0
    for line in run.stderr:
        if line.startswith("qembed: embed: "):
            done = int(line.split(": ")[2].split("/")[0])
            if done >= 60:
                run.send_signal(signal.SIGKILL)
                break
    run.wait()
    assert run.returncode == -signal.SIGKILL and 0 < done < n
    state = output.with_name(output.name + ".qembed-embed.json")
    assert state.is_file()
    again = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"wrote {n} embeddings" in again.stdout and "from an earlier, interrupted run" in again.stdout
    resumed = int(again.stdout.split("(")[1].split(" ")[0])
    assert resumed >= 40  # whole chunks written before the kill were kept, not encoded again
    assert not state.exists()
    from qembed import Embedder

    want = Embedder.from_pretrained(tiny_embedder_path).encode_documents(_texts(n))
    if suffix == ".jsonl":
        records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
        assert [r["index"] for r in records] == list(range(n)) and [r["id"] for r in records] == [str(i + 1) for i in range(n)]
        got = np.asarray([r["embedding"] for r in records], dtype=np.float32)
    else:
        got = np.load(output)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_parquet_output(minilm_path, tmp_path, one_torch_thread):
    import pyarrow.parquet as pq

    from qembed import Embedder

    source = tmp_path / "texts.txt"
    source.write_text("\n".join(_texts(30)) + "\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    assert main(["embed", "--model", str(minilm_path), "--input", str(source), "--output", str(out), "--queries",
                 "--chunk-size", "8"]) == 0  # fmt: skip
    table = pq.read_table(out)
    assert pq.ParquetFile(out).metadata.num_row_groups == 4  # one row group per chunk, written as it went
    assert table.column("index").to_pylist() == list(range(30)) and table.column("text").to_pylist() == _texts(30)
    got = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, Embedder.from_pretrained(minilm_path).encode_queries(_texts(30)), atol=1e-6)
