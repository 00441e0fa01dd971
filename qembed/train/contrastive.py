"""One contrastive training step's forward/backward: chunked encoding (optionally gradient-cached),
cross-rank gathering, and the InfoNCE / Matryoshka loss over the global batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qembed.train import distributed
from qembed.train.gradcache import encode_and_backward
from qembed.train.losses import info_nce, matryoshka_info_nce


@dataclass
class LossConfig:
    """InfoNCE options (see `qembed.train.losses.info_nce`); `mrl_dims` switches to the Matryoshka average."""

    temperature: float = 0.01
    qq_dd: bool = True
    fn_margin: float | None = 0.1
    mrl_dims: Sequence[int] | None = None


def compute_loss(
    q: torch.Tensor, docs: torch.Tensor, pos_index, owner, same_text, cfg: LossConfig
) -> torch.Tensor:
    kwargs = dict(temperature=cfg.temperature, qq_dd=cfg.qq_dd, fn_margin=cfg.fn_margin, same_text=same_text)
    if cfg.mrl_dims:  # equal weights over the requested dims below the full size, plus the full size
        dims = sorted({d for d in cfg.mrl_dims if d < q.shape[1]} | {q.shape[1]})
        return matryoshka_info_nce(q, docs, pos_index, owner, dims=dims, **kwargs)
    return info_nce(q, docs, pos_index, owner, **kwargs)


def _chunks(items: Sequence[Any], size: int | None) -> list[Sequence[Any]]:
    if not items:
        return []
    size = size or len(items)
    return [items[i : i + size] for i in range(0, len(items), size)]


def contrastive_backward(
    encode: Callable[[Sequence[Any]], torch.Tensor],
    local_queries: Sequence[Any],
    local_docs: Sequence[Any],
    pos_index: torch.Tensor,
    owner: torch.Tensor,
    cfg: LossConfig,
    *,
    same_text: torch.Tensor | None = None,
    chunk_size: int | None = None,
    cached: bool = False,
    scale: float = 1.0,
) -> float:
    """Encode this rank's queries and documents, compute the loss over the global batch and back-propagate
    `scale * loss` (e.g. 1/gradient-accumulation steps) into the parameters' `.grad`.

    `pos_index`, `owner` and `same_text` describe the global batch (all ranks' queries and documents, in
    rank order); `encode(chunk)` maps a list of inputs to a `(len(chunk), D)` tensor. Chunks hold at most
    `chunk_size` inputs; with `cached=True` they are gradient-cached. Under `torchrun` the loss is computed on
    the gathered batch and multiplied by the world size: call `distributed.average_gradients` afterwards.
    Returns the (unscaled) loss value.
    """
    world = distributed.world_size()

    def loss_fn(q_local: torch.Tensor, d_local: torch.Tensor) -> torch.Tensor:
        q = distributed.gather_with_grad_local(q_local.float())
        d = distributed.gather_with_grad_local(d_local.float())
        loss = compute_loss(q, d, pos_index.to(q.device), owner.to(q.device), same_text, cfg)
        return loss * (scale * world)

    groups = [_chunks(local_queries, chunk_size), _chunks(local_docs, chunk_size)]
    loss = encode_and_backward(encode, groups, loss_fn, cached=cached)
    return float(loss) / (scale * world)
