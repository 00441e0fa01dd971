"""The int8 CPU path: dynamic int8 quantisation of a model's Linear layers (PyTorch, no extra dependency).

Chosen by measurement (`bench/bench_embed.py`): on an AVX-512 VNNI CPU it runs the Qwen3-0.6B and MiniLM
architectures faster than ONNX Runtime int8 and OpenVINO through sentence-transformers, and because the model
stays a transformers module everything else is unchanged: prompts, padding, pooling, Matryoshka, the
reranker's yes/no logits and its key/value cache. Weights are int8 per output channel, activations are
quantised per batch on the fly; embeddings, norms and attention stay fp32.
"""

from __future__ import annotations

import torch

from qembed.errors import QembedError

QUANTIZE_CHOICES = ("int8",)


def check_quantize(quantize: str | None, device: str | torch.device | None, dtype) -> torch.device | None:
    """Validate a `quantize` setting; the device to load on (CPU by default when quantising)."""
    if quantize is None:
        return None if device is None else torch.device(device)
    if quantize not in QUANTIZE_CHOICES:
        raise QembedError(f"unknown quantize {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    device = torch.device(device or "cpu")
    if device.type != "cpu":
        raise QembedError(f"quantize={quantize!r} runs on the CPU only, not on {device}: drop it or use device cpu")
    if dtype is not None and str(dtype).lower() not in ("fp32", "float32", "float", "torch.float32"):
        raise QembedError(f"quantize={quantize!r} starts from fp32 weights; drop dtype={dtype!r}")
    return device


def quantize_linear_layers(module: torch.nn.Module, quantize: str | None) -> None:
    """Replace, in place, every `nn.Linear` under `module` by its dynamically quantised int8 version."""
    if quantize is None:
        return
    torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
