"""Multi-process training helpers (`torchrun`): cross-rank embedding gathering and gradient averaging.

Scheme: every rank reads the same global batch (same seed) and encodes its own contiguous shard of the
records. Embeddings are all-gathered with the local tensor put back in its slot, so the full global loss
can be computed on every rank while gradients flow only into the local shard's embeddings. Each rank's
parameter gradient is then exactly its shard's contribution to the gradient of the global loss; summing
them over ranks gives the full gradient, which is why the loss is multiplied by the world size before
backward and the gradients are then averaged (`average_gradients`, the same average DDP performs).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env() -> bool:
    """Initialise the process group when launched by `torchrun` (WORLD_SIZE > 1). Returns whether it did."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shard_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when n items are cut into `parts` contiguous, near-equal parts."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def gather_with_grad_local(local: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order (ranks may hold different row counts); the local slot is
    `local` itself, so autograd reaches the local rows and no other."""
    if not is_distributed():
        return local
    n = world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=local.device))
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = local.detach().new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded.contiguous())
    parts = [part[:size] for part, size in zip(parts, sizes)]
    parts[rank()] = local
    return torch.cat(parts)


def average_gradients(parameters: Iterable[torch.nn.Parameter], bucket_bytes: int = 64 << 20) -> None:
    """All-reduce `.grad` of every trainable parameter and divide by the world size, in flat buckets.
    A trainable parameter without a gradient counts as zero (every rank must send the same buckets)."""
    if not is_distributed():
        return
    grads = []
    for p in parameters:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
