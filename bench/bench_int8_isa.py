"""int8 on AVX2-only CPUs: qembed `quantize="int8"` against sentence-transformers fp32 with the CPU's ISA cut to
AVX2, and what else could run the model there (OpenVINO fp32, ONNX Runtime dynamic and static int8, fp32).

How AVX2 is emulated on an AVX-512 machine: every variant runs in its own process started with
`LD_PRELOAD=cpuid_avx2.so` (`bench/cpuid_avx2.c`, compiled here with gcc): CPUID is made to fault (Linux
`ARCH_SET_CPUID`, CPU flag `cpuid_fault`) and answered with the real values minus AVX-512, AVX-VNNI, AVX-512/AMX
BF16 and AMX. All libraries decide from CPUID, so all of them take their AVX2 paths: OpenVINO and oneDNN (its
`OPTIMIZATION_CAPABILITIES` lose BF16; the executed graph's primitive types are printed: jit_avx2 / brgemm_avx2 /
jit_gemm_i8 instead of *_avx512* / *amx*), MKL (`MKL_VERBOSE` names AVX2), PyTorch (`get_cpu_capability()`),
ONNX Runtime's MLAS. (oneDNN's `ONEDNN_MAX_CPU_ISA=AVX2` alone is not enough: OpenVINO then still picks bf16
inference precision, fails to compile Softmax, and runs RMS/FakeQuantize with avx512 kernels.)

Model: the Qwen3-Embedding-0.6B configuration with random weights and the real Qwen tokenizer, `--layers`
decoder layers (28 in the real model; fewer keep the run short; per-layer work is identical, so ratios between
variants change little, except that the embedding lookup and the per-call overheads weigh a little more).
Texts: the realistic mix of `bench/common.py` (12..473 tokens). Every variant runs in both orders (alternating),
best of `--repeats` timed runs each; it prints tokens/s, the ratio to sentence-transformers fp32 in the same ISA,
and the smallest cosine to qembed fp32's vectors.

    python bench/bench_int8_isa.py [--layers 4] [--texts 16] [--repeats 2] [--isa avx2,native] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import ROOT, cpu_flags_line, realistic_texts  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = {  # name -> what the worker runs
    "sentence-transformers fp32": "st-fp32",
    "qembed fp32 (torch)": "qembed-fp32",
    "qembed int8 (as shipped: int8_backend() picks)": "qembed-int8",
    "qembed int8, OpenVINO forced": "qembed-int8-ov",
    "qembed int8, ONNX Runtime forced": "qembed-int8-ort",
    "qembed + OpenVINO fp32": "ov-fp32",
    "qembed + OpenVINO int8 weights only": "ov-w8",
    "qembed + ONNX Runtime dynamic int8": "ort-int8",
    "qembed + ONNX Runtime static int8 (QDQ)": "ort-static",
    "qembed + ONNX Runtime fp32": "ort-fp32",
}
BASE = "sentence-transformers fp32"


# ---------------------------------------------------------------- exports (made once, outside the ISA limit)
def _export(model_dir: Path, work: Path) -> None:
    """OpenVINO fp32 and weight-only int8 IR, ONNX fp32 and ONNX Runtime dynamic int8 of the base model."""
    import warnings

    import nncf
    import openvino as ov
    import torch

    from qembed import Embedder
    from qembed.models.openvino import CALIBRATION_TEXTS, _HiddenStates
    from qembed.models.prompts import MODEL_DEFAULT

    warnings.simplefilter("ignore")
    embedder = Embedder.from_pretrained(model_dir, device="cpu", dtype="fp32")
    batch = embedder.collate(embedder.prepare(list(CALIBRATION_TEXTS[:3])))
    inputs = list(batch)
    embedder.model.set_attn_implementation("eager")  # as qembed's int8 export
    module = _HiddenStates(embedder.model, inputs).eval()
    example = tuple(batch[name] for name in inputs)
    with torch.no_grad():
        graph = ov.convert_model(module, example_input=example)
        for port, name in zip(graph.inputs, inputs):
            port.get_tensor().set_names({name})
        ov.save_model(graph, work / "ov-fp32.xml", compress_to_fp16=False)
        weights = nncf.compress_weights(graph, mode=nncf.CompressWeightsMode.INT8_ASYM)
        ov.save_model(weights, work / "ov-w8.xml", compress_to_fp16=False)
        axes = {name: {0: "batch", 1: "tokens"} for name in [*inputs, "hidden"]}
        torch.onnx.export(module, example, str(work / "ort-fp32.onnx"), input_names=inputs, output_names=["hidden"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(work / "ort-fp32.onnx"), str(work / "ort-int8.onnx"), weight_type=QuantType.QInt8)
    # static int8: activation scales calibrated once on qembed's calibration texts (as its OpenVINO int8), so
    # a text's vector does not depend on the batch it is in; weights per channel
    texts = list(CALIBRATION_TEXTS)
    token_ids = embedder.prepare(texts, prompt=embedder.document_prompt) + embedder.prepare(texts, instruction=MODEL_DEFAULT)
    calibration = [embedder.collate([ids]) for ids in token_ids]  # one text a batch, as qembed's int8
    _quantize_static(work / "ort-fp32.onnx", work / "ort-static.onnx", calibration, inputs)
    (work / "inputs.json").write_text(json.dumps(inputs))


def _quantize_static(source: Path, target: Path, calibration: list, inputs: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: batch[name].numpy() for name in inputs} for batch in calibration])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(source), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])  # fmt: skip


# ---------------------------------------------------------------- worker (one variant, one process)
def _ov_evidence(compiled) -> dict:
    """Primitive types and precisions of the matrix products in the executed graph, and where the time went."""
    kinds = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer.startswith(("FullyConnected", "MatMul")):
            kinds[f"{layer}:{info['primitiveType'].astype(str)}:{info['runtimePrecision'].astype(str)}"] += 1
    return {"matmuls": dict(kinds), "precision": str(compiled.get_property("INFERENCE_PRECISION_HINT"))}


def _ov_profile(compiled, feed) -> list[str]:
    request = compiled.create_infer_request()
    request.infer(feed)
    times = collections.defaultdict(float)
    for item in request.profiling_info:
        times[f"{item.node_type}/{item.exec_type}"] += item.real_time.total_seconds()
    total = sum(times.values())
    return [f"{name} {t / total:.0%}" for name, t in sorted(times.items(), key=lambda x: -x[1])[:6]]


def worker(args) -> None:
    import torch

    work = Path(args.work_dir)
    texts = json.loads((work / "texts.json").read_text(encoding="utf-8"))
    kind = args.worker
    compiled = None
    facts: dict = {"torch_isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    if kind == "st-fp32":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(args.model_dir, device="cpu")

        def encode(batch):
            return model.encode(batch, batch_size=16, normalize_embeddings=True)
    else:
        from qembed import Embedder

        quantize = "int8" if kind.startswith("qembed-int8") else None
        embedder = Embedder.from_pretrained(args.model_dir, device="cpu", dtype="fp32", quantize=quantize)
        inputs = json.loads((work / "inputs.json").read_text())
        if kind in ("ov-fp32", "ov-w8"):
            import openvino as ov

            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
            compiled = ov.Core().compile_model(work / f"{kind}.xml", "CPU", config)
            from qembed.models.openvino import OpenVINOEncoder

            embedder.inference_model = OpenVINOEncoder(compiled, inputs)
        elif kind.startswith("ort-"):
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(work / f"{kind}.onnx"), options, providers=["CPUExecutionProvider"])
            from qembed.models.onnxruntime import OnnxRuntimeEncoder

            embedder.inference_model = OnnxRuntimeEncoder(session, inputs)
        elif quantize:
            facts["int8_backend"] = type(embedder.inference_model).__name__
            compiled = getattr(embedder.inference_model, "compiled", None)
        if compiled is not None:
            import openvino as ov

            facts["openvino_caps"] = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            if args.profile:
                batch = embedder.collate(embedder.prepare(texts[len(texts) // 2 : len(texts) // 2 + 4]))
                xml = _int8_xml() if quantize else work / f"{kind}.xml"
                config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
                profiled = ov.Core().compile_model(xml, "CPU", {**config, "PERF_COUNT": True})
                facts["profile"] = _ov_profile(profiled, {n: batch[n].numpy() for n in inputs})
        encode = embedder.encode
    encode(texts[:2])
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        vectors = np.asarray(encode(texts), dtype=np.float32)
        best = min(best, time.perf_counter() - start)
    if compiled is not None:
        facts.update(_ov_evidence(compiled))  # after inference: dynamic shapes leave kernels undecided until then
    np.save(work / f"{kind}.npy", vectors)
    print(json.dumps({"seconds": best, **facts}))


def _int8_xml() -> Path:
    """The quantised model qembed kept (the bench gives qembed a cache folder of its own)."""
    return next(Path(os.environ["QEMBED_OPENVINO_CACHE"]).glob("*/model.xml"))


# ---------------------------------------------------------------- driver
def build_preload(work: Path) -> Path:
    library = work / "cpuid_avx2.so"
    if not library.exists():
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(HERE / "cpuid_avx2.c")], check=True)
    return library


def run_variant(args, kind: str, isa: str, work: Path, preload: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QEMBED_OPENVINO_CACHE": str(work / "openvino-cache")}
    if isa == "avx2":
        env["LD_PRELOAD"] = str(preload)
    forced = {"qembed-int8-ov": "openvino", "qembed-int8-ort": "onnxruntime"}.get(kind)
    env.pop("QEMBED_INT8_BACKEND", None)
    if forced:
        env["QEMBED_INT8_BACKEND"] = forced
    cmd = [sys.executable, __file__, "--worker", kind, "--model-dir", str(args.model_dir), "--work-dir", str(work),
           "--repeats", str(args.repeats)] + (["--profile"] if args.profile else [])  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip() or f"exit {done.returncode}").splitlines()[-1][:200])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen3-Embedding-0.6B has 28)")
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--isa", default="avx2,native", help="avx2 (emulated), native, or both")
    parser.add_argument("--variants", default=",".join(VARIANTS.values()))
    parser.add_argument("--profile", action="store_true", help="also print OpenVINO's per-op time shares")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from qembed.testing import QWEN3_EMBEDDING_0_6B, build_qwen3_embedding, build_qwen_tokenizer

    name = f"l{args.layers}" if args.model_dir is None else args.model_dir.parent.name  # exports are per model
    work = Path(tempfile.gettempdir()) / f"qembed-bench-int8-isa-{name}"
    work.mkdir(exist_ok=True)
    args.model_dir = args.model_dir or work / "model"
    print(f"{cpu_flags_line()}\n{os.cpu_count()} cpus; load average {os.getloadavg()[0]:.1f} at start, "
          f"{time.strftime('%H:%M')} (the machine is shared: figures are indicative)")  # fmt: skip
    if not (args.model_dir / "model.safetensors").exists():
        build_qwen3_embedding(args.model_dir, **{**QWEN3_EMBEDDING_0_6B, "num_hidden_layers": args.layers})
    if not all((work / name).exists() for name in ("inputs.json", "ort-static.onnx")):
        print("exporting OpenVINO / ONNX variants ...", flush=True)
        _export(args.model_dir, work)
    preload = build_preload(work)
    texts = realistic_texts(build_qwen_tokenizer(), count=args.texts)
    (work / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    from qembed import Embedder

    tokens = sum(len(ids) for ids in Embedder.from_pretrained(args.model_dir, device="cpu").prepare(texts))
    model = args.model_dir if (work / "model") != args.model_dir else f"Qwen3-Embedding-0.6B config, {args.layers} layers, random weights"
    print(f"model: {model}; {len(texts)} texts, {tokens} tokens (Qwen tokenizer); best of 2 passes (alternating "
          f"order) x {args.repeats}")  # fmt: skip
    wanted = [name for name, kind in VARIANTS.items() if kind in args.variants.split(",")]
    for isa in args.isa.split(","):
        best: dict[str, float] = {}
        facts: dict[str, dict] = {}
        for order in (wanted, wanted[::-1]):
            for name in order:
                if name in facts and "error" in facts[name]:
                    continue
                try:
                    result = run_variant(args, VARIANTS[name], isa, work, preload)
                except RuntimeError as exc:
                    facts[name] = {"error": str(exc)}
                    print(f"  [{isa}] {name}: failed ({exc})", flush=True)
                    continue
                best[name] = min(best.get(name, float("inf")), result.pop("seconds"))
                facts[name] = result
                print(f"  [{isa}] {name}: {tokens / best[name]:.1f} tokens/s", flush=True)
        reference = np.load(work / "qembed-fp32.npy") if "qembed fp32 (torch)" in best else None
        print(f"\n== ISA {isa}: {next(iter(facts.values()), {}).get('torch_isa', '?')} (torch), OpenVINO caps "
              f"{next((f['openvino_caps'] for f in facts.values() if 'openvino_caps' in f), '-')}")  # fmt: skip
        print(f"| {'variant':<42} | tokens/s | vs ST fp32 | vs qembed fp32 | min cos to qembed fp32 |")
        for name, seconds in best.items():
            base = best.get(BASE)
            fp32 = best.get("qembed fp32 (torch)")
            cosine = "-"
            if reference is not None:
                cosine = f"{float(np.min((np.load(work / f'{VARIANTS[name]}.npy') * reference).sum(axis=1))):.4f}"
            vs_base = f"{base / seconds:.2f}x" if base else "-"
            vs_fp32 = f"{fp32 / seconds:.2f}x" if fp32 else "-"
            print(f"| {name:<42} | {tokens / seconds:8.1f} | {vs_base:>10} | {vs_fp32:>14} | {cosine:>22} |")
        for name, fact in facts.items():
            shown = {k: v for k, v in fact.items() if k in ("int8_backend", "matmuls", "precision", "profile", "error")}
            if shown:
                print(f"  {name}: {json.dumps(shown)}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
