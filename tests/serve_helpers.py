"""Start `qembed serve` (the CLI, a real process) or a `create_app` app (uvicorn in a thread) on a free
127.0.0.1 port and stop it; raw HTTP/1.1 on one keep-alive socket."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(args: list[str], log: Path, env: dict | None = None, timeout: float = 180) -> Server:
    """`python -m qembed serve ARGS --port P`, waiting until `/health` answers 200."""
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}  # fmt: skip
    handle = log.open("w")
    process = subprocess.Popen([sys.executable, "-m", "qembed", "serve", *args, "--port", str(port)],
                               stdout=handle, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)  # fmt: skip
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server did not become healthy:\n{log.read_text()}")


@contextlib.contextmanager
def serve_app(app, timeout: float = 120):
    """Run a `create_app` app with uvicorn on a free 127.0.0.1 port in a thread; yields its URL once
    `/health` is 200."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the app did not become healthy"
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def raw_post(sock: socket.socket, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 POST on an open (keep-alive) socket: (status, headers, body) of the answer."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n{extra}\r\n".encode() + body)  # fmt: skip
    return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Read one HTTP response with a Content-Length body; raises ConnectionError if the socket closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]
