"""Run the app with uvicorn; SIGTERM/SIGINT stop accepting, finish the requests in flight, then exit;
SIGHUP reopens the index folder (as `POST /admin/reload` does)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from qembed.serve.app import ServeConfig, create_app, reload_index
from qembed.serve.errors import ApiError

log = logging.getLogger(__name__)


def serve(embedder, *, reranker=None, index=None, config: ServeConfig | None = None, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "warning") -> None:  # fmt: skip
    """Serve until stopped (uvicorn handles SIGTERM gracefully: in-flight requests complete)."""
    import uvicorn

    app = create_app(embedder, reranker=reranker, index=index, config=config)
    print(f"qembed serve: listening on http://{host}:{port} (GET /health is 200 once the model is warmed up)",
          flush=True)  # fmt: skip
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal it stopped on once shut down: with this handler that is a no-op,
        # so a graceful SIGTERM ends with exit status 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
        state = app.state.qembed
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=_reload, args=(state,), daemon=True).start())
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=60)
    print("qembed serve: stopped", flush=True)


def _reload(state) -> None:
    """SIGHUP: reload the index (the outcome is logged; a failed reload keeps the old one)."""
    if not state.ready or state.index is None:
        log.warning("qembed serve: SIGHUP ignored: %s", "no index loaded" if state.ready else "still loading")
        return
    with contextlib.suppress(ApiError):  # reload_index has logged why
        reload_index(state)
