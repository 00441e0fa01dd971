"""Models: loading, prompt formats, token-budget batching, the Embedder and the Reranker."""
