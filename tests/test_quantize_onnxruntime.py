"""`quantize="int8"` on x86 CPUs without AVX-512 VNNI or AMX: ONNX Runtime static int8
(`qembed.models.onnxruntime`), forced here with `QEMBED_INT8_BACKEND` whatever this CPU is, on the tiny Qwen3
and the real MiniLM; and how `int8_backend()` chooses, on an AVX2 CPU emulated from CPUID where this one can."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qembed import Embedder
from qembed.cli import main
from qembed.errors import QembedError
from qembed.models.onnxruntime import MODEL_FILE, OnnxRuntimeEncoder
from qembed.models.openvino import int8_backend

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["how do I control rice blast?", "Rice blast is controlled with resistant varieties and balanced nitrogen.",
         "稻瘟病的防治方法有哪些？", "x", "Fungicides such as tricyclazole protect rice against blast. " * 12]  # fmt: skip


@pytest.fixture(scope="module")
def ort_cache(tmp_path_factory):
    """ONNX Runtime forced, its models kept in a folder of this module's own."""
    folder = tmp_path_factory.mktemp("ort-cache")
    saved = {name: os.environ.get(name) for name in ("QEMBED_INT8_BACKEND", "QEMBED_OPENVINO_CACHE")}
    os.environ.update(QEMBED_INT8_BACKEND="onnxruntime", QEMBED_OPENVINO_CACHE=str(folder))
    yield folder
    for name, value in saved.items():
        os.environ.pop(name)
        if value is not None:
            os.environ[name] = value


def _weight_sources(path: Path) -> dict[str, str]:
    """For each MatMul and Gather of a kept model: the op type feeding its weight input ('' for a stored fp32
    weight)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {output: node.op_type for node in graph.node for output in node.output}
    return {node.name: producers.get(node.input[1 if node.op_type == "MatMul" else 0], "") for node in graph.node
            if node.op_type in ("MatMul", "Gather") and "embed" in node.name or node.op_type == "MatMul"}  # fmt: skip


@pytest.mark.parametrize("model", ["tiny_qwen3", "minilm"])
def test_onnxruntime_int8_is_close_to_fp32_and_does_not_depend_on_the_batch(model, request, ort_cache,
                                                                            one_torch_thread):  # fmt: skip
    path = request.getfixturevalue("tiny_embedder_path" if model == "tiny_qwen3" else "minilm_path")
    texts, floor = (TEXTS, 0.99) if model == "tiny_qwen3" else (TEXTS[:3], 0.98)
    fp32, int8 = Embedder.from_pretrained(path), Embedder.from_pretrained(path, quantize="int8")
    assert isinstance(int8.inference_model, OnnxRuntimeEncoder)
    assert int8.fingerprint.startswith(f"{fp32.fingerprint}-int8-onnxruntime-")  # never shares a cache with OpenVINO's
    for encode in ("encode_queries", "encode_documents"):
        want, got = getattr(fp32, encode)(texts), getattr(int8, encode)(texts)
        assert got.dtype == np.float32 and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
        assert (got * want).sum(axis=1).min() >= floor and not np.allclose(got, want, atol=1e-4)
    # static scales: a text's vector is the same alone as in any batch
    alone = np.stack([int8.encode([text])[0] for text in TEXTS])
    assert np.allclose(alone, int8.encode(TEXTS), atol=1e-5)
    assert np.allclose(int8.encode(TEXTS, batch_tokens=1), int8.encode(TEXTS), atol=1e-5)
    # the kept graph: linear layers read int8 weights; the feed-forward down projections, the attention products
    # and the embedding table stay fp32, and activations are quantised to uint8 (ONNX Runtime's fused kernel)
    kept = [folder for folder in ort_cache.iterdir() if (folder / MODEL_FILE).exists()]
    sources = {name: kind for folder in kept for name, kind in _weight_sources(folder / MODEL_FILE).items()}
    down = [name for name in sources if "down_proj" in name or ("/output/dense" in name and "attention" not in name)]
    int8_layers = [name for name, kind in sources.items() if kind == "DequantizeLinear"]
    assert down and all(sources[name] == "" for name in down)
    assert len(int8_layers) >= 2 * len(down)
    attention = [name for name in sources if name.endswith(("self_attn/MatMul", "self_attn/MatMul_1", "self/MatMul"))]
    assert attention and not [name for name in attention if sources[name] == "DequantizeLinear"]
    assert [name for name in sources if "Gather" in name and sources[name] == ""]  # the embedding table
    for folder in kept:
        graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
        weights = {tensor.name: tensor for tensor in graph.initializer}
        zero_points = [weights[node.input[2]] for node in graph.node if node.op_type == "QuantizeLinear"]
        assert zero_points and {tensor.data_type for tensor in zero_points} == {onnx.TensorProto.UINT8}


def test_onnxruntime_model_is_kept_and_the_cli_runs_it(tiny_embedder_path, tmp_path, ort_cache, one_torch_thread):
    int8 = Embedder.from_pretrained(tiny_embedder_path, quantize="int8")
    before = {folder: (folder / MODEL_FILE).stat().st_mtime_ns for folder in ort_cache.iterdir()}
    assert before and not [folder for folder in before if ".tmp" in folder.name]
    again = Embedder.from_pretrained(tiny_embedder_path, quantize="int8")
    assert {folder: (folder / MODEL_FILE).stat().st_mtime_ns for folder in ort_cache.iterdir()} == before
    assert np.array_equal(again.encode(TEXTS), int8.encode(TEXTS))
    lines = [text.strip() for text in TEXTS[1:]]  # a text file's lines lose their trailing spaces
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["embed", "--model", str(tiny_embedder_path), "--input", str(docs), "--output",
                 str(tmp_path / "int8.npy"), "--quantize", "int8"]) == 0  # fmt: skip
    assert np.allclose(np.load(tmp_path / "int8.npy"), int8.encode_documents(lines), atol=1e-6)


def test_without_onnxruntime_the_error_is_one_line(tiny_embedder_path, tmp_path, ort_cache, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without the extra sees
    docs = tmp_path / "docs.txt"
    docs.write_text("rice\n", encoding="utf-8")
    assert main(["embed", "--model", str(tiny_embedder_path), "--input", str(docs), "--output",
                 str(tmp_path / "x.npy"), "--quantize", "int8"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "ONNX Runtime" in err and "cpu-fast" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("QEMBED_INT8_BACKEND", raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for vnni, amx, want in ((True, False, "openvino"), (False, True, "openvino"), (False, False, "onnxruntime")):
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda vnni=vnni: vnni)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert int8_backend() == want
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert int8_backend() == "openvino"
    monkeypatch.setenv("QEMBED_INT8_BACKEND", "onnxruntime")
    assert int8_backend() == "onnxruntime"
    monkeypatch.setenv("QEMBED_INT8_BACKEND", "tensorrt")
    with pytest.raises(QembedError, match="use one of openvino, onnxruntime"):
        int8_backend()


def test_an_avx2_cpu_gets_onnxruntime(tmp_path):
    """The choice reads CPUID: with CPUID answered as an AVX2-only CPU (bench/cpuid_avx2.c, where this CPU can
    fault CPUID) or on a real one, a fresh process picks ONNX Runtime; a VNNI CPU that cannot emulate keeps
    OpenVINO."""
    env = {key: value for key, value in os.environ.items() if key != "QEMBED_INT8_BACKEND"}
    can_emulate = platform.machine() == "x86_64" and "cpuid_fault" in Path("/proc/cpuinfo").read_text()
    if can_emulate:
        library = tmp_path / "cpuid_avx2.so"
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(ROOT / "bench" / "cpuid_avx2.c")],
                       check=True)  # fmt: skip
        env["LD_PRELOAD"] = str(library)
    code = ("import torch; from qembed.models.openvino import int8_backend; "
            "print(torch.cpu._is_vnni_supported(), int8_backend())")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=True)  # fmt: skip
    vnni, backend = done.stdout.split()
    assert backend == ("openvino" if vnni == "True" else "onnxruntime")
    if can_emulate:
        assert (vnni, backend) == ("False", "onnxruntime")
