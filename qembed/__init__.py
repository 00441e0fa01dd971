"""qembed: Qwen3-style text embedding and reranking for retrieval."""

from qembed.errors import ModelNotFoundError, QembedError
from qembed.models.embedder import Embedder
from qembed.models.reranker import Reranker

__all__ = ["Embedder", "Reranker", "QembedError", "ModelNotFoundError", "evaluate", "mine_hard_negatives"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The evaluation and mining entry points pull in FAISS and friends: import them on first use only.
    if name == "evaluate":
        from qembed.eval.evaluate import evaluate

        return evaluate
    if name == "mine_hard_negatives":
        from qembed.mine import mine_hard_negatives

        return mine_hard_negatives
    raise AttributeError(f"module 'qembed' has no attribute {name!r}")
