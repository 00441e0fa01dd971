"""Fine-tuning: contrastive embedder training (InfoNCE, GradCache, DDP, LoRA) and reranker SFT.

    from qembed.train import TrainConfig, train_embedder
    train_embedder(TrainConfig(model="...", data=["pairs.jsonl"], output="out/emb"))
"""

from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "TrainResult", "train_embedder", "train_reranker"]

# submodule of each public name, imported on first use: `qembed.train.config` (the CLI's defaults) stays torch-free
_LAZY = {"TrainConfig": "config", "TrainResult": "loop", "train_embedder": "embedder", "train_reranker": "reranker"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
