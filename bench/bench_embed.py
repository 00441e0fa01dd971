"""Embedding throughput on CPU: qembed fp32 and int8 against sentence-transformers' CPU backends.

Two models: the Qwen3-Embedding-0.6B architecture (random weights, real Qwen tokenizer) and the real
all-MiniLM-L6-v2. Each embeds the same realistic mix of texts (~10 to ~500 tokens) with:
sentence-transformers fp32 (torch), `backend="onnx"`, ONNX int8 (`export_dynamic_quantized_onnx_model`,
avx512_vnni) and `backend="openvino"` (whichever of these install), qembed fp32 and qembed int8
(`quantize="int8"`). It prints tokens/s, the ratio to sentence-transformers fp32 and the smallest cosine
to qembed fp32's vectors. Variants are loaded one at a time (the 0.6B model is 2.4 GB per copy); every
variant runs twice, in one order and then in the reverse order, and its best time counts.

    python bench/bench_embed.py [--models qwen3,minilm] [--qwen3-texts 27] [--repeats 1] [--st-batch-size 16]
                                [--st-python /tmp/venv-st/bin/python]

sentence-transformers' ONNX and OpenVINO backends need optimum-onnx / optimum-intel, which pin transformers < 5,
while qembed's int8 path traces the model with the transformers qembed runs on. `--st-python` names the Python
of a second environment that has them (e.g. a venv made with --system-site-packages plus
`pip install "optimum-onnx[onnxruntime]" "optimum-intel[openvino]" "sentence-transformers<6" "transformers<5"`);
those three variants then run there, in a worker process started by this script, timed inside the worker
exactly like the others. Variants that cannot be loaded or run are reported and skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import ROOT, machine_line, matmul_peak_flops, realistic_texts  # noqa: E402

from qembed import Embedder  # noqa: E402
from qembed.testing import QWEN3_EMBEDDING_0_6B, build_qwen3_embedding, minilm_dir  # noqa: E402

ST_FP32 = "sentence-transformers fp32"


def flops_per_token(config, lengths: list[int]) -> tuple[float, float]:
    """(linear-layer FLOPs per token, causal-attention FLOPs per token averaged over `lengths`)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    per_layer = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * config.intermediate_size
    linear = 2 * per_layer * layers
    # scores (q.k) and weighted sum (p.v): 2 * 2 * q_dim FLOPs per attended position; causal: (L+1)/2 on average
    attention = sum(4 * q_dim * layers * (n + 1) / 2 * n for n in lengths) / sum(lengths)
    return float(linear), float(attention)


def st_loader(model_dir: Path, export_root: Path, backend: str, batch_size: int):
    """A loader of one sentence-transformers variant; exports (once, kept in `export_root`) what it needs."""

    def load():
        from sentence_transformers import SentenceTransformer

        kwargs: dict = {"device": "cpu"}
        folder = model_dir
        if backend != "torch":
            kind = "openvino" if backend == "openvino" else "onnx"
            folder = export_root / kind
            if not folder.exists():
                SentenceTransformer(str(model_dir), backend=kind, device="cpu").save_pretrained(str(folder))
            kwargs["backend"] = kind
            if backend == "onnx-int8":
                from sentence_transformers import export_dynamic_quantized_onnx_model

                name = "onnx/model_qint8_avx512_vnni.onnx"
                if not (folder / name).exists():
                    model = SentenceTransformer(str(folder), **kwargs)
                    export_dynamic_quantized_onnx_model(model, "avx512_vnni", str(folder))
                kwargs["model_kwargs"] = {"file_name": name}
        model = SentenceTransformer(str(folder), **kwargs)
        return lambda texts: model.encode(texts, batch_size=batch_size, normalize_embeddings=True)

    return load


def qembed_loader(model_dir: Path, quantize: str | None):
    def load():
        embedder = Embedder.from_pretrained(model_dir, device="cpu", dtype="fp32", quantize=quantize)
        return embedder.encode

    return load


VARIANTS = {  # name -> backend
    ST_FP32: "torch",
    'sentence-transformers backend="onnx"': "onnx",
    "sentence-transformers ONNX int8 (avx512_vnni)": "onnx-int8",
    'sentence-transformers backend="openvino"': "openvino",
    "qembed fp32": "qembed-fp32",
    "qembed int8": "qembed-int8",
}
OPTIMUM_BACKENDS = ("onnx", "onnx-int8", "openvino")  # sentence-transformers backends that need optimum


def variant_loader(backend: str, model_dir: Path, batch_size: int):
    if backend.startswith("qembed-"):
        return qembed_loader(model_dir, "int8" if backend == "qembed-int8" else None)
    export_root = Path(tempfile.gettempdir()) / f"qembed-bench-exports-{model_dir.name}"
    return st_loader(model_dir, export_root, backend, batch_size)


def measure(load, texts: list[str], repeats: int) -> tuple[float, np.ndarray]:
    """Load a variant, warm it up, and return its best time over `repeats` runs and its vectors."""
    start = time.perf_counter()
    encode = load()
    print(f"    loaded in {time.perf_counter() - start:.1f} s", flush=True)
    encode(texts[:2])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        vectors = np.asarray(encode(texts), dtype=np.float32)
        best = min(best, time.perf_counter() - start)
    del encode
    gc.collect()
    return best, vectors


def measure_elsewhere(args, backend: str, model_dir: Path, texts: list[str]) -> tuple[float, np.ndarray]:
    """`measure` run by `--st-python` (this script with `--worker`), for backends this environment lacks."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
        cmd = [args.st_python, __file__, "--worker", backend, "--model-dir", str(model_dir), "--work-dir", tmp,
               "--repeats", str(args.repeats), "--st-batch-size", str(args.st_batch_size)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-400:] or f"worker exited with {done.returncode}")
        result = np.load(Path(tmp) / "result.npz")
        return float(result["seconds"]), result["vectors"]


def worker(args) -> None:
    texts = json.loads((Path(args.work_dir) / "texts.json").read_text(encoding="utf-8"))
    load = variant_loader(args.worker, Path(args.model_dir), args.st_batch_size)
    seconds, vectors = measure(load, texts, args.repeats)
    np.savez(Path(args.work_dir) / "result.npz", seconds=seconds, vectors=vectors)


def bench_model(label: str, model_dir: Path, args) -> None:
    embedder = Embedder.from_pretrained(model_dir, device="cpu", dtype="fp32")
    texts = realistic_texts(embedder.tokenizer, count=args.qwen3_texts if label == "qwen3" else 27)
    lengths = [len(ids) for ids in embedder.prepare(texts)]
    tokens = sum(lengths)
    print(f"\n== {label}: {model_dir}\ntexts: {len(texts)}, tokens: {tokens} (per text {min(lengths)}..{max(lengths)})")
    if label == "qwen3":
        peak = matmul_peak_flops()
        linear, attention = flops_per_token(embedder.model.config, lengths)
        print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; model: {linear / 1e9:.3f} GFLOP/token linear "
              f"+ {attention / 1e9:.3f} attention -> fp32 bound {peak / (linear + attention):.0f} tokens/s")  # fmt: skip
    reference = embedder.encode(texts)
    del embedder
    best: dict[str, float] = {}
    cosine: dict[str, float] = {}
    failed: dict[str, str] = {}
    for order in (list(VARIANTS), list(reversed(VARIANTS))):
        for name in order:
            if name in failed:
                continue
            backend = VARIANTS[name]
            try:
                if args.st_python and backend in OPTIMUM_BACKENDS:  # in the environment that has optimum
                    seconds, vectors = measure_elsewhere(args, backend, model_dir, texts)
                else:
                    seconds, vectors = measure(variant_loader(backend, model_dir, args.st_batch_size), texts,
                                               args.repeats)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a backend that does not install, export or run is reported
                failed[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"[:160]
                print(f"  {name}: unavailable ({failed[name]})", flush=True)
                continue
            best[name] = min(best.get(name, float("inf")), seconds)
            cosine[name] = float(np.min((vectors * reference).sum(axis=1)))
            print(f"  {name}: {tokens / seconds:.1f} tokens/s", flush=True)
    base = best.get(ST_FP32)
    print(f"\n{label}: best of 2 passes x {args.repeats} (alternating order)")
    print(f"| {'variant':<48} | tokens/s | vs ST fp32 | min cosine to qembed fp32 |")
    for name, seconds in best.items():
        ratio = f"{base / seconds:.2f}x" if base else "-"
        print(f"| {name:<48} | {tokens / seconds:8.1f} | {ratio:>10} | {cosine[name]:.5f} |")
    st_best = min((s for n, s in best.items() if n.startswith("sentence")), default=None)
    if "qembed int8" in best and st_best:
        print(f"qembed int8 vs the fastest sentence-transformers variant: {st_best / best['qembed int8']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "qembed-bench-qwen3-0.6b-st"))
    parser.add_argument("--models", default="qwen3,minilm")
    parser.add_argument("--qwen3-texts", type=int, default=27, help="texts of the mix for Qwen3 (fewer: faster)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant and pass")
    parser.add_argument("--st-batch-size", type=int, default=16)
    parser.add_argument("--st-python", help="Python of an environment with optimum (runs the ONNX/OpenVINO variants)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"machine: {machine_line()}; load average {os.getloadavg()[0]:.1f} at start, {time.strftime('%H:%M')}")
    for label in args.models.split(","):
        if label == "qwen3":
            model_dir = Path(args.model_dir)
            if not (model_dir / "model.safetensors").exists():
                print(f"building random-weight Qwen3-Embedding-0.6B architecture in {model_dir} ...", flush=True)
                if args.st_python:  # saved by the older transformers, so that both environments load it
                    code = "import sys; from qembed.testing import *; build_qwen3_embedding(sys.argv[1], **QWEN3_EMBEDDING_0_6B)"
                    subprocess.run([args.st_python, "-c", code, str(model_dir)], check=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
                else:
                    build_qwen3_embedding(model_dir, **QWEN3_EMBEDDING_0_6B)
        else:  # a private copy: the exporters write next to the weights
            model_dir = Path(tempfile.gettempdir()) / "qembed-bench-minilm"
            if not model_dir.exists():
                shutil.copytree(minilm_dir(), model_dir)
        bench_model(label, model_dir, args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
