"""`qembed serve`: an OpenAI-compatible embeddings, rerank and search server (FastAPI + uvicorn).

`create_app(embedder, reranker=..., index=..., config=ServeConfig(...))` builds the app; `serve(...)` runs it.
"""

from qembed.serve.app import ServeConfig, create_app
from qembed.serve.run import serve

__all__ = ["ServeConfig", "create_app", "serve"]
