"""Embedding throughput: qembed's Embedder vs sentence-transformers on the Qwen3-Embedding-0.6B architecture.

Builds a random-weight model with the exact Qwen3-Embedding-0.6B shape and the real Qwen tokenizer, embeds
the same realistic mix of texts (~10 to ~500 tokens) with both, on the same threads, and prints tokens/s,
their ratio, and the bound that this machine's fp32 matmul peak sets for the model.

    python bench/bench_embed.py [--model-dir DIR] [--repeats 2] [--st-batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import best_of, machine_line, matmul_peak_flops, realistic_texts  # noqa: E402

from qembed import Embedder  # noqa: E402
from qembed.testing import QWEN3_EMBEDDING_0_6B, build_qwen3_embedding  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "qembed-bench-qwen3-0.6b"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--st-batch-size", type=int, default=16)
    args = parser.parse_args()

    model_dir = Path(args.model_dir)
    if not (model_dir / "model.safetensors").exists():
        print(f"building random-weight Qwen3-Embedding-0.6B architecture in {model_dir} ...", flush=True)
        build_qwen3_embedding(model_dir, **QWEN3_EMBEDDING_0_6B)
    embedder = Embedder.from_pretrained(model_dir, device="cpu", dtype="fp32")
    texts = realistic_texts(embedder.tokenizer)
    lengths = [len(ids) for ids in embedder.prepare(texts)]
    tokens = sum(lengths)
    print(f"machine: {machine_line()}")
    print(f"texts: {len(texts)}, tokens: {tokens} (per text {min(lengths)}..{max(lengths)})")

    peak = matmul_peak_flops()
    linear, attention = flops_per_token(embedder.model.config, lengths)
    bound = peak / (linear + attention)
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; model: {linear / 1e9:.3f} GFLOP/token linear "
          f"+ {attention / 1e9:.3f} attention -> bound {bound:.0f} tokens/s")  # fmt: skip

    ours_vectors = embedder.encode(texts)  # warm-up
    ours = best_of(lambda: embedder.encode(texts), args.repeats)
    print(f"qembed Embedder:        {tokens / ours:7.1f} tokens/s  ({ours:.1f} s)", flush=True)

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    st_vectors = st.encode(texts, batch_size=args.st_batch_size, normalize_embeddings=True)
    theirs = best_of(lambda: st.encode(texts, batch_size=args.st_batch_size, normalize_embeddings=True), args.repeats)
    print(f"sentence-transformers:  {tokens / theirs:7.1f} tokens/s  ({theirs:.1f} s, batch {args.st_batch_size})")
    cosine = float(np.min((ours_vectors * st_vectors).sum(axis=1)))
    print(f"speed-up vs sentence-transformers: {theirs / ours:.2f}x; share of matmul bound: "
          f"{tokens / ours / bound:.0%}; min cosine between the two: {cosine:.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
