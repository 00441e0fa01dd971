"""Dynamic batching: inputs of concurrent requests merged into token-budget batches run by one model thread.

Each model has a `Batcher` whose former thread picks the next batch from the pending inputs (always
including the oldest, grouped by length with `token_budget_batches`) and pads it while the `ModelWorker`
thread runs the current one; at most one formed batch waits, so a batch is formed from everything that
arrived while the previous one ran. Results go back to their requests in input order; inputs of a request
whose client went away are dropped before they reach the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qembed.models.batching import token_budget_batches

log = logging.getLogger(__name__)

SCAN_LIMIT = 4096  # pending inputs looked at when forming one batch
#: Real tokens a served batch holds before it closes rather than pad a shorter input (the padding rule of
#: `token_budget_batches`). Measured with bench/bench_serve.py on all-MiniLM-L6-v2, 64 clients x 1 query
#: (about 9 tokens): at 256 every batch took all queued queries and padded them 2.5x to the longest, at 64
#: padding fell to 1.2x and server CPU per text by 1.35x (32 was within noise of 64). Padding costs every
#: layer; the per-batch overhead that a larger minimum amortises is worth only a few dozen tokens.
MIN_BATCH_TOKENS = 64


class ModelWorker:
    """The one thread that runs forward passes; `slot` lets at most one formed batch wait for it."""

    def __init__(self) -> None:
        self.slot = threading.Semaphore(1)
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="qembed-model", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        """Queue a formed batch (call after acquiring `slot`)."""
        self._jobs.put(fn)

    def _run(self) -> None:
        while (fn := self._jobs.get()) is not None:
            self.slot.release()  # the batch is taken: the next one may be formed while this one runs
            with torch.inference_mode():
                fn()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)


@dataclass
class Job:
    """One request's inputs and, once done, their results in input order."""

    seqs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    enqueued: float = field(default_factory=time.perf_counter)
    waited: bool = False

    def __post_init__(self) -> None:
        self.results = [None] * len(self.seqs)
        self.remaining = len(self.seqs)

    def finish(self, error: BaseException | None = None) -> None:
        def settle() -> None:
            if not self.future.done():
                if error is None:
                    self.future.set_result(self.results)
                else:
                    self.future.set_exception(error)

        self.loop.call_soon_threadsafe(settle)


class Batcher:
    """Batches the token-id sequences of concurrent requests for one model.

    `collate(seqs)` pads a batch (runs on the former thread); `forward(batch)` returns one result per row
    (runs on the model thread). `per_request=True` turns dynamic batching off: a batch holds inputs of
    one request only (for comparisons). `min_batch_tokens`: see `MIN_BATCH_TOKENS`.
    """

    def __init__(self, worker: ModelWorker, *, collate: Callable, forward: Callable, max_batch_tokens: int,
                 metrics=None, name: str = "embed", per_request: bool = False,
                 min_batch_tokens: int = MIN_BATCH_TOKENS) -> None:  # fmt: skip
        self.worker, self.collate, self.forward = worker, collate, forward
        self.min_batch_tokens = min_batch_tokens
        self.max_batch_tokens, self.metrics, self.name, self.per_request = max_batch_tokens, metrics, name, per_request
        self._pending: deque[tuple[Job, int]] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._form_batches, name=f"qembed-{name}-batcher", daemon=True)
        self._thread.start()

    def submit(self, seqs: Sequence[Sequence[int]]) -> Job:
        """Queue a request's inputs (from the event loop); await `job.future` for the results."""
        loop = asyncio.get_running_loop()
        job = Job([list(s) for s in seqs], loop, loop.create_future())
        if not job.seqs:
            job.future.set_result([])
            return job
        with self._cond:
            self._pending.extend((job, i) for i in range(len(job.seqs)))
            self._set_depth()
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop the job's inputs that have not reached the model yet."""
        with self._cond:
            job.cancelled = True

    def pending(self) -> int:
        return len(self._pending)

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name).set(len(self._pending))

    def _take(self) -> list[tuple[Job, int]]:
        """Remove and return the next batch from the pending inputs (called with the lock held)."""
        while self._pending and self._pending[0][0].cancelled:
            self._pending.popleft()
            self._count_dropped(1)
        if not self._pending:
            return []
        head_job = self._pending[0][0]
        window: list[tuple[Job, int]] = []
        for item in self._pending:
            if len(window) >= SCAN_LIMIT:
                break
            if item[0].cancelled or (self.per_request and item[0] is not head_job):
                continue
            window.append(item)
        lengths = [len(job.seqs[i]) for job, i in window]
        batches = token_budget_batches(lengths, self.max_batch_tokens, min_batch_tokens=self.min_batch_tokens)
        chosen = next(b for b in batches if 0 in b)  # the oldest input always goes in the next batch
        taken = [window[i] for i in sorted(chosen)]
        taken_ids = {(id(job), i) for job, i in taken}
        kept = deque(item for item in self._pending if (id(item[0]), item[1]) not in taken_ids)
        live = deque(item for item in kept if not item[0].cancelled)
        self._count_dropped(len(kept) - len(live))
        self._pending = live
        return taken

    def _count_dropped(self, count: int) -> None:
        self.dropped += count
        if self.metrics is not None and count:
            self.metrics.dropped.labels(self.name).inc(count)

    def _form_batches(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
            self.worker.slot.acquire()  # wait until no formed batch is waiting for the model
            with self._cond:
                items = self._take()
                self._set_depth()
            if not items:
                self.worker.slot.release()
                continue
            now = time.perf_counter()
            seqs = [job.seqs[i] for job, i in items]
            if self.metrics is not None:
                for job, _ in items:
                    if not job.waited:
                        job.waited = True
                        self.metrics.queue_wait.labels(self.name).observe(now - job.enqueued)
                width = max(len(s) for s in seqs)
                self.metrics.batch_size.labels(self.name).observe(len(seqs))
                self.metrics.padded_tokens.labels(self.name).observe(len(seqs) * width)
                self.metrics.tokens.labels(self.name).inc(sum(len(s) for s in seqs))
            try:
                batch = self.collate(seqs)
            except Exception as exc:  # pragma: no cover - a bug, reported to the requests
                self.worker.submit(lambda items=items, exc=exc: _fail(items, exc))
                continue
            self.worker.submit(lambda items=items, batch=batch: self._run(items, batch))

    def _run(self, items: list[tuple[Job, int]], batch) -> None:
        live = [(job, i) for job, i in items if not job.cancelled]
        if len(live) < len(items):  # a client went away while its inputs waited in this formed batch
            self._count_dropped(len(items) - len(live))
            if not live:
                return
            items, batch = live, self.collate([job.seqs[i] for job, i in live])
        try:
            begin = time.perf_counter()
            outputs = self.forward(batch)
            if self.metrics is not None:
                self.metrics.forward.labels(self.name).observe(time.perf_counter() - begin)
        except Exception as exc:
            log.exception("forward pass failed")
            _fail(items, exc)
            return
        for (job, i), output in zip(items, outputs):
            job.results[i] = output
            job.remaining -= 1
            if job.remaining == 0:
                job.finish()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=30)


def _fail(items: list[tuple[Job, int]], exc: BaseException) -> None:
    for job in {id(job): job for job, _ in items}.values():
        job.finish(RuntimeError(f"model error: {type(exc).__name__}"))
