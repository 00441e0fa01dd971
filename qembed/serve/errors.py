"""OpenAI-shaped errors (`{"error": {"message", "type", "param", "code"}}`) and the request guard:
metrics by route and status, API key, body size limit and the in-flight request limit."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {401: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


class ApiError(Exception):
    """An error answered to the client with `status` and the OpenAI error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> Response:  # fmt: skip
    """The error as a response (ASCII JSON: a message may quote any text a client sent)."""
    return Response(json.dumps(error_body(status, message, param, code)), status_code=status, headers=headers,
                    media_type="application/json")  # fmt: skip


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return error_response(400, message, param=loc[0] if loc else None, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "unknown route: see GET /v1/models, POST /v1/embeddings, /v1/rerank, /v1/search"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception):
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return error_response(500, "internal server error")


class Guard:
    """ASGI middleware in front of the app: metrics, API key, body size and read time, in-flight limit.

    `/health` and the API documentation (`/docs`, `/redoc`, `/openapi.json`) are never refused; `/metrics`
    needs the key only with `metrics_require_key`, and is never refused for load. The body is read here (up to `max_request_bytes`, within
    `body_timeout` seconds) and replayed to the app; later `receive` calls reach the client, so a handler
    can watch for a disconnect.
    """

    OPEN = ("/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")

    def __init__(self, app, *, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.state.routes else "other"
        status_holder = {"status": 500}
        start = time.perf_counter()

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        metrics = self.state.metrics
        try:
            await self._guarded(scope, receive, send_wrapped, path)
        finally:
            metrics.requests.labels(route, str(status_holder["status"])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _guarded(self, scope, receive, send, path):
        config = self.state.config
        if path in self.OPEN or (path == "/metrics" and not config.metrics_require_key):
            return await self._call(scope, receive, send)
        if config.api_key and not _authorized(scope, config.api_key):
            return await _send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                     code="invalid_api_key")  # fmt: skip
        if path == "/metrics":  # never refused for load: it is how an overload is seen
            return await self._call(scope, receive, send)
        if self.state.in_flight >= config.max_concurrent_requests:
            return await _send_error(send, 429, f"too many requests in flight (limit {config.max_concurrent_requests}): "
                                     "retry later", code="rate_limit_exceeded", headers={"retry-after": "1"})  # fmt: skip
        self.state.in_flight += 1
        self.state.metrics.in_flight.set(self.state.in_flight)
        try:
            try:
                body = await asyncio.wait_for(_read_body(scope, receive, config.max_request_bytes),
                                              timeout=config.body_timeout)  # fmt: skip
            except TimeoutError:
                return await _send_error(send, 408, f"the request body did not arrive within {config.body_timeout:g} s",
                                         code="body_timeout", headers={"connection": "close"})  # fmt: skip
            if body is None:
                return await _send_error(send, 413, f"request body over {config.max_request_bytes} bytes",
                                         code="request_too_large", headers={"connection": "close"})  # fmt: skip
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self._call(scope, replay, send)
        finally:
            self.state.in_flight -= 1
            self.state.metrics.in_flight.set(self.state.in_flight)

    async def _call(self, scope, receive, send):
        """The app, with an unexpected exception answered as a 500 here: re-raised to the server, it would
        close the client's keep-alive connection."""
        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            log.error("internal error on %s: %s: %s", scope["path"], type(exc).__name__, exc, exc_info=exc)
            if not started:
                await _send_error(send, 500, "internal server error", code="internal_error")


def _authorized(scope, key: str) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


async def _read_body(scope, receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is (or announces to be) over `limit` bytes."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                if int(value) > limit:
                    return None
            except ValueError:
                pass
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send_error(send, status: int, message: str, *, code: str, headers: dict | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
