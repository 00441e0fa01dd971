"""The HTTP API: `create_app(embedder, reranker=..., index=..., config=...)` -> a FastAPI app.

Routes: `POST /v1/embeddings` (OpenAI), `POST /v1/rerank` (Jina/Cohere), `POST /v1/search` (the index),
`POST /admin/reload` (reopen the index folder), `GET /health`, `GET /v1/models`, `GET /metrics`
(Prometheus). Model calls go through `Batcher`s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from qembed.errors import QembedError
from qembed.models.embedder import MIN_MRL_DIM, truncate_and_normalize
from qembed.models.prompts import MODEL_DEFAULT
from qembed.serve.batcher import Batcher, ModelThreadDied, ModelWorker
from qembed.serve.errors import ApiError, Guard, install_error_handlers
from qembed.serve.metrics import Metrics
from qembed.serve.schemas import EmbeddingRequest, RerankRequest, SearchRequest

log = logging.getLogger(__name__)

MAX_TOP_K = 1000
INLINE_CHARS = 4096  # inputs up to this many characters are tokenized on the event loop (no thread hop)
INLINE_FLOATS = 65536  # responses with more numbers than this are serialised in a worker thread


@dataclass
class ServeConfig:
    """Server settings (the `qembed serve` flags)."""

    served_model_name: str | None = None  # None: `short_model_name` of the embedder
    served_reranker_name: str | None = None  # None: `short_model_name` of the reranker
    api_key: str | None = None
    max_batch_tokens: int = 16384
    max_client_batch_size: int = 2048
    max_input_tokens: int | None = None
    auto_truncate: bool = True
    max_concurrent_requests: int = 512
    max_request_bytes: int = 2_000_000
    body_timeout: float = 5.0  # seconds a client has to send its whole request body
    metrics_require_key: bool = False
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
    reload_lock: threading.Lock = field(default_factory=threading.Lock)
    input_limit: int = 0
    rerank_limit: int = 0
    embed_probe: LongerProbe | None = None
    rerank_probe: LongerProbe | None = None
    embed_name: str = ""
    rerank_name: str = ""
    worker: ModelWorker | None = None
    embed_batcher: Batcher | None = None
    rerank_batcher: Batcher | None = None


def short_model_name(name_or_path: str) -> str:
    """The name a model is served under by default: a local folder's name (never its path), else the hub id."""
    path = Path(name_or_path).expanduser()
    return (path.resolve().name or str(name_or_path)) if path.exists() else str(name_or_path)


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
        state.input_limit, state.embed_probe = _apply_limit(embedder, config)
        state.embed_name = config.served_model_name or short_model_name(embedder.name_or_path)
        if reranker is not None:
            state.reranker = reranker = reranker() if callable(reranker) else reranker
            state.rerank_limit, state.rerank_probe = _apply_limit(reranker, config)
            state.rerank_name = config.served_reranker_name or short_model_name(reranker.name_or_path)
        if index is not None:
            from qembed.serve.generation import open_generation

            if isinstance(index, (str, Path)):
                index = open_generation(index, embedder, token=config.milvus_token)
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


def _apply_limit(model, config: ServeConfig) -> tuple[int, LongerProbe]:
    """Set the model's truncation length to the server's input limit; returns (limit, probe)."""
    limit = min(config.max_input_tokens or model.max_length, model.max_length)
    model.max_length = limit
    return limit, LongerProbe(model)


class LongerProbe:
    """The model with room for one token more, which tells an input cut at the limit from one that fits
    exactly: an input whose tokens reach the limit is prepared again with it and was cut if it comes out
    longer. `model` is a shallow copy; `texts()` gives it its own tokenizer (made on first use, as that
    takes a moment): a fast tokenizer called with another truncation length changes its state, which fails
    ("Already borrowed") or leaks into a concurrent call on another thread.
    """

    def __init__(self, model) -> None:
        self.model = copy.copy(model)
        self.model.max_length = model.max_length + 1
        self._own_tokenizer = False
        self._lock = threading.Lock()

    def texts(self):
        """The probe model, safe to tokenise with."""
        with self._lock:
            if not self._own_tokenizer:
                self.model.tokenizer = copy.deepcopy(self.model.tokenizer)
                self._own_tokenizer = True
        return self.model


def _embed_forward(embedder):
    def forward(batch):
        return list(embedder.forward_features(batch).float().cpu().numpy())

    return forward


def _rerank_forward(reranker):
    def forward(batch):
        return torch.sigmoid(reranker.forward_logits(batch).float()).tolist()

    return forward


def reload_index(state: ServerState) -> dict:
    """Reopen the served index folder and switch to its current build; the old one serves until then.

    Raises `ApiError` 409 (and keeps serving the old build) when the folder cannot be opened consistently.
    """
    from qembed.serve.generation import open_generation

    with state.reload_lock:
        old = state.index
        if not hasattr(old, "directory"):
            raise ApiError(409, "this index was not opened from a folder: nothing to reload", code="reload_failed")
        try:
            new = open_generation(old.directory, state.embedder, token=state.config.milvus_token,
                                  params=getattr(old, "params", None))
        except QembedError as exc:
            log.error("qembed serve: index reload failed, still serving the build of %s: %s",
                      old.manifest.built_at, exc)  # fmt: skip
            raise ApiError(409, f"reload failed; still serving the index built at {old.manifest.built_at}: {exc}",
                           code="reload_failed") from None  # fmt: skip
        state.index = new
    log.warning("qembed serve: index reloaded: %d documents, built at %s (was %d, built at %s)", len(new),
                new.manifest.built_at, len(old), old.manifest.built_at)  # fmt: skip
    return {"reloaded": True, "count": len(new), "built_at": new.manifest.built_at,
            "previous": {"count": len(old), "built_at": old.manifest.built_at}}  # fmt: skip


# ---------------------------------------------------------------------------------------------- helpers
def _ready(state: ServerState) -> None:
    if not state.ready:
        message = f"model failed to load: {state.error}" if state.error else "model is loading: retry shortly"
        raise ApiError(503, message, code="model_not_ready", headers={"retry-after": "5"})
    if state.worker.error is not None:
        raise ApiError(503, f"{state.worker.error}: restart the server", code="model_unavailable")


def _check_model(name: str | None, served: str, what: str) -> None:
    if name is not None and name != served:
        raise ApiError(400, f"unknown {what} model {name!r}: this server serves {served!r}", param="model",
                       code="model_not_found")  # fmt: skip


def _check_texts(texts: list[str], param: str, *, indexed: bool = True) -> None:
    """400 for an empty text or one that is not valid Unicode (a lone UTF-16 surrogate), naming it."""
    for i, text in enumerate(texts):
        where = f"{param}[{i}]" if indexed else param
        if not text:
            raise ApiError(400, f"{where} is empty", param=param, code="invalid_input")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError(400, f"{where} is not valid Unicode: a lone surrogate U+{ord(text[exc.start]):04X} at "
                               f"character {exc.start}", param=param, code="invalid_input") from None  # fmt: skip


async def _truncated(seqs: list[list[int]], limit: int, prepare_longer) -> list[bool]:
    """Which of the prepared `seqs` were cut at `limit` tokens: those that reach it are prepared again with
    room for one token more by `prepare_longer(indices)`, and were cut if they come out longer."""
    flags = [False] * len(seqs)
    at_limit = [i for i, ids in enumerate(seqs) if len(ids) >= limit]
    if at_limit:
        longer = await run_in_threadpool(prepare_longer, at_limit)
        for i, ids in zip(at_limit, longer):
            flags[i] = len(ids) > limit
    return flags


def _handle_truncated(state: ServerState, flags: list[bool], limit: int, param: str, route: str) -> None:
    """Refuse cut inputs with `auto_truncate=False`, else log them (the response says so too)."""
    cut = [i for i, flag in enumerate(flags) if flag]
    if not cut:
        return
    if not state.config.auto_truncate:
        raise ApiError(400, f"{param}[{cut[0]}] is longer than the limit of {limit} tokens (auto-truncation is off)",
                       param=param, code="input_too_long")  # fmt: skip
    shown = ", ".join(f"{param}[{i}]" for i in cut[:5]) + (", ..." if len(cut) > 5 else "")
    log.warning("qembed serve: %s: %d of %d inputs cut to the limit of %d tokens (%s)", route, len(cut), len(flags),
                limit, shown)  # fmt: skip


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
    except ModelThreadDied as exc:
        raise ApiError(503, f"{exc}: restart the server", code="model_unavailable") from None
    except RuntimeError as exc:
        raise ApiError(500, str(exc), code="model_error") from None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _finish(embedder, rows: list[np.ndarray], dim: int, *, for_search: bool = False) -> np.ndarray:
    """Matryoshka cut and normalisation: the model's own (as `Embedder.encode` gives them), or for searching
    an index the declared similarity's (`Embedder.search_normalize`, as the index was built)."""
    normalize = embedder.search_normalize if for_search else embedder.normalize
    return truncate_and_normalize(np.stack(rows), dim, normalize)


async def _tokenize(fn, texts: list[str], *args, **kwargs) -> list[list[int]]:
    """`fn(texts, ...)` (a model's prepare): small inputs inline, large ones in a worker thread."""
    if sum(len(t) for t in texts) <= INLINE_CHARS:
        return fn(texts, *args, **kwargs)
    return await run_in_threadpool(fn, texts, *args, **kwargs)


def _dumps(content: dict) -> bytes:
    try:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # e.g. a lone surrogate in a document text: escaped by the standard library
        return json.dumps(content, default=lambda value: value.tolist()).encode()


async def _json(content: dict, numbers: int = 0) -> Response:
    """A JSON response; a large one (`numbers` floats) is serialised off the event loop."""
    body = await run_in_threadpool(_dumps, content) if numbers > INLINE_FLOATS else _dumps(content)
    return Response(body, media_type="application/json")


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
    if not tokens:
        _check_texts(value, "input")
    for i, item in enumerate(value):
        if len(item) == 0:
            raise ApiError(400, f"input[{i}] is empty", param="input", code="invalid_input")
        if tokens and not all(0 <= t < vocab_size for t in item):
            raise ApiError(400, f"input[{i}] has token ids outside 0..{vocab_size - 1}", param="input",
                           code="invalid_input")  # fmt: skip
    return value, tokens


def _query_options(embedder, instruction: str | None, input_type: str | None) -> dict:
    """`prepare` options for an embeddings request: `instruction` (a query with that task) wins over the
    default query format of `input_type: "query"`; with `input_type: "document"` it is an error."""
    if instruction is not None:
        if input_type == "document":
            raise ApiError(400, 'instruction applies to queries: it cannot be combined with input_type "document"',
                           param="instruction", code="invalid_request")  # fmt: skip
        _check_texts([instruction], "instruction", indexed=False)
        return {"instruction": instruction}
    if input_type == "query":
        return {"instruction": MODEL_DEFAULT}
    if input_type == "document":
        return {"prompt": embedder.document_prompt}
    return {}


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
        names = [state.embed_name] + ([state.rerank_name] if state.reranker is not None else [])
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "qembed"}
                                           for n in names]}  # fmt: skip

    @app.post("/admin/reload")
    async def reload():
        _ready(state)
        _require_index(state)
        return await run_in_threadpool(reload_index, state)

    @app.post("/v1/embeddings")
    @app.post("/embeddings", include_in_schema=False)
    async def embeddings(body: EmbeddingRequest, request: Request):
        _ready(state)
        embedder, limit = state.embedder, state.input_limit
        _check_model(body.model, state.embed_name, "embedding")
        items, are_tokens = _parse_input(body.input, state.config.max_client_batch_size, len(embedder.tokenizer))
        dim = embedder.hidden_size if body.dimensions is None else body.dimensions
        if not MIN_MRL_DIM <= dim <= embedder.hidden_size:
            raise ApiError(400, f"dimensions must be between {MIN_MRL_DIM} and {embedder.hidden_size}, got {dim}",
                           param="dimensions", code="invalid_dimensions")  # fmt: skip
        if are_tokens:
            if body.instruction is not None or body.input_type is not None:
                raise ApiError(400, "instruction and input_type apply to text inputs, not token ids", param="input")
            seqs = [embedder.finish_token_ids(ids) for ids in items]
            truncated = [len(state.embed_probe.model.finish_token_ids(ids)) > limit for ids in items]
        else:
            options = _query_options(embedder, body.instruction, body.input_type)
            seqs = await _tokenize(embedder.prepare, items, **options)
            longer = lambda at: state.embed_probe.texts().prepare([items[i] for i in at], **options)  # noqa: E731
            truncated = await _truncated(seqs, limit, longer)
        _handle_truncated(state, truncated, limit, "input", "/v1/embeddings")
        vectors = _finish(embedder, await _run(state.embed_batcher, seqs, request), dim)
        if body.encoding_format == "base64":
            encode = lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")  # noqa: E731
        else:
            encode = lambda v: v  # noqa: E731 - a float32 row: orjson writes its shortest exact form
        data = [{"object": "embedding", "index": i, "embedding": encode(v), "truncated": cut}
                for i, (v, cut) in enumerate(zip(vectors, truncated))]  # fmt: skip
        content = {"object": "list", "data": data, "model": state.embed_name, "usage": _usage(sum(map(len, seqs)))}
        return await _json(content, vectors.size)

    @app.post("/v1/rerank")
    @app.post("/rerank", include_in_schema=False)
    async def rerank(body: RerankRequest, request: Request):
        _ready(state)
        _require_reranker(state)
        _check_model(body.model, state.rerank_name, "reranker")
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        if not documents:
            raise ApiError(400, "documents must not be empty", param="documents")
        if len(documents) > state.config.max_client_batch_size:
            raise ApiError(400, f"{len(documents)} documents, over the limit of {state.config.max_client_batch_size}",
                           param="documents")  # fmt: skip
        if body.top_n is not None and body.top_n < 1:
            raise ApiError(400, "top_n must be at least 1", param="top_n")
        _check_texts([body.query], "query", indexed=False)
        _check_texts(documents, "documents")
        if body.instruction is not None:
            _check_texts([body.instruction], "instruction", indexed=False)
        seqs, truncated = await _prepare_pairs(state, body.query, documents, body.instruction, "documents",
                                               "/v1/rerank")  # fmt: skip
        scores = await _run(state.rerank_batcher, seqs, request)
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n or len(scores)]
        results = []
        for i in ranked:
            result = {"index": i, "relevance_score": scores[i], "truncated": truncated[i]}
            if body.return_documents:
                result["document"] = {"text": documents[i]}
            results.append(result)
        return await _json({"id": uuid.uuid4().hex, "model": state.rerank_name, "results": results,
                            "usage": _usage(sum(map(len, seqs)))})  # fmt: skip

    @app.post("/v1/search")
    async def search(body: SearchRequest, request: Request):
        _ready(state)
        index = _require_index(state)
        embedder = state.embedder
        _check_model(body.model, state.embed_name, "embedding")
        _check_texts([body.query], "query", indexed=False)
        if not 1 <= body.top_k <= MAX_TOP_K:
            raise ApiError(400, f"top_k must be between 1 and {MAX_TOP_K}", param="top_k")
        if body.rerank_top is not None and body.rerank_top < 1:
            raise ApiError(400, "rerank_top must be at least 1", param="rerank_top")
        if body.rerank:
            _require_reranker(state)
        params = _search_params(index, body)
        if body.instruction is not None:
            _check_texts([body.instruction], "instruction", indexed=False)
            options = {"instruction": body.instruction}
        else:
            options = {"instruction": MODEL_DEFAULT}
        seqs = await _tokenize(embedder.prepare, [body.query], **options)
        longer = lambda _: state.embed_probe.texts().prepare([body.query], **options)  # noqa: E731
        truncated = await _truncated(seqs, state.input_limit, longer)
        _handle_truncated(state, truncated, state.input_limit, "query", "/v1/search")
        query = _finish(embedder, await _run(state.embed_batcher, seqs, request), index.dim, for_search=True)
        hits = (await run_in_threadpool(index.search_vectors, query, body.top_k, params))[0]
        tokens = len(seqs[0])
        pair_truncated: list[bool] = []
        if body.rerank and hits:
            from qembed.index.store import rerank_hits

            head = hits[: body.rerank_top or len(hits)]
            pairs, pair_truncated = await _prepare_pairs(state, body.query, [h.text for h in head], body.instruction,
                                                         "query", "/v1/search")  # fmt: skip
            scores = await _run(state.rerank_batcher, pairs, request)
            cut = {id(hit) for hit, flag in zip(head, pair_truncated) if flag}
            hits = rerank_hits(state.reranker, body.query, hits, body.rerank_top, body.instruction, scores=scores)
            tokens += sum(map(len, pairs))
        results = []
        for hit in hits:
            result = {k: v for k, v in vars(hit).items() if v is not None}
            if pair_truncated and hit.rerank_score is not None:
                result["truncated"] = id(hit) in cut
            results.append(result)
        return await _json({"results": results, "query_truncated": truncated[0], "usage": _usage(tokens)})


async def _prepare_pairs(state: ServerState, query: str, documents: list[str], instruction: str | None, param: str,
                         route: str) -> tuple[list[list[int]], list[bool]]:  # fmt: skip
    """Token ids of (query, document) pairs for the reranker, and which of them were cut at its limit."""
    reranker, probe = state.reranker, state.rerank_probe
    seqs = await _tokenize(lambda docs: reranker.prepare_pairs(query, docs, instruction=instruction), documents)
    truncated = await _truncated(seqs, state.rerank_limit, lambda at: probe.texts().prepare_pairs(
        query, [documents[i] for i in at], instruction=instruction))  # fmt: skip
    _handle_truncated(state, truncated, state.rerank_limit, param, route)
    return seqs, truncated


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


def _require_index(state: ServerState):
    if state.index is None:
        raise ApiError(404, "no index loaded: start the server with --index DIR (built by `qembed index build`)",
                       code="feature_disabled")  # fmt: skip
    return state.index
