"""qembed: Qwen3-style text embedding and reranking for retrieval."""

from qembed.errors import ModelNotFoundError, QembedError
from qembed.models.embedder import Embedder
from qembed.models.reranker import Reranker

__all__ = ["Embedder", "Reranker", "QembedError", "ModelNotFoundError"]
__version__ = "0.1.0"
