"""Matryoshka truncation and L2 normalisation of embedding vectors: the one place both are computed.

Light on purpose (numpy only): option checks (`qembed.train.config`) import `MIN_MRL_DIM` without torch.
"""

from __future__ import annotations

import numpy as np

#: The smallest Matryoshka dimension qembed accepts (`dim`, `--dim`, `--mrl-dims`, `dimensions`).
MIN_MRL_DIM = 32


def truncate_and_normalize(vectors: np.ndarray, dim: int | None = None, normalize: bool = True) -> np.ndarray:
    """Full-size float32 vectors -> the first `dim` components (Matryoshka), L2-normalised if `normalize`.

    The one place this is computed, so cached full-size vectors give exactly what `Embedder.encode` gives.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if dim is not None:
        vectors = vectors[:, :dim]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.float32(1e-12))
    return np.ascontiguousarray(vectors, dtype=np.float32)
