"""Contrastive losses for embedder training: InfoNCE with the Qwen3 options, and its Matryoshka average.

A batch is B queries and N documents. Every document belongs to one record (`owner[j]`, the index of its
query); `pos_index[i]` is the slot of query i's positive among the documents, the other documents owned
by i are its hard negatives, and documents owned by other records are in-batch negatives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def info_nce(
    q: torch.Tensor,
    docs: torch.Tensor,
    pos_index: torch.Tensor,
    owner: torch.Tensor,
    *,
    temperature: float = 0.01,
    qq_dd: bool = False,
    fn_margin: float | None = None,
    same_text: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss of the B queries `q` (B, D) against the documents `docs` (N, D).

    Similarity is cosine, s(a, b) = <a/|a|, b/|b|>, and every term is exp(s / temperature).
    For query i, with d_i+ = docs[pos_index[i]], the loss is -log(exp(s(q_i, d_i+)/τ) / Z_i) where

        Z_i = e^{s(q_i,d_i+)/τ}                                   (the positive)
            + Σ_{j: owner_j = i, j ≠ i+}  m_ij e^{s(q_i,d_j)/τ}    (the record's own hard negatives)
            + Σ_{j: owner_j ≠ i}          m_ij e^{s(q_i,d_j)/τ}    (every document of the other records:
                                                                   their positives and hard negatives)
          [ + Σ_{k ≠ i}                   m_ik e^{s(q_i,q_k)/τ}    (other queries)          if qq_dd
            + Σ_{j: owner_j ≠ i}          m_ij e^{s(d_i+,d_j)/τ} ] (positive vs the other records'
                                                                   documents)               if qq_dd

    This is the Qwen3-Embedding improved InfoNCE, with "in-batch documents d_j" taken as all documents of
    the other records. The mask m is 1 unless
      - `fn_margin` is set and the term's own similarity (s(q_i,d_j), s(q_i,q_k) or s(d_i+,d_j)) exceeds
        s(q_i, d_i+) + fn_margin (Qwen3 uses 0.1), or
      - `same_text[i, j]` is True (document j's text equals a positive of query i; it masks both
        document terms of j). The positive slot itself is never masked.
    The mask is computed without gradient. Without `qq_dd`, `fn_margin` and `same_text` this is the
    usual in-batch-negatives InfoNCE (MultipleNegativesRankingLoss with scale 1/τ).
    """
    if fn_margin is not None and fn_margin < 0:
        raise ValueError(f"fn_margin must not be negative (None turns the mask off), got {fn_margin}")
    q = F.normalize(q.float(), dim=-1)
    d = F.normalize(docs.float(), dim=-1)
    n_q = q.shape[0]
    rows = torch.arange(n_q, device=q.device)
    s_qd = q @ d.T  # (B, N)
    s_pos = s_qd[rows, pos_index]  # (B,)
    is_pos = torch.zeros_like(s_qd, dtype=torch.bool)
    is_pos[rows, pos_index] = True

    keep_qd = _keep(s_qd, s_pos, fn_margin, same_text) | is_pos
    terms = [s_qd.masked_fill(~keep_qd, float("-inf"))]
    if qq_dd:
        s_qq = q @ q.T
        keep_qq = _keep(s_qq, s_pos, fn_margin, None) & ~torch.eye(n_q, dtype=torch.bool, device=q.device)
        terms.append(s_qq.masked_fill(~keep_qq, float("-inf")))
        s_dd = d[pos_index] @ d.T  # (B, N)
        other = owner.unsqueeze(0) != rows.unsqueeze(1)
        keep_dd = _keep(s_dd, s_pos, fn_margin, same_text) & other
        terms.append(s_dd.masked_fill(~keep_dd, float("-inf")))
    logits = torch.cat(terms, dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - s_pos / temperature).mean()


def _keep(
    sim: torch.Tensor, s_pos: torch.Tensor, margin: float | None, same_text: torch.Tensor | None
) -> torch.Tensor:
    keep = torch.ones_like(sim, dtype=torch.bool)
    if margin is not None:
        keep &= ~(sim.detach() > s_pos.detach().unsqueeze(1) + margin)
    if same_text is not None:
        keep &= ~same_text.to(sim.device)
    return keep


def matryoshka_info_nce(
    q: torch.Tensor,
    docs: torch.Tensor,
    pos_index: torch.Tensor,
    owner: torch.Tensor,
    *,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    **kwargs,
) -> torch.Tensor:
    """Weighted average of `info_nce` over the embeddings truncated to each of `dims` (each truncation is
    re-normalised inside `info_nce`, as at inference with `dim=d`). Weights default to equal."""
    if not dims:
        raise ValueError("dims must not be empty")
    weights = list(weights) if weights is not None else [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} weights for {len(dims)} dims")
    total = sum(
        w * info_nce(q[:, :dim], docs[:, :dim], pos_index, owner, **kwargs) for dim, w in zip(dims, weights)
    )
    return total / sum(weights)
