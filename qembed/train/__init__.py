"""Fine-tuning: contrastive embedder training (InfoNCE, GradCache, DDP, LoRA) and reranker SFT.

    from qembed.train import TrainConfig, train_embedder
    train_embedder(TrainConfig(model="...", data=["pairs.jsonl"], output="out/emb"))
"""

from qembed.train.embedder import train_embedder
from qembed.train.loop import TrainConfig, TrainResult
from qembed.train.reranker import train_reranker

__all__ = ["TrainConfig", "TrainResult", "train_embedder", "train_reranker"]
