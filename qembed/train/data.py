"""Training data: reading the toolkit's training format, seeded batching, and per-batch sampling.

A record is `{"query": str, "pos": [str, ...], "neg": [str, ...], "instruction"?: str, ...}` (other fields
are ignored). Batch order is a pure function of (seed, epoch), and each batch's positive/negative choice of
(seed, epoch, batch index), so a run resumed at a data position sees exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qembed.data.pairs import iter_pairs
from qembed.errors import QembedError


@dataclass
class TrainRecord:
    query: str
    pos: list[str]
    neg: list[str]
    instruction: str | None = None
    source: int = 0  # index of the file it came from


def read_training_data(paths: Sequence[str | Path]) -> list[TrainRecord]:
    """Records of every file, in order; a malformed record raises `QembedError` naming file and line
    (the schema: `qembed.data.pairs`)."""
    if not paths:
        raise QembedError("no training data given")
    records = []
    for source, path in enumerate(paths):
        count = 0
        for _, pair in iter_pairs(path):
            records.append(TrainRecord(pair.query, pair.pos, pair.neg, pair.instruction, source))
            count += 1
        if count == 0:
            raise QembedError(f"{path}: no training records")
    return records


def epoch_batches(
    records: Sequence[TrainRecord],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    same_source: bool = False,
    min_size: int = 1,
) -> list[list[int]]:
    """Record indices cut into batches after a seeded shuffle. With `same_source`, every batch holds records
    of one file only (each file shuffled and cut on its own, then the batches shuffled together). Batches
    smaller than `min_size` (a short last batch) are dropped. The count does not depend on the epoch."""
    if batch_size < 1:
        raise QembedError(f"batch size must be positive, got {batch_size}")
    rng = random.Random(seed * 1_000_003 + epoch)
    if same_source:
        groups: dict[int, list[int]] = {}
        for index, record in enumerate(records):
            groups.setdefault(record.source, []).append(index)
        pools = [groups[key] for key in sorted(groups)]
    else:
        pools = [list(range(len(records)))]
    batches = []
    for pool in pools:
        pool = pool[:]
        rng.shuffle(pool)
        batches += [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    if same_source:
        rng.shuffle(batches)
    return [b for b in batches if len(b) >= min_size]


@dataclass
class ContrastiveBatch:
    """One global batch: query texts (with their instruction), documents, and the loss bookkeeping."""

    queries: list[str]
    instructions: list[str | None]
    docs: list[str]
    owner: torch.Tensor  # (N,) record index of each document
    pos_index: torch.Tensor  # (B,) slot of each query's positive in docs
    same_text: torch.Tensor  # (B, N) document text equals one of query i's positives

    def shard(self, start: int, end: int) -> tuple[list[int], list[int]]:
        """Query and document positions belonging to records [start, end)."""
        doc_rows = [j for j, o in enumerate(self.owner.tolist()) if start <= o < end]
        return list(range(start, end)), doc_rows


def batch_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random((seed * 1_000_003 + epoch) * 1_000_033 + index)


def contrastive_batch(
    records: Sequence[TrainRecord], indices: Sequence[int], *, num_negatives: int, rng: random.Random
) -> ContrastiveBatch:
    """Each record contributes its query, one positive (drawn when it has several) and up to `num_negatives`
    hard negatives (a draw when it has more; negatives equal to a positive are skipped)."""
    queries, instructions, docs, owner, pos_index, pos_sets = [], [], [], [], [], []
    for i, index in enumerate(indices):
        record = records[index]
        queries.append(record.query)
        instructions.append(record.instruction)
        positives = set(record.pos)
        pos_sets.append(positives)
        pos_index.append(len(docs))
        docs.append(record.pos[rng.randrange(len(record.pos))] if len(record.pos) > 1 else record.pos[0])
        owner.append(i)
        negatives = [n for n in record.neg if n not in positives]
        if len(negatives) > num_negatives:
            negatives = rng.sample(negatives, num_negatives)
        docs += negatives
        owner += [i] * len(negatives)
    same = torch.tensor([[doc in pos_sets[i] for doc in docs] for i in range(len(indices))], dtype=torch.bool)
    return ContrastiveBatch(
        queries=queries, instructions=instructions, docs=docs, owner=torch.tensor(owner),
        pos_index=torch.tensor(pos_index), same_text=same,
    )  # fmt: skip


def pair_batch(
    records: Sequence[TrainRecord], indices: Sequence[int], *, num_negatives: int, rng: random.Random
) -> list[tuple[str, str, str | None, float]]:
    """Pointwise (query, document, instruction, label) pairs for reranker training: one positive (label 1)
    and up to `num_negatives` hard negatives (label 0) per record."""
    pairs = []
    for index in indices:
        record = records[index]
        positive = record.pos[rng.randrange(len(record.pos))] if len(record.pos) > 1 else record.pos[0]
        pairs.append((record.query, positive, record.instruction, 1.0))
        negatives = [n for n in record.neg if n not in set(record.pos)]
        if len(negatives) > num_negatives:
            negatives = rng.sample(negatives, num_negatives)
        pairs += [(record.query, n, record.instruction, 0.0) for n in negatives]
    return pairs
