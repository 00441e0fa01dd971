"""The int8 CPU path (`quantize="int8"`): quality against fp32, unchanged semantics (instructions, Matryoshka,
reranker yes/no), caches that never mix int8 and fp32 vectors, the CLI flag, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from qembed import Embedder, Reranker
from qembed.cache import CacheStats
from qembed.cli import main
from qembed.encode import encode_with_cache
from qembed.errors import QembedError
from qembed.models.batching import bucket_up, row_bucket_up
from qembed.models.prompts import format_query

TEXTS = ["how do I control rice blast?", "Rice blast is controlled with resistant varieties and balanced nitrogen.",
         "稻瘟病的防治方法有哪些？", "x", "Fungicides such as tricyclazole protect rice against blast. " * 12]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def openvino_backend():
    """These are tests of the OpenVINO path, whichever backend this CPU would get (`int8_backend`; ONNX Runtime's
    path: tests/test_quantize_onnxruntime.py)."""
    saved = os.environ.get("QEMBED_INT8_BACKEND")
    os.environ["QEMBED_INT8_BACKEND"] = "openvino"
    yield
    os.environ.pop("QEMBED_INT8_BACKEND")
    if saved is not None:
        os.environ["QEMBED_INT8_BACKEND"] = saved


@pytest.fixture(scope="module")
def embedders(tiny_embedder_path):
    return Embedder.from_pretrained(tiny_embedder_path), Embedder.from_pretrained(tiny_embedder_path, quantize="int8")


def test_int8_vectors_close_to_fp32_with_the_same_semantics(embedders, one_torch_thread):
    fp32, int8 = embedders
    assert int8.quantize == "int8" and fp32.quantize is None
    assert type(int8.inference_model).__name__ == "OpenVINOEncoder" and fp32.inference_model is None
    for encode in ("encode_queries", "encode_documents"):
        want, got = getattr(fp32, encode)(TEXTS), getattr(int8, encode)(TEXTS)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
        assert (got * want).sum(axis=1).min() >= 0.99
    # instructions: the same template as fp32 (a query with its instruction == that text embedded bare)
    queries = int8.encode_queries(TEXTS)
    bare = int8.encode([format_query(t, int8.default_instruction) for t in TEXTS])
    assert np.allclose(queries, bare, atol=1e-6)
    assert not np.allclose(queries, int8.encode(TEXTS), atol=1e-3)
    # static scales: a vector does not depend on the texts sharing its batch
    assert np.allclose(int8.encode(TEXTS, batch_tokens=1), int8.encode(TEXTS), atol=1e-5)
    # Matryoshka: the first 32 components re-normalised, as in fp32
    full, small = int8.encode(TEXTS), int8.encode(TEXTS, dim=32)
    head = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    assert small.shape == (len(TEXTS), 32) and np.allclose(small, head, atol=1e-5)
    assert (small * fp32.encode(TEXTS, dim=32)).sum(axis=1).min() >= 0.99


def test_int8_runs_in_bucketed_shapes_and_padding_changes_nothing(embedders, minilm_path, one_torch_thread):
    """OpenVINO keeps kernels and buffers per input shape, so every batch runs padded to ladder shapes (left
    padding for the Qwen3 decoder, right for MiniLM) and the padding leaves the real tokens' states as they
    are in the exact shape."""
    texts = ["rice " * n + "blast" for n in range(1, 80)]
    for int8 in (embedders[1], Embedder.from_pretrained(minilm_path, quantize="int8")):
        encoder, compiled = int8.inference_model, int8.inference_model.compiled
        shapes: list[tuple[int, int]] = []
        encoder.compiled = lambda feed, run=compiled, seen=shapes: (seen.append(feed["input_ids"].shape), run(feed))[1]
        int8.encode(texts, batch_tokens=700)
        assert shapes and all(rows == row_bucket_up(rows) and width == bucket_up(width) for rows, width in shapes)
        batch = int8.collate(int8.prepare(texts[8:17]))  # 9 rows, 11+ columns: not ladder sizes
        rows, width = batch["input_ids"].shape
        assert (row_bucket_up(rows), bucket_up(width)) != (rows, width)
        exact = compiled({name: batch[name].numpy() for name in encoder.inputs})[0]
        padded = encoder(**batch).last_hidden_state.numpy()
        real = batch["attention_mask"].numpy().astype(bool)
        assert padded.shape == exact.shape and np.allclose(padded[real], exact[real], atol=1e-4)


PARAGRAPH = ("Rice blast, caused by the fungus Magnaporthe oryzae, is among the most destructive diseases of rice "
             "worldwide. Lesions form on leaves, nodes and panicles; under humid, warm conditions with heavy "
             "nitrogen fertilisation an epidemic can destroy most of a field within weeks. Farmers combine "
             "resistant varieties, balanced fertiliser, careful water management and, where needed, fungicides "
             "applied at the booting stage to keep losses low.")


@pytest.fixture(scope="module")
def minilm_embedders(minilm_path):
    return Embedder.from_pretrained(minilm_path), Embedder.from_pretrained(minilm_path, quantize="int8")


def test_int8_minilm_tracks_fp32_at_every_width(minilm_embedders, one_torch_thread):
    """Every length from 3 to 72 tokens, so every ladder width from 3 to 80, exact and padded: int8 stays at
    cosine >= 0.98 to fp32. With OpenVINO's default precision on CPUs with bf16 units (bfloat16), the texts
    run at width 32 fell to 0.90; the unquantised operations now run in float32."""
    fp32, int8 = minilm_embedders
    ids = fp32.prepare([PARAGRAPH])[0]
    assert len(ids) > 72
    texts = [ids[: n - 1] + ids[-1:] for n in range(3, 73)]  # the first n-1 tokens and [SEP]
    want = np.stack([fp32.encode_batch([t])[0] for t in texts])
    got = np.stack([int8.encode_batch([t])[0] for t in texts])
    cosine = (want * got).sum(axis=1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() >= 0.98, {len(t): round(float(c), 3) for t, c in zip(texts, cosine) if c < 0.98}


def test_corpus_encoding_runs_one_shape_per_width(minilm_embedders, monkeypatch, one_torch_thread):
    """The encode pipeline pads a chunk's last, short batch with copies of its first row up to a full batch's
    rows, so an encoder's corpus runs in one shape per width (OpenVINO keeps memory per shape), with the same
    vectors as `encode` of each chunk."""
    from qembed.encode import CachedEncoder, NoCache
    from qembed.models.batching import full_rows

    int8 = minilm_embedders[1]
    encoder, compiled = int8.inference_model, int8.inference_model.compiled
    shapes: list[tuple[int, int]] = []
    monkeypatch.setattr(encoder, "compiled", lambda feed: (shapes.append(feed["input_ids"].shape), compiled(feed))[1])
    texts = [("rice " * (1 + i % 40)) + f"blast {i}" for i in range(300)]
    pipeline = CachedEncoder(int8, cache=NoCache(), batch_tokens=1024, normalize=True)
    got = np.concatenate([v for _, v in pipeline.iter_chunks(texts, chunk_size=100, show_progress=False)])
    widths = {width for _, width in shapes}
    assert len(widths) > 3 and sorted(set(shapes)) == sorted((full_rows(w, 1024), w) for w in widths)
    shapes.clear()
    want = np.concatenate([int8.encode(texts[start : start + 100], batch_tokens=1024) for start in (0, 100, 200)])
    assert any(rows < full_rows(width, 1024) for rows, width in shapes)  # `encode` (a query, a server) pads less
    assert np.allclose(got, want, atol=1e-5)  # the same batches: the added rows change nothing


def test_quantised_model_is_kept_and_read_back(embedders, tiny_embedder_path, openvino_cache, one_torch_thread):
    """The first int8 load exports and calibrates, then keeps the quantised model; later loads read it back
    and give the same vectors."""
    _, int8 = embedders
    kept = [folder for folder in openvino_cache.iterdir() if (folder / "model.xml").exists()]
    assert kept and not [folder for folder in openvino_cache.iterdir() if ".tmp" in folder.name]
    stamps = {folder: (folder / "model.xml").stat().st_mtime_ns for folder in kept}
    before = sorted(openvino_cache.iterdir())
    again = Embedder.from_pretrained(tiny_embedder_path, quantize="int8")
    assert {folder: (folder / "model.xml").stat().st_mtime_ns for folder in kept} == stamps  # read, not rewritten
    assert sorted(openvino_cache.iterdir()) == before  # nothing new kept
    assert np.array_equal(again.encode(TEXTS), int8.encode(TEXTS))
    # a process that reads a kept model never imports NNCF (only quantising needs it: 40 MiB saved)
    code = (f"import sys; from qembed import Embedder; Embedder.from_pretrained({str(tiny_embedder_path)!r}, "
            "quantize='int8').encode(['x']); print('nncf' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                          env={**os.environ, "QEMBED_OPENVINO_CACHE": str(openvino_cache)})  # fmt: skip
    assert done.stdout.strip() == "False"


def test_cache_never_mixes_int8_and_fp32(embedders, tmp_path, one_torch_thread):
    fp32, int8 = embedders
    assert int8.fingerprint != fp32.fingerprint and int8.fingerprint.startswith(fp32.fingerprint)
    first, second, third = CacheStats(), CacheStats(), CacheStats()
    want = encode_with_cache(fp32, TEXTS, cache_dir=tmp_path, stats=first)
    got = encode_with_cache(int8, TEXTS, cache_dir=tmp_path, stats=second)  # nothing reused from fp32
    assert (first.encoded, second.encoded, second.hits) == (len(TEXTS), len(TEXTS), 0)
    assert not np.array_equal(got, want)
    assert np.array_equal(encode_with_cache(int8, TEXTS, cache_dir=tmp_path, stats=third), got)
    assert third.encoded == 0  # ... but int8 reuses its own


def test_int8_on_minilm_and_without_the_extra(minilm_embedders, minilm_path, tmp_path, monkeypatch, capsys,
                                              one_torch_thread):  # fmt: skip
    """A BERT-style encoder (mean pooling, right padding) takes the same path; an int8 embedder cannot be saved
    (it is for inference); without OpenVINO/NNCF the error is one line naming the `cpu-fast` extra."""
    fp32, int8 = minilm_embedders
    want, got = fp32.encode(TEXTS[:3]), int8.encode(TEXTS[:3])
    assert (got * want).sum(axis=1).min() >= 0.98
    with pytest.raises(QembedError, match="inference only"):
        int8.save_pretrained(tmp_path / "int8")
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without the extra sees
    with pytest.raises(QembedError, match=r"pip install 'qembed\[cpu-fast\]'"):
        Embedder.from_pretrained(minilm_path, quantize="int8")
    docs = tmp_path / "docs.txt"
    docs.write_text("rice\n", encoding="utf-8")
    assert main(["embed", "--model", str(minilm_path), "--input", str(docs), "--output", str(tmp_path / "x.npy"),
                 "--quantize", "int8"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "cpu-fast" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_int8_reranker_keeps_yes_no_scoring(tiny_reranker_path, one_torch_thread):
    fp32 = Reranker.from_pretrained(tiny_reranker_path)
    int8 = Reranker.from_pretrained(tiny_reranker_path, quantize="int8")
    assert int8.quantize == "int8" and "QuantizedLinear" in repr(int8.model.get_decoder())
    assert isinstance(int8.model.get_output_embeddings().weight, torch.Tensor)  # the yes/no head stays fp32
    want, got = fp32.score(TEXTS[0], TEXTS[1:]), int8.score(TEXTS[0], TEXTS[1:])
    assert got == pytest.approx(want, abs=0.02) and got != want


def test_cli_quantize_flag(tiny_embedder_path, tiny_reranker_path, tmp_path, capsys, one_torch_thread):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(TEXTS[1:]) + "\n", encoding="utf-8")
    for flags, name in (([], "fp32.npy"), (["--quantize", "int8"], "int8.npy")):
        assert main(["embed", "--model", str(tiny_embedder_path), "--input", str(docs), "--output",
                     str(tmp_path / name), *flags]) == 0  # fmt: skip
    want, got = np.load(tmp_path / "fp32.npy"), np.load(tmp_path / "int8.npy")
    assert not np.array_equal(got, want) and (got * want).sum(axis=1).min() >= 0.99
    capsys.readouterr()
    assert main(["rerank", "--model", str(tiny_reranker_path), "--query", TEXTS[0], "--input", str(docs),
                 "--quantize", "int8"]) == 0  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(TEXTS) - 1 and all(0 <= line["score"] <= 1 for line in lines)
    # bad combinations: one line, exit status 2
    assert main(["embed", "--model", str(tiny_embedder_path), "--input", str(docs), "--output",
                 str(tmp_path / "x.npy"), "--quantize", "int8", "--dtype", "bf16"]) == 2  # fmt: skip
    assert "starts from fp32 weights" in capsys.readouterr().err
    with pytest.raises(QembedError, match="CPU only"):
        Embedder.from_pretrained(tiny_embedder_path, quantize="int8", device="meta")
    with pytest.raises(QembedError, match="unknown quantize"):
        Reranker.from_pretrained(tiny_reranker_path, quantize="int4")


def test_eval_records_quantize(tiny_embedder_path, tmp_path, one_torch_thread):
    from qembed.data.beir import write_beir

    corpus = {f"d{i}": {"title": "", "text": text} for i, text in enumerate(TEXTS)}
    write_beir(tmp_path / "beir", corpus, {"q0": "rice blast"}, {"test": {"q0": {"d1": 1}}})
    assert main(["eval", "--model", str(tiny_embedder_path), "--dataset", str(tmp_path / "beir"), "--k", "1,5",
                 "--quantize", "int8", "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out")]) == 0  # fmt: skip
    entry = json.loads((tmp_path / "out" / "metrics.json").read_text())[0]
    assert entry["quantize"] == "int8"
    assert "int8" in (tmp_path / "out" / "report.md").read_text()
