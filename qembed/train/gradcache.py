"""Gradient caching (Gao et al., 2021): contrastive batches larger than memory, with exact gradients.

The encoder runs over the batch in chunks twice: first without a graph to get every representation, then
(after the loss and its gradient with respect to the representations are known) chunk by chunk with a
graph, back-propagating the cached representation gradients into the parameters. Peak activation memory
is that of one chunk; loss and gradients equal the plain full-batch computation. The random-number state
is saved before each chunk of the first pass and restored for its second pass, so dropout masks match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def _rng_state() -> tuple:
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def encode_and_backward(
    encode: Callable[[Any], torch.Tensor],
    groups: Sequence[Sequence[Any]],
    loss_fn: Callable[..., torch.Tensor],
    *,
    cached: bool,
) -> torch.Tensor:
    """Encode every chunk of every group, compute `loss_fn(*group_representations)` and back-propagate.

    `groups` is one sequence of chunk inputs per argument of `loss_fn` (e.g. query chunks and document
    chunks); each group's representations are the row-wise concatenation of `encode(chunk)`. With
    `cached=False` this is the plain computation (one graph over all chunks); with `cached=True` it is
    gradient caching. Parameter gradients are accumulated into `.grad`; returns the detached loss.
    """
    if not cached:
        reps = [torch.cat([encode(chunk) for chunk in chunks]) for chunks in groups]
        loss = loss_fn(*reps)
        loss.backward()
        return loss.detach()

    states: list[list[tuple]] = []
    reps = []
    with torch.no_grad():
        for chunks in groups:
            states.append([])
            outs = []
            for chunk in chunks:
                states[-1].append(_rng_state())
                outs.append(encode(chunk))
            reps.append(torch.cat(outs).detach().requires_grad_())
    after_first_pass = _rng_state()

    loss = loss_fn(*reps)
    loss.backward()
    for chunks, chunk_states, rep in zip(groups, states, reps):
        grads = rep.grad
        start = 0
        for chunk, state in zip(chunks, chunk_states):
            _set_rng_state(state)
            out = encode(chunk)
            out.backward(grads[start : start + len(out)].to(out.dtype))
            start += len(out)
    _set_rng_state(after_first_pass)
    return loss.detach()
