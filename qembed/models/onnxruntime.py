"""The int8 CPU path of the Embedder on x86 CPUs without AVX-512 VNNI or AMX: the transformer exported to ONNX,
quantised with NNCF, and run by ONNX Runtime.

Why a second backend (`bench/bench_int8_isa.py`, docs/scale.md "int8 on AVX2-only CPUs"): AVX2 has no int8
dot-product instruction, and OpenVINO's int8 there runs oneDNN's GEMM-based `jit_gemm_i8`, no faster than its
fp32; ONNX Runtime's MLAS has a tuned AVX2 u8s8 kernel. The quantisation is NNCF's, as for OpenVINO
(transformer preset, per-channel weights, activation scales calibrated once on `CALIBRATION_TEXTS`), so a
vector does not depend on the texts batched with it (ONNX Runtime's own dynamic int8 computes scales per batch
and does). The feed-forward down projections stay fp32 (`KEPT_FP32_NODES`): with them in int8 the worst
cosine to fp32 on all-MiniLM-L6-v2 was 0.954, without them 0.993.

`qembed.models.openvino.int8_backend()` chooses between the two backends; tokenising, padding, pooling,
Matryoshka and normalisation stay in `Embedder`. Needs the `cpu-fast` extra (NNCF, onnxruntime, onnx).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from qembed.errors import QembedError
from qembed.models.openvino import (
    calibration_key,
    keep_model,
    openvino_cache_dir,
    prepare_export,
    quiet_export,
)

ONNXRUNTIME_HINT = ("quantize='int8' runs in ONNX Runtime on this CPU (x86 without AVX-512 VNNI or AMX): "
                    "pip install 'qembed[cpu-fast]'")  # fmt: skip
MODEL_FILE = "model.onnx"
RECIPE = "nncf-u8-1"  # part of a kept model's key: change it when the export or quantisation below changes
#: ONNX nodes kept fp32: the feed-forward down projections (Qwen3 `mlp.down_proj`, BERT `layer.N.output.dense`),
#: whose input, after the gate or GELU, has outliers that one calibrated scale per tensor does not hold, and
#: the attention products (two activations: ONNX Runtime has no fused int8 kernel for them on x86). The
#: embedding table (`Gather`) stays fp32 too: ONNX Runtime would dequantise the whole table on every call.
KEPT_FP32_NODES = [r".*(down_proj|layer\.\d+/output/dense)/.*", r".*/(self_attn|attention/self)/MatMul(_\d+)?"]


def check_onnxruntime() -> str:
    """Raise a one-line `QembedError` naming the `cpu-fast` extra when ONNX Runtime, onnx or NNCF is missing;
    returns their versions (NNCF's read from its metadata: it is imported only to quantise)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import onnx
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, nncf {version('nncf')}"
    except (ImportError, PackageNotFoundError) as exc:
        raise QembedError(f"{ONNXRUNTIME_HINT} ({exc})") from None


class OnnxRuntimeEncoder:
    """An int8 ONNX Runtime session called like a transformers base model: `encoder(**batch).last_hidden_state`
    (a float32 CPU tensor). ONNX Runtime keeps nothing per input shape, so batches run as they come."""

    shape_buckets = False

    def __init__(self, session, inputs: Sequence[str], key: str = ""):
        self.session, self.inputs, self.key = session, tuple(inputs), key

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        hidden = self.session.run(["hidden"], {name: batch[name].numpy() for name in self.inputs})[0]
        return SimpleNamespace(last_hidden_state=torch.from_numpy(np.asarray(hidden, dtype=np.float32)))


def quantize_to_onnxruntime(model: torch.nn.Module, calibration: Sequence[dict[str, torch.Tensor]],
                            fingerprint: str | None = None) -> OnnxRuntimeEncoder:  # fmt: skip
    """Export `model` (a transformers base model, fp32 on the CPU) to ONNX and quantise its matrix products to
    int8 with NNCF, activation scales calibrated on `calibration` (a list of collated batches); the session
    runs on as many threads as torch uses. With the weights' `fingerprint`, the quantised model is kept beside
    the OpenVINO ones (`openvino_cache_dir()`) and later loads read it back."""
    versions = check_onnxruntime()
    import onnxruntime as ort

    inputs = list(calibration[0])
    with tempfile.TemporaryDirectory() as scratch:
        settings = f"onnxruntime|{RECIPE}|{fingerprint}|{versions}|torch {torch.__version__}|{inputs}"
        key = calibration_key(settings, calibration)
        folder = openvino_cache_dir() / f"ort-{key}" if fingerprint else Path(scratch) / "model"
        keep_model(folder, MODEL_FILE, lambda tmp: _export_int8(model, calibration, inputs, tmp / MODEL_FILE))
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 3  # warnings about unused initialisers are noise
        session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    return OnnxRuntimeEncoder(session, inputs, key=key)


def _export_int8(model: torch.nn.Module, calibration: Sequence[dict[str, torch.Tensor]], inputs: list[str],
                 target: Path) -> None:  # fmt: skip
    import nncf
    import onnx

    module, example, samples = prepare_export(model, calibration, inputs)
    axes = {name: {0: "batch", 1: "tokens"} for name in [*inputs, "hidden"]}
    kept_fp32 = nncf.IgnoredScope(patterns=KEPT_FP32_NODES, types=["Gather"], validate=False)
    with tempfile.TemporaryDirectory() as scratch, quiet_export():
        fp32 = Path(scratch) / "fp32.onnx"
        torch.onnx.export(module, example, str(fp32), input_names=inputs, output_names=["hidden"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)  # fmt: skip
        quantized = nncf.quantize(onnx.load(str(fp32)), samples, model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration), ignored_scope=kept_fp32)  # fmt: skip
    _activations_to_uint8(quantized)
    onnx.save(quantized, str(target), save_as_external_data=True, location=f"{target.name}.data")


def _activations_to_uint8(model) -> None:
    """Give NNCF's int8 activation quantisers uint8 zero points (+128, the same scale: the same numbers after
    dequantisation). On x86 ONNX Runtime fuses a quantised matrix product into its u8s8 integer kernel only
    with uint8 activations; with int8 ones it dequantises and multiplies in fp32."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    zero_points = {node.input[2] for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and len(node.input) > 2 and node.input[0] not in initializers}  # not a weight's  # fmt: skip
    for name in zero_points:
        tensor = initializers[name]
        if tensor.data_type == TensorProto.INT8:
            shifted = numpy_helper.to_array(tensor).astype(np.int16) + 128
            tensor.CopyFrom(numpy_helper.from_array(shifted.astype(np.uint8), name))
    del graph.value_info[:]  # the quantisers' declared int8 outputs; ONNX Runtime infers the types again
