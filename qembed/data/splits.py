"""Splitting judged queries into train / dev / test without leakage.

Queries that share a relevant document form one group (connected components of the query–document
graph), and a group is never divided: a test query's positive document is then never a training
positive, and two splits never share a query. Groups are shuffled with a seeded RNG and dealt to test,
then dev, until each reaches its target size; the rest is train. Every verb that splits QA data
(`qembed data qa-to-beir`, `qembed adapt`) uses `split_queries`, so the same data and seed give the same split.

A model `qembed adapt` trained records the hashes of its train and dev query texts (`write_training_queries`);
`qembed eval` warns when the split it evaluates shares queries with them (`training_overlap`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from qembed.errors import QembedError
from qembed.files import atomic_write_json

Qrels = dict[str, dict[str, int]]


@dataclass(frozen=True)
class SplitSizes:
    """Fractions of all queries, each capped at a number of queries (None: no cap)."""

    dev_fraction: float = 0.1
    test_fraction: float = 0.2
    max_dev: int | None = 500
    max_test: int | None = 1000

    def targets(self, n: int) -> tuple[int, int]:
        if not (0 <= self.dev_fraction < 1 and 0 < self.test_fraction < 1 and self.dev_fraction + self.test_fraction < 1):
            raise QembedError(
                f"split fractions must satisfy 0 <= dev, 0 < test and dev + test < 1 "
                f"(got dev {self.dev_fraction}, test {self.test_fraction})"
            )
        test = round(self.test_fraction * n)
        dev = round(self.dev_fraction * n)
        test = min(test, self.max_test) if self.max_test is not None else test
        dev = min(dev, self.max_dev) if self.max_dev is not None else dev
        return dev, test


def query_groups(qrels: Qrels) -> list[list[str]]:
    """Queries connected through shared positive documents (grade > 0), each group sorted, groups in order
    of their first query id (deterministic)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner: dict[str, str] = {}  # doc id -> a query judged relevant to it
    for qid in sorted(qrels):
        find(qid)
        for doc_id, grade in qrels[qid].items():
            if grade > 0:
                if doc_id in owner:
                    parent[find(qid)] = find(owner[doc_id])
                else:
                    owner[doc_id] = qid
    groups: dict[str, list[str]] = {}
    for qid in sorted(qrels):
        groups.setdefault(find(qid), []).append(qid)
    return sorted(groups.values(), key=lambda g: g[0])


def take_groups(qrels: Qrels, size: int, *, seed: int = 0) -> tuple[Qrels, Qrels]:
    """`(taken, rest)`: whole groups of `qrels` (`query_groups`), in a seeded order, go to `taken` until it
    holds at least `size` queries (so it exceeds `size` by less than one group); the rest to `rest`."""
    groups = query_groups(qrels)
    random.Random(seed).shuffle(groups)
    taken: Qrels = {}
    rest: Qrels = {}
    for group in groups:
        part = taken if len(taken) < size else rest
        for qid in group:
            part[qid] = qrels[qid]
    return taken, rest


def split_queries(qrels: Qrels, sizes: SplitSizes = SplitSizes(), *, seed: int = 0) -> dict[str, Qrels]:
    """`{"train", "dev", "test"}` qrels: disjoint, groups of queries sharing a positive kept together,
    the same for the same seed. Sizes are met as closely as whole groups allow (never exceeded by more
    than one group)."""
    dev_target, test_target = sizes.targets(len(qrels))
    test, rest = take_groups(qrels, test_target, seed=seed)
    dev, train = take_groups(rest, dev_target, seed=seed)
    splits = {"train": train, "dev": dev, "test": test}
    for name in ("train", "test"):
        if not splits[name]:
            raise QembedError(f"no {name} queries: {len(qrels)} queries are too few for the split")
    return splits


def carve_dev(train: Qrels, test: Qrels, sizes: SplitSizes = SplitSizes(), *, seed: int = 0) -> dict[str, Qrels]:
    """For a dataset with given train and test qrels: drop train queries that are also test queries or share
    a positive with one, then take dev from the rest (whole groups; at least one query unless
    `sizes.dev_fraction` is 0). Returns train / dev / test. The dev split `qembed train` carves and `qembed
    adapt`'s split of a BEIR folder are both this."""
    test_pos = {d for judged in test.values() for d, g in judged.items() if g > 0}
    kept = {q: j for q, j in train.items() if q not in test and not test_pos & {d for d, g in j.items() if g > 0}}
    if not kept:
        raise QembedError("no train query is left once those that are test queries or share a positive with one "
                          "are removed")  # fmt: skip
    dev_target = max(1, round(sizes.dev_fraction * len(kept))) if sizes.dev_fraction > 0 else 0
    dev_target = min(dev_target, sizes.max_dev) if sizes.max_dev is not None else dev_target
    dev, rest = take_groups(kept, dev_target, seed=seed)
    if not rest:
        raise QembedError(f"no train queries left after taking {len(dev)} dev queries")
    return {"train": rest, "dev": dev, "test": test}


# ------------------------------------------------------------------------------ what a model was trained on
TRAINING_QUERIES_FILE = "training_queries.json"


def query_hash(text: str) -> str:
    """The fingerprint of one query text: sha256 of its stripped UTF-8 text, first 16 hex digits."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


def write_training_queries(model_dir: str | Path, queries_by_split: dict[str, list[str]]) -> None:
    """Record in `model_dir` which query texts chose the model (`train`: trained on; `dev`: choices made
    on), as hashes, so an evaluation on a split that shares them can say so (`training_overlap`)."""
    record = {"hash": "sha256 of the stripped query text, first 16 hex digits",
              **{split: sorted({query_hash(t) for t in texts}) for split, texts in queries_by_split.items()}}  # fmt: skip
    atomic_write_json(Path(model_dir) / TRAINING_QUERIES_FILE, record, indent=None)


def training_overlap(model_dir: str | Path, queries: list[str]) -> dict[str, int]:
    """`{split: number of `queries` that were among the model's queries of that split}` (only splits with
    any), from `model_dir`'s `training_queries.json`; empty when the model has no such record."""
    path = Path(model_dir) / TRAINING_QUERIES_FILE
    if not path.is_file():
        return {}
    record = json.loads(path.read_text(encoding="utf-8"))
    hashes = [query_hash(t) for t in queries]
    seen = {split: set(values) for split, values in record.items() if isinstance(values, list)}
    counts = {split: sum(h in values for h in hashes) for split, values in seen.items()}
    return {split: n for split, n in counts.items() if n}
