"""The HTTP API: `create_app(embedder, reranker=..., index=..., config=...)` -> a FastAPI app.

Routes: `POST /v1/embeddings` (OpenAI), `POST /v1/rerank` (Jina/Cohere), `POST /v1/search` (the index),
`GET /health`, `GET /v1/models`, `GET /metrics` (Prometheus). Model calls go through `Batcher`s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from qembed.models.embedder import MIN_MRL_DIM
from qembed.serve.batcher import Batcher, ModelWorker
from qembed.serve.errors import ApiError, Guard, install_error_handlers
from qembed.serve.metrics import Metrics
from qembed.serve.schemas import EmbeddingRequest, RerankRequest, SearchRequest

log = logging.getLogger(__name__)

MAX_TOP_K = 1000
INLINE_CHARS = 4096  # inputs up to this many characters are tokenized on the event loop (no thread hop)


@dataclass
class ServeConfig:
    """Server settings (the `qembed serve` flags)."""

    served_model_name: str | None = None
    api_key: str | None = None
    max_batch_tokens: int = 16384
    max_client_batch_size: int = 2048
    max_input_tokens: int | None = None
    auto_truncate: bool = True
    max_concurrent_requests: int = 512
    max_request_bytes: int = 2_000_000
    batching: bool = True  # False: one request per forward pass (for comparisons)
    milvus_token: str = ""


@dataclass
class ServerState:
    config: ServeConfig
    metrics: Metrics = field(default_factory=Metrics)
    routes: set = field(default_factory=set)
    in_flight: int = 0
    ready: bool = False
    error: str | None = None
    embedder: object = None
    reranker: object = None
    index: object = None
    input_limit: int = 0
    rerank_limit: int = 0
    embed_names: set = field(default_factory=set)
    rerank_names: set = field(default_factory=set)
    worker: ModelWorker | None = None
    embed_batcher: Batcher | None = None
    rerank_batcher: Batcher | None = None


def create_app(embedder, *, reranker=None, index=None, config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving `embedder` (and `reranker`, and `index`: a `SearchIndex` or an index folder).

    Each of them may also be a zero-argument callable that loads it: loading and a warm-up forward pass
    run in the background after start-up, with `/health` answering 503 until they are done.
    """
    state = ServerState(config or ServeConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        loader = threading.Thread(target=_load, args=(state, embedder, reranker, index), daemon=True)
        loader.start()
        yield
        for batcher in (state.embed_batcher, state.rerank_batcher):
            if batcher is not None:
                batcher.stop()
        if state.worker is not None:
            state.worker.stop()

    app = FastAPI(title="qembed", version="1", lifespan=lifespan)
    install_error_handlers(app)
    _add_routes(app, state)
    state.routes = {route.path for route in app.routes}
    app.add_middleware(Guard, state=state)
    app.state.qembed = state
    return app


# ---------------------------------------------------------------------------------------------- loading
def _load(state: ServerState, embedder, reranker, index) -> None:
    try:
        config = state.config
        state.embedder = embedder = embedder() if callable(embedder) else embedder
        state.input_limit = _apply_limit(embedder, config)
        name = config.served_model_name or embedder.name_or_path
        state.embed_names = {name, embedder.name_or_path, Path(embedder.name_or_path).name}
        if reranker is not None:
            state.reranker = reranker = reranker() if callable(reranker) else reranker
            state.rerank_limit = _apply_limit(reranker, config)
            state.rerank_names = {reranker.name_or_path, Path(reranker.name_or_path).name}
        if index is not None:
            from qembed.index.store import SearchIndex

            if isinstance(index, (str, Path)):
                index = SearchIndex(index, embedder, token=config.milvus_token)
            state.index = index(embedder) if callable(index) else index
        state.worker = ModelWorker()
        state.embed_batcher = Batcher(state.worker, collate=embedder.collate, forward=_embed_forward(embedder),
                                      max_batch_tokens=config.max_batch_tokens, metrics=state.metrics,
                                      name="embed", per_request=not config.batching)  # fmt: skip
        if reranker is not None:
            state.rerank_batcher = Batcher(state.worker, collate=reranker.collate, forward=_rerank_forward(reranker),
                                           max_batch_tokens=config.max_batch_tokens, metrics=state.metrics,
                                           name="rerank", per_request=not config.batching)  # fmt: skip
        with torch.inference_mode():  # warm-up: the first forward pass pays one-time costs
            embedder.forward_features(embedder.collate(embedder.prepare(["warm-up"])))
            if reranker is not None:
                reranker.forward_logits(reranker.collate(reranker.prepare_pairs("warm-up", ["warm-up"])))
        state.ready = True
    except Exception as exc:
        state.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.error("qembed serve: loading failed: %s", state.error)


def _apply_limit(model, config: ServeConfig) -> int:
    """Set the model's truncation length for the server's input limit; returns the limit.

    With `auto_truncate=False` the model truncates one token past the limit, so an input that was too
    long is seen (its length exceeds the limit) and refused.
    """
    limit = min(config.max_input_tokens or model.max_length, model.max_length)
    model.max_length = limit if config.auto_truncate else limit + 1
    return limit


def _embed_forward(embedder):
    def forward(batch):
        return list(embedder.forward_features(batch).float().cpu().numpy())

    return forward


def _rerank_forward(reranker):
    def forward(batch):
        return torch.sigmoid(reranker.forward_logits(batch).float()).tolist()

    return forward


# ---------------------------------------------------------------------------------------------- helpers
def _ready(state: ServerState) -> None:
    if not state.ready:
        message = f"model failed to load: {state.error}" if state.error else "model is loading: retry shortly"
        raise ApiError(503, message, code="model_not_ready", headers={"retry-after": "5"})


def _check_model(name: str | None, names: set, what: str) -> None:
    if name is not None and name not in names:
        raise ApiError(400, f"unknown {what} model {name!r}: this server serves {sorted(names)[0]!r}",
                       param="model", code="model_not_found")  # fmt: skip


def _check_lengths(state: ServerState, seqs: list[list[int]], limit: int, param: str) -> None:
    if state.config.auto_truncate:
        return
    for i, ids in enumerate(seqs):
        if len(ids) > limit:
            raise ApiError(400, f"{param}[{i}] is longer than the limit of {limit} tokens (auto-truncation is off)",
                           param=param, code="input_too_long")  # fmt: skip


async def _run(batcher: Batcher, seqs: list[list[int]], request: Request) -> list:
    """Results of `seqs` from the batcher; if the client goes away first, its queued inputs are dropped."""
    job = batcher.submit(seqs)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if job.future not in done:
        batcher.cancel(job)
        raise ApiError(499, "client closed the request", code="client_closed")
    try:
        return job.future.result()
    except RuntimeError as exc:
        raise ApiError(500, str(exc), code="model_error") from None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _finish(rows: list[np.ndarray], dim: int) -> np.ndarray:
    """Matryoshka cut and L2 normalisation, exactly as `Embedder.encode` does them."""
    vectors = torch.from_numpy(np.stack(rows))[:, :dim]
    return torch.nn.functional.normalize(vectors, dim=-1).numpy()


async def _tokenize(fn, texts: list[str], *args, **kwargs) -> list[list[int]]:
    """`fn(texts, ...)` (a model's prepare): small inputs inline, large ones in a worker thread."""
    if sum(len(t) for t in texts) <= INLINE_CHARS:
        return fn(texts, *args, **kwargs)
    return await run_in_threadpool(fn, texts, *args, **kwargs)


def _json(content: dict, status: int = 200) -> Response:
    return Response(json.dumps(content, ensure_ascii=False), status_code=status, media_type="application/json")


def _parse_input(value, max_items: int, vocab_size: int) -> tuple[list, bool]:
    """(items, are_token_ids) of an embeddings `input`, with every documented check."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise ApiError(400, "input must not be empty", param="input", code="invalid_input")
    if len(value) > max_items:
        raise ApiError(400, f"input has {len(value)} items, over the limit of {max_items}", param="input",
                       code="too_many_inputs")  # fmt: skip
    if isinstance(value[0], int):
        value = [value]  # one token-id array
    tokens = not isinstance(value[0], str)
    for i, item in enumerate(value):
        if len(item) == 0:
            raise ApiError(400, f"input[{i}] is empty", param="input", code="invalid_input")
        if tokens and not all(0 <= t < vocab_size for t in item):
            raise ApiError(400, f"input[{i}] has token ids outside 0..{vocab_size - 1}", param="input",
                           code="invalid_input")  # fmt: skip
    return value, tokens


def _token_ids(embedder, seqs: list[list[int]]) -> list[list[int]]:
    """Token-id inputs as the model takes them: truncated, and for last-token pooling ending in one EOT."""
    if embedder.pooling != "lasttoken":
        return [list(ids[: embedder.max_length]) for ids in seqs]
    out = []
    for ids in seqs:
        ids = list(ids)
        while ids and ids[-1] == embedder.eot_id:
            ids.pop()
        out.append(ids[: embedder.max_length - 1] + [embedder.eot_id])
    return out


def _usage(tokens: int) -> dict:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


# ---------------------------------------------------------------------------------------------- routes
def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        _ready(state)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        _ready(state)
        created = int(time.time())
        names = [state.config.served_model_name or state.embedder.name_or_path]
        if state.reranker is not None:
            names.append(state.reranker.name_or_path)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "qembed"}
                                           for n in names]}  # fmt: skip

    @app.post("/v1/embeddings")
    @app.post("/embeddings", include_in_schema=False)
    async def embeddings(body: EmbeddingRequest, request: Request):
        _ready(state)
        embedder = state.embedder
        _check_model(body.model, state.embed_names, "embedding")
        items, are_tokens = _parse_input(body.input, state.config.max_client_batch_size, len(embedder.tokenizer))
        dim = embedder.hidden_size if body.dimensions is None else body.dimensions
        if not MIN_MRL_DIM <= dim <= embedder.hidden_size:
            raise ApiError(400, f"dimensions must be between {MIN_MRL_DIM} and {embedder.hidden_size}, got {dim}",
                           param="dimensions", code="invalid_dimensions")  # fmt: skip
        if are_tokens and (body.instruction is not None or body.input_type is not None):
            raise ApiError(400, "instruction and input_type apply to text inputs, not token ids", param="input")
        if are_tokens:
            seqs = _token_ids(embedder, items)
        else:
            if body.instruction is not None:
                options = {"instruction": body.instruction}
            elif body.input_type == "query":
                options = {"instruction": embedder.default_instruction, "prompt": embedder.query_prompt}
            elif body.input_type == "document":
                options = {"prompt": embedder.document_prompt}
            else:
                options = {}
            seqs = await _tokenize(embedder.prepare, items, **options)
        _check_lengths(state, seqs, state.input_limit, "input")
        vectors = _finish(await _run(state.embed_batcher, seqs, request), dim)
        if body.encoding_format == "base64":
            encode = lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")  # noqa: E731
        else:
            encode = lambda v: v.tolist()  # noqa: E731
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
        name = state.config.served_model_name or embedder.name_or_path
        return _json({"object": "list", "data": data, "model": name, "usage": _usage(sum(map(len, seqs)))})

    @app.post("/v1/rerank")
    @app.post("/rerank", include_in_schema=False)
    async def rerank(body: RerankRequest, request: Request):
        _ready(state)
        reranker = _require_reranker(state)
        _check_model(body.model, state.rerank_names, "reranker")
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        if not documents:
            raise ApiError(400, "documents must not be empty", param="documents")
        if len(documents) > state.config.max_client_batch_size:
            raise ApiError(400, f"{len(documents)} documents, over the limit of {state.config.max_client_batch_size}",
                           param="documents")  # fmt: skip
        if body.top_n is not None and body.top_n < 1:
            raise ApiError(400, "top_n must be at least 1", param="top_n")
        seqs = await _tokenize(lambda docs: reranker.prepare_pairs(body.query, docs, instruction=body.instruction),
                               documents)  # fmt: skip
        _check_lengths(state, seqs, state.rerank_limit, "documents")
        scores = await _run(state.rerank_batcher, seqs, request)
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n or len(scores)]
        results = []
        for i in ranked:
            result = {"index": i, "relevance_score": scores[i]}
            if body.return_documents:
                result["document"] = {"text": documents[i]}
            results.append(result)
        return _json({"id": uuid.uuid4().hex, "model": reranker.name_or_path, "results": results,
                      "usage": _usage(sum(map(len, seqs)))})  # fmt: skip

    @app.post("/v1/search")
    async def search(body: SearchRequest, request: Request):
        _ready(state)
        if state.index is None:
            raise ApiError(404, "no index loaded: start the server with --index DIR (built by `qembed index build`)",
                           code="feature_disabled")  # fmt: skip
        embedder, index = state.embedder, state.index
        _check_model(body.model, state.embed_names, "embedding")
        if not 1 <= body.top_k <= MAX_TOP_K:
            raise ApiError(400, f"top_k must be between 1 and {MAX_TOP_K}", param="top_k")
        if body.rerank_top is not None and body.rerank_top < 1:
            raise ApiError(400, "rerank_top must be at least 1", param="rerank_top")
        if body.rerank:
            _require_reranker(state)
        params = _search_params(index, body)
        if body.instruction is not None:
            options = {"instruction": body.instruction}
        else:
            options = {"instruction": embedder.default_instruction, "prompt": embedder.query_prompt}
        seqs = await _tokenize(embedder.prepare, [body.query], **options)
        _check_lengths(state, seqs, state.input_limit, "query")
        query = _finish(await _run(state.embed_batcher, seqs, request), index.dim)
        hits = (await run_in_threadpool(index.search_vectors, query, body.top_k, params))[0]
        tokens = len(seqs[0])
        if body.rerank and hits:
            from qembed.index.store import rerank_hits

            head = hits[: body.rerank_top or len(hits)]
            pairs = await _tokenize(lambda docs: state.reranker.prepare_pairs(body.query, docs, instruction=body.instruction),
                                    [h.text for h in head])  # fmt: skip
            _check_lengths(state, pairs, state.rerank_limit, "query")
            scores = await _run(state.rerank_batcher, pairs, request)
            hits = rerank_hits(state.reranker, body.query, hits, body.rerank_top, body.instruction, scores=scores)
            tokens += sum(map(len, pairs))
        results = [{k: v for k, v in vars(h).items() if v is not None} for h in hits]
        return _json({"results": results, "usage": _usage(tokens)})


def _search_params(index, body: SearchRequest):
    """The request's nprobe/ef as `SearchParams` (None when it sets neither); 400 when the index has no use for them."""
    if body.nprobe is None and body.ef is None:
        return None
    from qembed.errors import QembedError
    from qembed.index import SearchParams

    try:
        params = SearchParams(nprobe=body.nprobe, ef=body.ef)
        index.vectors.check_params(params)
    except QembedError as exc:
        raise ApiError(400, str(exc), param="nprobe" if body.nprobe is not None else "ef") from None
    return params


def _require_reranker(state: ServerState):
    if state.reranker is None:
        raise ApiError(404, "no reranker loaded: start the server with --reranker MODEL", code="feature_disabled")
    return state.reranker
