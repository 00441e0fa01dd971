"""The dynamic batcher on its own: input order across batches, dropping inputs of a cancelled request."""

from __future__ import annotations

import asyncio
import threading

from qembed.serve.batcher import Batcher, ModelWorker


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
