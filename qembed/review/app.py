"""The review web app (FastAPI): one static page (`static/index.html`, no build step, no external assets),
a small JSON API over `LabelStore`, and the `/report` page (re-read from the labels file on each visit,
so labels appended by an LLM judge running beside it show up)."""

from __future__ import annotations

import signal
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from qembed.errors import QembedError
from qembed.review.labels import LabelStore, check_reviewer, read_review
from qembed.review.report import build_report, report_html, threshold_plot


def create_app(labels: str | Path):
    from fastapi import Body, FastAPI, HTTPException, Query
    from fastapi.responses import HTMLResponse, Response

    store = LabelStore(labels)
    page = resources.files("qembed.review").joinpath("static", "index.html").read_text(encoding="utf-8")
    app = FastAPI(title="qembed review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store

    def checked(call, *args: Any) -> dict[str, Any]:
        try:
            return call(*args)
        except QembedError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "items": len(store.items)}

    @app.get("/api/state")
    def state(reviewer: str = Query(...)) -> dict[str, Any]:
        return checked(lambda name: store.state(check_reviewer(name)), reviewer)

    @app.post("/api/label")
    def label(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return checked(store.label, body.get("reviewer"), body.get("item"), body.get("label"), str(body.get("event")))

    @app.post("/api/undo")
    def undo(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return checked(store.undo, body.get("reviewer"), str(body.get("event")))

    @app.get("/report", response_class=HTMLResponse)
    def report() -> str:
        data = build_report(read_review(store.path))
        return report_html(data, threshold_plot(data))

    @app.get("/api/report")
    def report_json() -> dict[str, Any]:
        return build_report(read_review(store.path))

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    return app


def serve(labels: str | Path, *, host: str = "127.0.0.1", port: int = 8100, log_level: str = "warning") -> None:
    """Serve the review page until stopped (SIGTERM/Ctrl-C)."""
    import uvicorn

    app = create_app(labels)
    print(f"qembed review: {len(app.state.store.items)} items; label at http://{host}:{port}/ "
          f"(report: http://{host}:{port}/report)", flush=True)  # fmt: skip
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises it after a graceful stop
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        app.state.store.close()
    print("qembed review: stopped", flush=True)
