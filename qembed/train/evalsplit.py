"""The evaluation set of a training run. Checkpoint selection (`--load-best`) must not look at test queries,
so the default split is `dev`; a BEIR folder without `qrels/dev.tsv` gets a seeded dev split carved from its
train queries (`qembed.data.splits.carve_dev`: disjoint from test, queries sharing a positive document kept on
one side), and training records asking those queries are left out of training."""

from __future__ import annotations

import logging
from pathlib import Path

from qembed.data.beir import RetrievalDataset, read_qrels, read_queries
from qembed.data.splits import SplitSizes, carve_dev
from qembed.errors import QembedError

log = logging.getLogger(__name__)

DEV_FRACTION = 0.1
DEV_MAX_QUERIES = 1000
CARVED = "dev-from-train"


def load_eval_dataset(path: str | Path, split: str, *, seed: int) -> RetrievalDataset:
    """The BEIR `split` of `path`; for `dev` without a dev qrels file, queries carved from `train` (see
    `carve_dev`; `dataset.split` is then "dev-from-train"). Selecting on `test` is logged as such."""
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
    test = read_qrels(test_path) if test_path.is_file() else {}
    all_queries = read_queries(path / "queries.jsonl")
    test_texts = {all_queries[q] for q in test if q in all_queries}
    sizes = SplitSizes(dev_fraction=DEV_FRACTION, max_dev=DEV_MAX_QUERIES)
    chosen = [q for q in carve_dev(train.qrels, test, sizes, seed=seed)["dev"] if train.queries[q] not in test_texts]
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
