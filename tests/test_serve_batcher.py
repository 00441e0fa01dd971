"""The dynamic batcher on its own: input order across batches, dropping inputs of a cancelled request."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

import numpy as np

from qembed.serve.batcher import WINDOW_BATCHES, Batcher, ModelWorker


def test_batches_keep_order_and_drop_cancelled_inputs():
    seen: list[list[int]] = []
    gate = threading.Event()

    def forward(batch):
        gate.wait(timeout=30)
        seen.append([s[0] for s in batch])
        return [s[0] * 10 for s in batch]

    async def scenario():
        worker = ModelWorker()
        batcher = Batcher(worker, collate=lambda seqs: seqs, forward=forward, max_batch_tokens=8)
        first = batcher.submit([[1, 1, 1]])  # runs first, held at the gate
        await asyncio.sleep(0.2)
        second = batcher.submit([[2] * n for n in (1, 3, 2, 4, 1)])  # several batches (8 padded tokens each)
        third = batcher.submit([[3, 3], [4, 4]])
        await asyncio.sleep(0.2)
        batcher.cancel(third)
        gate.set()
        results = await asyncio.gather(first.future, second.future)
        await asyncio.sleep(0.2)
        batcher.stop()
        worker.stop()
        return results, batcher.dropped

    (first, second), dropped = asyncio.run(scenario())
    assert first == [10] and second == [20] * 5
    assert 3 not in {v for batch in seen for v in batch}  # the cancelled request never reached the model
    assert dropped == 2 and len(seen) >= 3  # the second request needed more than one batch


def test_short_inputs_are_not_padded_to_a_long_one_once_a_batch_is_worth_running():
    """Queued requests of 8-token and 2-token inputs: the batcher merges requests but cuts between the
    lengths (64 real tokens already make a batch), instead of padding the short inputs 4x."""
    seen: list[list[int]] = []
    gate = threading.Event()

    def forward(batch):
        gate.wait(timeout=30)
        seen.append([len(s) for s in batch])
        return [len(s) for s in batch]

    async def scenario():
        worker = ModelWorker()
        batcher = Batcher(worker, collate=lambda seqs: seqs, forward=forward, max_batch_tokens=4096)
        held = batcher.submit([[1]])  # runs first, held at the gate while the others queue
        await asyncio.sleep(0.2)
        jobs = [batcher.submit([[2] * 8] * 4), batcher.submit([[3] * 2] * 8), batcher.submit([[4] * 8] * 4)]
        gate.set()
        results = await asyncio.gather(held.future, *(job.future for job in jobs))
        batcher.stop()
        worker.stop()
        return results

    results = asyncio.run(scenario())
    assert results == [[1], [8] * 4, [2] * 8, [8] * 4]
    assert sorted(seen[1:]) == [[2] * 8, [8] * 8]  # requests merged, lengths not mixed


def test_taking_a_batch_looks_at_a_window_of_the_queue_not_all_of_it():
    """20,000 queued one-input requests: forming each batch visits at most WINDOW_BATCHES batches' worth
    of the queue (it used to rebuild the whole queue twice per batch, under the lock `submit` takes on the
    event loop), and every request still gets its own result."""
    visits, per_take = 0, []

    class CountingDeque(deque):
        def __iter__(self):
            nonlocal visits
            for item in super().__iter__():
                visits += 1
                yield item

    gate = threading.Event()

    def forward(batch):
        gate.wait(timeout=30)
        return [s[0] for s in batch]

    async def scenario():
        worker = ModelWorker()
        batcher = Batcher(worker, collate=lambda seqs: seqs, forward=forward, max_batch_tokens=64)
        batcher._pending = CountingDeque()
        take = batcher._take

        def counted_take():
            before = visits
            taken = take()
            per_take.append((visits - before, len(taken)))
            return taken

        batcher._take = counted_take
        jobs = [batcher.submit([[n]]) for n in range(20_000)]
        gate.set()
        results = await asyncio.gather(*(job.future for job in jobs))
        batcher.stop()
        worker.stop()
        return results

    results = asyncio.run(scenario())
    assert results == [[n] for n in range(20_000)]
    batches = [taken for _, taken in per_take if taken]
    assert sum(batches) == 20_000 and max(batches) == 64
    assert max(seen for seen, _ in per_take) <= WINDOW_BATCHES * 64 + 1  # + the one that ends the window


def test_library_app_health_is_503_until_the_model_is_loaded(tiny_embedder_path, one_torch_thread):
    """`create_app` with a loader: /health and /v1 routes answer 503 (error shape) until it has loaded;
    with `auto_truncate=False` an input over `max_input_tokens` is a 400, not silently cut."""
    import time

    import httpx
    import uvicorn
    from serve_helpers import free_port

    from qembed import Embedder
    from qembed.serve import ServeConfig, create_app

    release = threading.Event()

    def load():
        release.wait(timeout=60)
        return Embedder.from_pretrained(tiny_embedder_path)

    port = free_port()
    app = create_app(load, config=ServeConfig(served_model_name="tiny", max_input_tokens=8, auto_truncate=False))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "model_not_ready"
        response = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": "a"})
        assert response.status_code == 503 and "retry-after" in response.headers
        release.set()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        response = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": "a"})
        assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 64
        embedder = Embedder.from_pretrained(tiny_embedder_path)
        fits, too_long = "one two three four five six", "one two three four five six seven eight"
        assert len(embedder.prepare([fits])[0]) <= 8 < len(embedder.prepare([too_long])[0])
        response = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": [fits, too_long]})
        assert response.status_code == 400 and response.json()["error"]["code"] == "input_too_long"
        assert "input[1]" in response.json()["error"]["message"]
        response = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": [fits]})
        assert response.status_code == 200
        assert abs(np.array(response.json()["data"][0]["embedding"]) - embedder.encode([fits])[0]).max() <= 1e-5
    finally:
        server.should_exit = True
        thread.join(timeout=30)
