"""The evaluation set of a training run. Checkpoint selection (`--load-best`) must not look at test queries,
so the default split is `dev`; a BEIR folder without `qrels/dev.tsv` gets a seeded dev split carved from its
train queries (disjoint from test), and training records asking those queries are left out of training."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from qembed.data.beir import RetrievalDataset, read_qrels, read_queries
from qembed.errors import QembedError

log = logging.getLogger(__name__)

DEV_FRACTION = 0.1
DEV_MAX_QUERIES = 1000
CARVED = "dev-from-train"


def carve_queries(query_ids: list[str], *, seed: int, exclude: set[str] = frozenset(),
                  fraction: float = DEV_FRACTION, max_queries: int = DEV_MAX_QUERIES) -> list[str]:  # fmt: skip
    """A seeded sample of `fraction` of `query_ids` (at least one, at most `max_queries`), none in `exclude`;
    the result depends only on the id set and the seed."""
    pool = sorted(q for q in set(query_ids) if q not in exclude)
    if not pool:
        return []
    size = min(max(1, round(fraction * len(pool))), max_queries)
    return sorted(random.Random(seed).sample(pool, size))


def load_eval_dataset(path: str | Path, split: str, *, seed: int) -> RetrievalDataset:
    """The BEIR `split` of `path`; for `dev` without a dev qrels file, queries carved from `train` (see
    `carve_queries`; `dataset.split` is then "dev-from-train"). Selecting on `test` is logged as such."""
    path = Path(path)
    if split == "test":
        log.warning("checkpoint selection uses the TEST split of %s (--eval-split test): "
                    "test scores of the selected weights are optimistic", path)  # fmt: skip
    if split != "dev" or (path / "qrels" / "dev.tsv").is_file():
        return RetrievalDataset.load(path, split=split)
    if not (path / "qrels" / "train.tsv").is_file():
        raise QembedError(f"{path} has no dev split and no train split to carve one from: "
                          "add qrels/dev.tsv, or pass --eval-split test to select on test queries")  # fmt: skip
    train = RetrievalDataset.load(path, split="train")
    test_path = path / "qrels" / "test.tsv"
    test_ids = set(read_qrels(test_path)) if test_path.is_file() else set()
    all_queries = read_queries(path / "queries.jsonl")
    test_texts = {all_queries[q] for q in test_ids if q in all_queries}
    chosen = carve_queries(list(train.queries), seed=seed, exclude=test_ids)
    chosen = [q for q in chosen if train.queries[q] not in test_texts]
    if not chosen:
        raise QembedError(f"{path}: every train query is also a test query; add qrels/dev.tsv")
    log.warning("%s has no dev split: evaluating on %d of its %d train queries (seed %d), left out of training",
                path, len(chosen), len(train.queries), seed)  # fmt: skip
    return RetrievalDataset(corpus=train.corpus, queries={q: train.queries[q] for q in chosen},
                            qrels={q: train.qrels[q] for q in chosen}, name=train.name, split=CARVED)  # fmt: skip


def held_out(records: list, dataset: RetrievalDataset | None) -> list:
    """`records` without those whose query is one of a carved dev split's queries (nothing removed otherwise)."""
    if dataset is None or dataset.split != CARVED:
        return records
    texts = set(dataset.queries.values())
    kept = [r for r in records if r.query not in texts]
    if len(kept) < len(records):
        log.warning("left %d training record(s) asking a dev query out of training", len(records) - len(kept))
    return kept
