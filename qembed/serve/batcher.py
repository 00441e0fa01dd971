"""Dynamic batching: inputs of concurrent requests merged into token-budget batches run by one model thread.

Each model has a `Batcher` whose former thread picks the next batch from the pending inputs (always
including the oldest, grouped by length with `token_budget_batches`) and pads it while the `ModelWorker`
thread runs the current one; at most one formed batch waits, so a batch is formed from everything that
arrived while the previous one ran. Results go back to their requests in input order; inputs of a request
whose client went away are dropped before they reach the model. A batch that raises fails its own requests;
if the model thread itself stops, every queued and later request fails at once (`ModelThreadDied`).
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
WINDOW_BATCHES = 4  # ... and at most this many batches' worth of tokens (`max_batch_tokens` each)
#: Real tokens a served batch holds before it closes rather than pad a shorter input (the padding rule of
#: `token_budget_batches`). Measured with bench/bench_serve.py on all-MiniLM-L6-v2, 64 clients x 1 query
#: (about 9 tokens): at 256 every batch took all queued queries and padded them 2.5x to the longest, at 64
#: padding fell to 1.2x and server CPU per text by 1.35x (32 was within noise of 64). Padding costs every
#: layer; the per-batch overhead that a larger minimum amortises is worth only a few dozen tokens.
MIN_BATCH_TOKENS = 64


class ModelThreadDied(RuntimeError):
    """The model thread stopped: no request can be served until the server restarts."""


class ModelWorker:
    """The one thread that runs forward passes; `slot` lets at most one formed batch wait for it.

    A batch that raises an `Exception` fails its own requests and the thread goes on. Anything that escapes
    that guard stops the thread: `error` says why, the batches queued for it and every later one fail with
    `ModelThreadDied`, and the `on_death` callbacks run (the batchers fail their pending inputs).
    """

    def __init__(self) -> None:
        self.slot = threading.Semaphore(1)
        self.error: str | None = None
        self.on_death: list[Callable[[ModelThreadDied], None]] = []
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="qembed-model", daemon=True)
        self._thread.start()

    def submit(self, items: list, fn: Callable[[], None]) -> None:
        """Queue a formed batch `fn` running `items` (call after acquiring `slot`)."""
        with self._lock:
            if self.error is None:
                self._jobs.put((items, fn))
                return
        self.slot.release()  # no thread will take it
        _fail(items, ModelThreadDied(self.error))

    def _run(self) -> None:
        items: list = []
        try:
            while (entry := self._jobs.get()) is not None:
                items, fn = entry
                self.slot.release()  # the batch is taken: the next one may be formed while this one runs
                try:
                    with torch.inference_mode():
                        fn()
                except Exception as exc:
                    log.exception("qembed serve: a batch failed")
                    _fail(items, exc)
                items = []
        except BaseException as exc:  # noqa: BLE001 - whatever it was, requests must not wait for this thread
            self._die(exc, items)

    def _die(self, exc: BaseException, running: list) -> None:
        error = ModelThreadDied(f"the model thread stopped ({type(exc).__name__}: {exc}".splitlines()[0] + ")")
        log.error("qembed serve: %s: every request fails until the server restarts", error)
        with self._lock:
            self.error = str(error)
            queued = []
            while True:
                try:
                    entry = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if entry is not None:
                    queued.extend(entry[0])
        _fail(running + queued, error)
        self.slot.release()
        for callback in self.on_death:
            callback(error)

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
    taken: list = field(default_factory=list)  # per input: already in a formed batch

    def __post_init__(self) -> None:
        self.results = [None] * len(self.seqs)
        self.taken = [False] * len(self.seqs)
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
        self._untaken = 0
        self._cond = threading.Condition()
        self._stopped = False
        self.dropped = 0
        worker.on_death.append(self._fail_pending)
        self._thread = threading.Thread(target=self._form_batches, name=f"qembed-{name}-batcher", daemon=True)
        self._thread.start()

    def submit(self, seqs: Sequence[Sequence[int]]) -> Job:
        """Queue a request's inputs (from the event loop); await `job.future` for the results."""
        loop = asyncio.get_running_loop()
        job = Job([list(s) for s in seqs], loop, loop.create_future())
        if not job.seqs:
            job.future.set_result([])
            return job
        if self.worker.error is not None:
            job.future.set_exception(ModelThreadDied(self.worker.error))
            return job
        with self._cond:
            self._pending.extend((job, i) for i in range(len(job.seqs)))
            self._untaken += len(job.seqs)
            self._set_depth()
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop the job's inputs that have not reached the model yet."""
        with self._cond:
            job.cancelled = True

    def pending(self) -> int:
        """Inputs queued and not yet in a formed batch (those of cancelled requests until they are dropped)."""
        return self._untaken

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name).set(self._untaken)

    def _pop_dead_head(self) -> None:
        """Remove the inputs at the front that are taken or whose request was cancelled."""
        pending = self._pending
        while pending:
            job, i = pending[0]
            if job.taken[i]:
                pending.popleft()
            elif job.cancelled:
                pending.popleft()
                self._untaken -= 1
                self._count_dropped(1)
            else:
                break

    def _take(self) -> list[tuple[Job, int]]:
        """Remove and return the next batch from the pending inputs (called with the lock held).

        Only a window at the front is looked at: at most `SCAN_LIMIT` queued inputs and no more than
        `WINDOW_BATCHES` batches' worth of tokens, so the cost is bounded by the batch, not by the queue.
        Inputs taken from the middle of the window are marked and skipped until they reach the front.
        """
        self._pop_dead_head()
        if not self._pending:
            return []
        head_job = self._pending[0][0]
        window: list[tuple[Job, int]] = []
        tokens, token_limit = 0, WINDOW_BATCHES * self.max_batch_tokens
        for visited, item in enumerate(self._pending):
            job, i = item
            if visited >= SCAN_LIMIT or tokens >= token_limit or (self.per_request and job is not head_job):
                break
            if job.taken[i] or job.cancelled:
                continue
            window.append(item)
            tokens += len(job.seqs[i])
        lengths = [len(job.seqs[i]) for job, i in window]
        batches = token_budget_batches(lengths, self.max_batch_tokens, min_batch_tokens=self.min_batch_tokens)
        chosen = next(b for b in batches if 0 in b)  # the oldest input always goes in the next batch
        taken = [window[i] for i in sorted(chosen)]
        for job, i in taken:
            job.taken[i] = True
        self._untaken -= len(taken)
        self._pop_dead_head()
        return taken

    def _fail_pending(self, error: ModelThreadDied) -> None:
        """The model thread is gone: fail every queued request now rather than let it wait forever."""
        with self._cond:
            items = list(self._pending)
            self._pending.clear()
            self._untaken = 0
            self._set_depth()
        _fail(items, error)

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
            except Exception as exc:  # a bug: reported to the requests of this batch
                log.exception("qembed serve: padding a batch failed")
                self.worker.slot.release()
                _fail(items, exc)
                continue
            self.worker.submit(items, lambda items=items, batch=batch: self._run(items, batch))

    def _run(self, items: list[tuple[Job, int]], batch) -> None:
        live = [(job, i) for job, i in items if not job.cancelled]
        if len(live) < len(items):  # a client went away while its inputs waited in this formed batch
            self._count_dropped(len(items) - len(live))
            if not live:
                return
            items, batch = live, self.collate([job.seqs[i] for job, i in live])
        begin = time.perf_counter()
        outputs = self.forward(batch)  # an exception fails this batch's requests (`ModelWorker`)
        if len(outputs) != len(items):
            raise RuntimeError(f"the forward pass gave {len(outputs)} results for {len(items)} inputs")
        if self.metrics is not None:
            self.metrics.forward.labels(self.name).observe(time.perf_counter() - begin)
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
    """Fail the requests of `items` (each once): `ModelThreadDied` as is, anything else as a model error."""
    error = exc if isinstance(exc, ModelThreadDied) else RuntimeError(f"model error: {type(exc).__name__}")
    for job in {id(job): job for job, _ in items}.values():
        if not job.cancelled:  # a cancelled request has been answered already
            job.finish(error)
