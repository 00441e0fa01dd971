"""Fine-tuning: contrastive embedder training (InfoNCE, GradCache, DDP, LoRA) and reranker SFT.

    from qembed.train import TrainConfig, train_embedder
    train_embedder(TrainConfig(model="...", data=["pairs.jsonl"], output="out/emb"))
"""

from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "TrainResult", "train_embedder", "train_reranker"]

# resolved on first use, so that `qembed.train.config` (the CLI's defaults) imports without torch
_LAZY = {
    "TrainConfig": "qembed.train.config",
    "TrainResult": "qembed.train.loop",
    "train_embedder": "qembed.train.embedder",
    "train_reranker": "qembed.train.reranker",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qembed.train' has no attribute {name!r}")
