"""qembed: Qwen3-style text embedding and reranking for retrieval."""

from __future__ import annotations

import importlib

from qembed.errors import ModelNotFoundError, QembedError

__all__ = ["Embedder", "Reranker", "QembedError", "ModelNotFoundError", "evaluate", "mine_hard_negatives"]
__version__ = "0.1.0"

# Public names resolved on first use, so `import qembed` (and every CLI start) does not pay for torch,
# transformers or FAISS before a command needs them.
_LAZY = {
    "Embedder": "qembed.models.embedder",
    "Reranker": "qembed.models.reranker",
    "evaluate": "qembed.eval.evaluate",
    "mine_hard_negatives": "qembed.mine",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qembed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
