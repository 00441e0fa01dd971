"""Token-budget batching: sort by length, cut batches so that (rows x longest row) stays under a budget.

Runtimes that compile a kernel set per input shape (OpenVINO) keep every shape they have seen (0.5-3 MB each
for all-MiniLM-L6-v2 int8), so a corpus encoded in batches of every possible (rows, width) grows their memory
without bound (1.2 GB over 30K documents). With `shape_buckets=True` a batch is padded to a width from a short
geometric ladder (`bucket_up`: four sizes per octave) and holds a power of two of rows (`row_bucket_up`),
which bounds the number of shapes; corpus encoding also pads a chunk's last, short batch to `steady_rows`, so
a corpus runs in about one shape per width (see docs/scale.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _step(n: int) -> int:
    return 1 << max(0, n.bit_length() - 3)


def bucket_up(n: int) -> int:
    """The smallest size of the ladder 1..8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... that holds `n`
    (four sizes per octave: at most 25 % padding)."""
    step = _step(n)
    return -(-n // step) * step


def row_bucket_up(n: int) -> int:
    """The smallest power of two that holds `n` rows (the row ladder of `shape_buckets`)."""
    return 1 << max(0, n - 1).bit_length()


def row_bucket_down(n: int) -> int:
    """The largest power of two not above `n` (n >= 1)."""
    return 1 << (n.bit_length() - 1)


def full_rows(width: int, batch_tokens: int, max_batch_size: int = 512) -> int:
    """Rows of a full batch of padded width `width` under `token_budget_batches(shape_buckets=True)`: the
    largest power of two within the budget and `max_batch_size` (at least 1)."""
    return row_bucket_down(min(max_batch_size, max(1, batch_tokens // width)))


def steady_rows(longest: int, batch_tokens: int, min_batch_tokens: int, max_batch_size: int = 512) -> int:
    """The rows a shape-bucketed batch whose longest text has `longest` tokens is run with at least, when a
    corpus is encoded: the power of two of rows that makes up `min_batch_tokens` at its padded width, at most
    a full batch's. A chunk's last batch is the one batch with fewer rows (`token_budget_batches`); padded to
    this, it runs in a shape the chunk's other batches have compiled. For encoders (batches fill:
    `min_batch_tokens == batch_tokens`) that is one shape per width; decoders' batches close early, at
    `min_batch_tokens` real tokens, so this costs them little padding and removes only the smallest row
    counts."""
    width = bucket_up(longest)
    return min(full_rows(width, batch_tokens, max_batch_size), row_bucket_up(-(-min_batch_tokens // width)))


def token_budget_batches(
    lengths: Sequence[int],
    batch_tokens: int,
    *,
    max_batch_size: int = 512,
    min_batch_tokens: int = 256,
    max_padding: float = 0.05,
    shape_buckets: bool = False,
) -> list[list[int]]:
    """Indices grouped into batches, longest texts first.

    A batch's padded size (rows x its longest length) stays within `batch_tokens` (a single text longer than
    the budget gets a batch of its own). Once a batch holds `min_batch_tokens` real tokens, which is enough to
    keep the matrix products efficient, it also closes before a text more than `max_padding` shorter than
    its longest, so padding stays a small fraction of the work.

    `shape_buckets`: the batch will be padded to `(row_bucket_up(rows), bucket_up(width))`, so its width counts
    as `bucket_up(longest)`, a full batch holds `row_bucket_down` of the rows that fit, the padding rule
    compares width buckets and closes a batch only at a power of two of rows: it takes the next, shorter texts
    (padding columns) rather than leave rows to pad, so only a chunk's last batch has padding rows.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    size = bucket_up if shape_buckets else (lambda n: n)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real_tokens = 0
    for index in order:
        if current:
            longest = size(lengths[current[0]])  # sorted descending: the first item of a batch is its longest
            if shape_buckets:
                full = len(current) >= full_rows(longest, batch_tokens, max_batch_size)
            else:
                full = len(current) >= min(max_batch_size, max(1, batch_tokens // longest))
            wasteful = real_tokens >= min_batch_tokens and size(lengths[index]) < (1 - max_padding) * longest
            if shape_buckets and wasteful:
                wasteful = row_bucket_up(len(current)) == len(current)
            if full or wasteful:
                batches.append(current)
                current, real_tokens = [], 0
        current.append(index)
        real_tokens += lengths[index]
    if current:
        batches.append(current)
    return batches


def pad_batch(
    token_ids: Sequence[Sequence[int]], pad_id: int, *, left: bool, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Pad id lists into `input_ids` / `attention_mask` tensors.

    Left padding (decoder models) also returns `position_ids` counted from each sequence's first real token,
    so a text's result does not depend on how much padding its batch needed.
    """
    width = max((len(ids) for ids in token_ids), default=0)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        if not ids:
            continue
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if left:
        batch["position_ids"] = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {name: tensor.to(device) for name, tensor in batch.items()}


@dataclass(frozen=True)
class BatchDefaults:
    """A model family's measured batching: padded-token budget and the real tokens a batch holds before the
    padding rule may close it (see `token_budget_batches`)."""

    batch_tokens: int
    min_batch_tokens: int


#: Measured on CPU (`bench/bench_batching.py`, commit fdc0e0c for the decoders). Qwen3-style decoders are
#: dominated by their weights: 256 real tokens already saturate the matrix products, so batches close early
#: to save padding. Small bidirectional encoders (MiniLM, 384 hidden) are dominated by per-batch overhead:
#: many small batches cost up to 2x, so their batches fill to 4,096 padded tokens (about sentence-transformers'
#: 32 texts), beyond which activations and attention outgrow the cache.
FAMILY_DEFAULTS = {"decoder": BatchDefaults(16384, 256), "encoder": BatchDefaults(4096, 4096)}
GPU_DEFAULTS = BatchDefaults(16384, 256)  # not measured per family (no GPU in the measurement runs)


def default_batching(decoder: bool, device_type: str) -> BatchDefaults:
    """The measured batching of a model family (`decoder`: Qwen3-style causal models) on a device type."""
    if device_type != "cpu":
        return GPU_DEFAULTS
    return FAMILY_DEFAULTS["decoder" if decoder else "encoder"]
