"""`--engine ray` on a real local Ray cluster (`ray start --head --num-cpus 2`, 2 CPU actors): `qembed embed`,
`qembed index build` and `qembed eval` give the ids, vectors and metrics of one process; a Ray build killed
with SIGKILL resumes from its embedding cache; without Ray installed the option fails in one line."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from qembed.cli import main

pytest.importorskip("ray.data")

ROOT = Path(__file__).resolve().parent.parent
DOCS = 2000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # PYTHONFAULTHANDLER: a driver that crashes (one SIGSEGV in a clean-clone run, not reproduced in 3 reruns)
    # prints its Python stack into the stderr that the assertion shows
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray cluster (2 CPUs) of this module in its own session: its address, then stopped (SIGTERM to
    `ray start --block`, which stops what it started; after 5 s, SIGKILL to the rest of its process group)."""
    temp = tempfile.mkdtemp(prefix="qray", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    command = ["ray", "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
               "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard=false",
               "--dashboard-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
               "--ray-client-server-port", str(_free_port()), "--disable-usage-stats", "--temp-dir", temp]  # fmt: skip
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    output = []
    for line in proc.stdout:
        output.append(line)
        if "Ray runtime started" in line:
            break
    else:
        proc.wait()
        pytest.fail("ray start failed:\n" + "".join(output[-20:]))
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of this cluster's session is left
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(shared_dir, tmp_path_factory) -> Path:
    """2,000 distinct STS-B sentences as JSONL (every tenth with a title, a blank line in the middle)."""
    sentences: list[str] = []
    with gzip.open(shared_dir / "data" / "stsb-en" / "stsbenchmark.tsv.gz", "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            for text in (row["sentence1"], row["sentence2"]):
                if text not in sentences[-50:]:
                    sentences.append(text)
    sentences = list(dict.fromkeys(sentences))[:DOCS]
    path = tmp_path_factory.mktemp("ray-corpus") / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(sentences):
            record = {"_id": f"s{i}", "text": text, **({"title": "STS"} if i % 10 == 0 else {})}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            if i == DOCS // 2:
                f.write("\n")
    return path


def _qembed(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qembed", *args], env=_env(), capture_output=True, text=True,
                          timeout=600, **kwargs)  # fmt: skip


def _ray(address: str, batch: int = 256) -> list[str]:
    return ["--engine", "ray", "--ray-address", address, "--ray-actors", "2", "--ray-batch-size", str(batch)]


def _flat_vectors(folder: Path) -> np.ndarray:
    from qembed.index import load_index

    index = load_index(folder / "vectors")
    return index._index.reconstruct_n(0, len(index))


def test_embed_on_ray_equals_one_process(ray_address, corpus, minilm_path, tmp_path, one_torch_thread):
    ray_out, local_out = tmp_path / "ray.jsonl", tmp_path / "local.jsonl"
    done = _qembed("embed", "--model", str(minilm_path), "--input", str(corpus), "--output", str(ray_out),
                   "--cache-dir", str(tmp_path / "cache"), *_ray(ray_address))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["embed", "--model", str(minilm_path), "--input", str(corpus), "--output", str(local_out)]) == 0
    ray_rows = [json.loads(line) for line in ray_out.open(encoding="utf-8")]
    local_rows = [json.loads(line) for line in local_out.open(encoding="utf-8")]
    assert len(ray_rows) == DOCS
    assert [(r["id"], r["text"]) for r in ray_rows] == [(r["id"], r["text"]) for r in local_rows]
    assert ray_rows[0]["text"].startswith("STS ")  # the title joined as one process joins it
    got = np.array([r["embedding"] for r in ray_rows], dtype=np.float32)
    want = np.array([r["embedding"] for r in local_rows], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # the vectors came from the Ray actors, through the embedding cache the driver wrote
    assert _cached_rows(tmp_path / "cache") == DOCS


@pytest.fixture(scope="module")
def local_index(corpus, tiny_embedder_path, tmp_path_factory) -> Path:
    """The one-process `qembed index build` of the corpus with the tiny Qwen3 (the reference)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("local-index") / "index"
    try:
        assert main(["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus),
                     "--output", str(out)]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out


def _cached_rows(cache: Path) -> int:
    """Rows an embedding cache folder holds on disk (its `.keys` files: 20 bytes per row)."""
    return sum(p.stat().st_size for p in cache.rglob("*.keys")) // 20


def _same_index(got: Path, want: Path) -> None:
    assert (got / "docs.jsonl").read_bytes() == (want / "docs.jsonl").read_bytes()  # ids, texts, order
    np.testing.assert_array_equal(np.load(got / "docs.offsets.npy"), np.load(want / "docs.offsets.npy"))
    vectors = _flat_vectors(got)
    assert vectors.shape == (DOCS, 64)
    np.testing.assert_allclose(vectors, _flat_vectors(want), rtol=0, atol=1e-6)


def test_index_build_on_ray_equals_one_process(ray_address, corpus, tiny_embedder_path, local_index, tmp_path):
    out = tmp_path / "ray-index"  # a cache of its own: the session's shared one holds the reference's vectors
    done = _qembed("index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus),
                   "--output", str(out), "--cache-dir", str(tmp_path / "cache"), *_ray(ray_address))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"indexed {DOCS} documents" in done.stdout and f"{DOCS} encoded, 0 from the cache" in done.stdout
    _same_index(out, local_index)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoded"] == DOCS and manifest["count"] == DOCS


def test_parquet_corpus_on_ray_equals_jsonl_in_one_process(ray_address, corpus, tiny_embedder_path, local_index,
                                                           tmp_path):  # fmt: skip
    """A Parquet corpus is read as Ray Data blocks of its rows: the same documents (ids, titles) and vectors
    as the one-process build of the same records as JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in corpus.open(encoding="utf-8") if line.strip()]
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet, row_group_size=300)
    out = tmp_path / "ray-index"
    done = _qembed("index", "build", "--model", str(tiny_embedder_path), "--corpus", str(parquet),
                   "--output", str(out), "--cache-dir", str(tmp_path / "cache"), *_ray(ray_address))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{DOCS} encoded, 0 from the cache" in done.stdout
    _same_index(out, local_index)


def test_killed_ray_build_resumes(ray_address, corpus, tiny_embedder_path, local_index, tmp_path):
    out, cache = tmp_path / "index", tmp_path / "cache"
    args = ["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus), "--output", str(out),
            "--cache-dir", str(cache), *_ray(ray_address, batch=32)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "qembed", *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while _cached_rows(cache) < 4 * 32 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    cached = _cached_rows(cache)
    assert 0 < cached < DOCS
    done = _qembed(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoded"] == DOCS - cached  # only what the killed run had not stored
    assert f"{cached} from the cache" in done.stdout
    _same_index(out, local_index)  # equal to an uninterrupted build


@pytest.fixture(scope="module")
def small_beir(shared_dir, tmp_path_factory) -> Path:
    """An NFCorpus slice: 30 test queries, the documents they judge plus others up to 600, texts cut to
    their first 40 words (so MiniLM encodes it in seconds)."""
    source = shared_dir / "data" / "nfcorpus"
    folder = tmp_path_factory.mktemp("ray-beir")
    qrels: dict[str, list[tuple[str, str]]] = {}
    with (source / "qrels" / "test.tsv").open(encoding="utf-8") as f:
        next(f)
        for line in f:
            qid, did, grade = line.rstrip("\n").split("\t")
            qrels.setdefault(qid, []).append((did, grade))
    chosen = sorted(qrels)[:30]
    judged = {did for qid in chosen for did, _ in qrels[qid]}
    docs = []
    with (source / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["_id"] in judged or len(docs) < 600 - len(judged):
                record["text"] = " ".join(record["text"].split()[:40])
                docs.append(record)
    kept = {d["_id"] for d in docs}
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    queries = [json.loads(line) for line in (source / "queries.jsonl").open(encoding="utf-8")]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries if q["_id"] in chosen))
    (folder / "qrels").mkdir()
    rows = [f"{qid}\t{did}\t{grade}\n" for qid in chosen for did, grade in qrels[qid] if did in kept]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(rows))
    return folder


def test_eval_on_ray_gives_the_same_metrics(ray_address, small_beir, minilm_path, tmp_path, one_torch_thread):
    common = ["eval", "--model", str(minilm_path), "--dataset", str(small_beir), "--k", "1,10,100"]
    done = _qembed(*common, "--output", str(tmp_path / "ray"), "--cache-dir", str(tmp_path / "ray-cache"),
                   *_ray(ray_address))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*common, "--output", str(tmp_path / "local"), "--cache-dir", str(tmp_path / "local-cache")]) == 0
    ray_result = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    local_result = json.loads((tmp_path / "local" / "metrics.json").read_text())
    ray_run, local_run = _first_run(ray_result), _first_run(local_result)
    assert ray_run["num_docs"] == local_run["num_docs"] > 500
    assert ray_run["timings"]["corpus_encoded"] == local_run["timings"]["corpus_encoded"] > 480  # distinct texts
    assert ray_run["metrics"]["ndcg@10"] > 0.05
    assert ray_run["metrics"] == pytest.approx(local_run["metrics"], abs=1e-6)


def _first_run(result) -> dict:
    return result[0] if isinstance(result, list) else result["results"][0]


def test_engine_ray_without_ray_fails_in_one_line(monkeypatch, corpus, tmp_path, capsys):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    for verb in (["embed", "--input", str(corpus), "--output", str(tmp_path / "v.npy")],
                 ["index", "build", "--corpus", str(corpus), "--output", str(tmp_path / "index")]):  # fmt: skip
        assert main([*verb, "--model", "no-model-needed", "--engine", "ray"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install 'qembed[ray]'" in err, err
    assert not (tmp_path / "v.npy").exists() and not (tmp_path / "index").exists()


def test_ray_options_need_engine_ray(corpus, tmp_path, capsys):
    argv = ["embed", "--model", "m", "--input", str(corpus), "--output", str(tmp_path / "v.npy")]
    assert main([*argv, "--ray-address", "127.0.0.1:1"]) == 2
    assert "--ray-address needs --engine ray" in capsys.readouterr().err


def test_bad_corpus_line_on_ray_is_a_one_line_error(ray_address, corpus, tiny_embedder_path, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = corpus.read_text(encoding="utf-8").splitlines()[:40]
    bad.write_text("\n".join([*lines, '{"_id": "x", "text": 5}', *lines[:5]]) + "\n", encoding="utf-8")
    done = _qembed("index", "build", "--model", str(tiny_embedder_path), "--corpus", str(bad),
                   "--output", str(tmp_path / "index"), *_ray(ray_address))  # fmt: skip
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("qembed index: error:") and f"{bad}:41: no field 'text' holding a string" in error
    assert "Traceback" not in done.stderr


def test_device_list_is_the_multi_gpu_shorthand(corpus, tmp_path, capsys, monkeypatch):
    """`--device cuda:0,cuda:1` means Ray with one replica per listed GPU, the driver on the first; here (no
    GPU) it fails in one line before any model loads, as do malformed lists and lists given to other verbs."""
    import torch

    from qembed.cli import build_parser
    from qembed.cli.engine import engine_options

    embed = ["embed", "--model", "no-model-needed", "--input", str(corpus), "--output", str(tmp_path / "v.npy")]
    for device, message in (("cuda:0,cuda:1", "this machine has 0 CUDA device(s)"),
                            ("cpu,cuda:0", "a list names CUDA devices"), ("cuda:1,cuda:1", "named twice")):  # fmt: skip
        assert main([*embed, "--device", device]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    from qembed.errors import QembedError
    from qembed.models.loading import pick_device

    with pytest.raises(QembedError, match="give one device"):  # what every other verb's model load does
        pick_device("cuda:0,cuda:1")
    assert not (tmp_path / "v.npy").exists()
    # on a machine with 4 GPUs (what torch would report there): the Ray plan for GPUs 2 and 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    args = build_parser().parse_args([*embed, "--device", "cuda:2,cuda:3"])
    options = engine_options(args)
    assert (args.engine, args.device, options.actors, options.gpu_ids) == ("ray", "cuda:2", 2, (2, 3))
    args = build_parser().parse_args([*embed, "--device", "cuda:0,cuda:1", "--ray-actors", "3"])
    with pytest.raises(QembedError, match="does not match"):
        engine_options(args)
