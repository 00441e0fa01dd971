"""Does ONNX Runtime's dynamic int8 give a text a vector that depends on the batch it runs in?

The all-MiniLM-L6-v2 transformer is exported to ONNX (as `bench_int8_isa.py` does), quantised with
`onnxruntime.quantization.quantize_dynamic` (int8 weights; activations quantised per tensor at run time), and
run through qembed's tokenising, padding and pooling. Prints the lowest cosine to fp32 and how far a text's
vector moves between being encoded alone and in one padded batch with five other texts; qembed's shipped
int8 path (static activation scales; OpenVINO or, on AVX2-only CPUs, ONNX Runtime) is printed alongside.

    python bench/check_ort_batch_dependence.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import cpu_flags_line  # noqa: E402

TEXTS = ["how do I control rice blast?", "Rice blast is controlled with resistant varieties and balanced nitrogen.",
         "稻瘟病的防治方法有哪些？", "x", "Fungicides such as tricyclazole protect rice against blast. " * 12,
         "The Eiffel Tower was completed in 1889 for the World's Fair and stands about 330 metres tall."]  # fmt: skip


def ort_int8(embedder, work: Path):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from qembed.models.onnxruntime import OnnxRuntimeEncoder
    from qembed.models.openvino import _HiddenStates

    batch = embedder.collate(embedder.prepare(TEXTS[:3]))
    inputs = list(batch)
    module = _HiddenStates(embedder.model, inputs).eval()
    axes = {name: {0: "batch", 1: "tokens"} for name in [*inputs, "hidden"]}
    with torch.no_grad():
        torch.onnx.export(module, tuple(batch[name] for name in inputs), str(work / "fp32.onnx"), input_names=inputs,
                          output_names=["hidden"], dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    quantize_dynamic(str(work / "fp32.onnx"), str(work / "int8.onnx"), weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return OnnxRuntimeEncoder(ort.InferenceSession(str(work / "int8.onnx"), options, providers=["CPUExecutionProvider"]), inputs)


def report(name: str, embedder, fp32: np.ndarray) -> None:
    together = embedder.encode(TEXTS)
    alone = np.concatenate([embedder.encode([text]) for text in TEXTS])
    print(f"{name}: lowest cosine to fp32 {(together * fp32).sum(axis=1).min():.4f}; alone vs in the batch: largest "
          f"difference {np.abs(together - alone).max():.2e}, lowest cosine {(together * alone).sum(axis=1).min():.6f}")  # fmt: skip


def main() -> None:
    from qembed import Embedder
    from qembed.testing import minilm_dir

    warnings.simplefilter("ignore")
    print(cpu_flags_line())
    embedder = Embedder.from_pretrained(str(minilm_dir()))
    fp32 = embedder.encode(TEXTS)
    int8 = Embedder.from_pretrained(str(minilm_dir()), quantize="int8")
    report(f"qembed int8 ({type(int8.inference_model).__name__}, static scales)", int8, fp32)
    with tempfile.TemporaryDirectory() as work:
        embedder.inference_model = ort_int8(embedder, Path(work))
        report("ONNX Runtime dynamic int8", embedder, fp32)


if __name__ == "__main__":
    main()
