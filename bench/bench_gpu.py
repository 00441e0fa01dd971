"""Embedding throughput on one GPU in bf16: qembed against sentence-transformers, same GPU, same run.

Model: the Qwen3-Embedding-0.6B architecture (its configuration, random weights, the real Qwen tokenizer;
`--layers` overrides the 28 layers for a smoke run). Texts: the realistic mix of `bench/common.py` (~10 to ~500
tokens), repeated `--copies` times so that one pass keeps the GPU busy for seconds. Both run in bf16 with SDPA
attention: sentence-transformers with `model_kwargs={"torch_dtype": bfloat16}` and `batch_size` texts per batch
(it sorts by length), qembed with its token-budget batches. Each runs twice per pass, in alternating order,
best of `--repeats`. It prints tokens/s, the ratio, the smallest cosine between the two, and the bf16 bound:
the measured bf16 matmul throughput (large square `torch.mm`, TFLOP/s) divided by the model's FLOPs per token
(linear layers + causal attention at the mix's lengths), and each variant's share of that bound.

    python bench/bench_gpu.py                         # on a GPU (device cuda)
    python bench/bench_gpu.py --device cpu --layers 2 --copies 1 --repeats 1   # smoke check on a CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_embed import flops_per_token  # noqa: E402
from common import cpu_flags_line, realistic_texts  # noqa: E402


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_tflops(device: str, dtype, size: int, repeats: int = 10) -> float:
    """Measured matrix-product throughput of `torch.mm` on `device` in `dtype` (FLOP/s)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the model's 28)")
    parser.add_argument("--copies", type=int, default=40, help="repetitions of the 27-text mix per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--st-batch-size", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, help="qembed's token budget per batch (default: its own)")
    parser.add_argument("--model-dir", type=Path)
    args = parser.parse_args()
    import torch

    from qembed import Embedder
    from qembed.testing import QWEN3_EMBEDDING_0_6B, build_qwen3_embedding

    config = dict(QWEN3_EMBEDDING_0_6B)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / f"qembed-bench-gpu-l{config['num_hidden_layers']}"
    if not (model_dir / "model.safetensors").exists():
        build_qwen3_embedding(model_dir, **config)
    device = args.device
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({cpu_flags_line()}); NOT a GPU run: a smoke check of the script"
    print(f"device: {name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}")

    qembed = Embedder.from_pretrained(model_dir, device=device, dtype="bf16")
    texts = realistic_texts(qembed.tokenizer) * args.copies
    lengths = [len(ids) for ids in qembed.prepare(texts)]
    tokens = sum(lengths)
    linear, attention = flops_per_token(qembed.model.config, lengths)
    peak = matmul_tflops(device, torch.bfloat16, 8192 if device.startswith("cuda") else 1024)
    bound = peak / (linear + attention)
    print(f"{len(texts)} texts, {tokens} tokens; {config['num_hidden_layers']} layers; "
          f"{(linear + attention) / 1e9:.3f} GFLOP/token; bf16 matmul {peak / 1e12:.1f} TFLOP/s "
          f"-> bound {bound:,.0f} tokens/s")  # fmt: skip

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device=device, model_kwargs={"torch_dtype": torch.bfloat16})
    runners = {
        "sentence-transformers bf16": lambda: st.encode(texts, batch_size=args.st_batch_size,
                                                        normalize_embeddings=True),  # fmt: skip
        "qembed bf16": lambda: qembed.encode(texts, batch_tokens=args.batch_tokens),
    }
    best = {name: float("inf") for name in runners}
    vectors = {}
    for run in runners.values():  # warm-up (kernels, allocator)
        run()
    for turn in range(args.repeats):
        for name in runners if turn % 2 == 0 else list(runners)[::-1]:
            synchronize(device)
            start = time.perf_counter()
            vectors[name] = np.asarray(runners[name](), dtype=np.float32)
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
            print(f"  {name}: {tokens / best[name]:,.0f} tokens/s", flush=True)
    base = best["sentence-transformers bf16"]
    print("\n| variant                    |   tokens/s | vs ST | share of bf16 bound |")
    for name, seconds in best.items():
        print(f"| {name:<26} | {tokens / seconds:10,.0f} | {base / seconds:4.2f}x | {tokens / seconds / bound:18.1%} |")
    a, b = vectors.values()
    print(f"smallest cosine between the two: {float(np.min((a * b).sum(axis=1))):.4f} (bf16)")
    if device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
