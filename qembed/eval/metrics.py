"""Ranking metrics for retrieval: nDCG@k, Recall@k, MRR@k, MAP@k, Precision@k.

Conventions (those of trec_eval / BEIR, so figures compare with published ones):

- A document is *relevant* when its qrels grade is > 0. Unjudged documents count as grade 0.
- A run ranks a query's documents by score, descending, as trec_eval does: scores compared as float32,
  ties broken by document id *descending*. A run given as a plain list of ids is taken in that order.
- Only queries with at least one relevant document are evaluated; a query missing from the run scores 0.
- ``recall@k`` = relevant docs in the top k / all relevant docs of the query (BEIR; not capped at k).
- ``precision@k`` = relevant docs in the top k / k (trec_eval ``P_k``, k even when fewer were retrieved).
- ``mrr@k`` = 1 / rank of the first relevant doc within the top k, else 0.
- ``map@k`` = sum of precision@i over the ranks i <= k holding a relevant doc, / all relevant docs
  (trec_eval ``map_cut_k``).
- ``ndcg@k`` = DCG@k / ideal DCG@k, discount 1/log2(rank + 1), ideal from the qrels grades. The gain is
  the grade itself (``gain="linear"``, default: trec_eval's ``ndcg_cut``, hence BEIR / MTEB and published
  leaderboards) or ``2^grade - 1`` (``gain="exponential"``). With binary grades both are identical.

Values are fractions in [0, 1]; keys are lower-case ``"<metric>@<k>"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from qembed.errors import QembedError

METRICS = ("ndcg", "recall", "mrr", "map", "precision")
GAINS = ("linear", "exponential")

# One query's results: [(doc_id, score), ...], {doc_id: score}, or an already ranked [doc_id, ...].
QueryRun = Sequence[tuple[str, float]] | Mapping[str, float] | Sequence[str]
Run = Mapping[str, QueryRun]
Qrels = Mapping[str, Mapping[str, int]]


@dataclass
class MetricResult:
    """Mean metrics over the evaluated queries, and the same metrics for each query."""

    mean: dict[str, float]
    per_query: dict[str, dict[str, float]] = field(repr=False)

    @property
    def num_queries(self) -> int:
        return len(self.per_query)


def trec_order(pairs: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """`(doc_id, score)` pairs in trec_eval's rank order: score (as float32) descending, ties by id descending."""
    ranked = sorted(pairs, key=lambda pair: str(pair[0]), reverse=True)
    ranked.sort(key=lambda pair: -np.float32(pair[1]))  # stable: equal float32 scores keep the id order
    return ranked


def rank_documents(results: QueryRun) -> list[str]:
    """Document ids in rank order (`trec_order`); a plain id list keeps its order."""
    if isinstance(results, Mapping):
        pairs = list(results.items())
    else:
        items = list(results)
        if not items or isinstance(items[0], str):
            return [str(doc_id) for doc_id in items]
        pairs = [(doc_id, score) for doc_id, score in items]
    return [str(doc_id) for doc_id, _ in trec_order(pairs)]


def _dcg(gains: Iterable[float]) -> float:
    return sum(g / math.log2(rank + 2) for rank, g in enumerate(gains))


def query_metrics(
    ranking: Sequence[str],
    judgments: Mapping[str, int],
    ks: Sequence[int],
    metrics: Sequence[str] = METRICS,
    *,
    gain: str = "linear",
) -> dict[str, float]:
    """Metrics of one ranked list of doc ids against one query's graded judgments."""
    gain_of = (lambda g: 2.0**g - 1.0) if gain == "exponential" else float
    num_relevant = sum(1 for g in judgments.values() if g > 0)
    # A document id repeated in a ranking counts once, at its best rank (trec_eval reads runs as sets).
    seen: set[str] = set()
    ranking = [d for d in ranking if not (d in seen or seen.add(d))]
    grades = [judgments.get(doc_id, 0) for doc_id in ranking[: max(ks)]]
    ideal = sorted((g for g in judgments.values() if g > 0), reverse=True)
    out: dict[str, float] = {}
    for k in ks:
        top = grades[:k]
        hits = [g > 0 for g in top]
        for name in metrics:
            if name == "ndcg":
                idcg = _dcg(gain_of(g) for g in ideal[:k])
                value = _dcg(gain_of(g) if g > 0 else 0.0 for g in top) / idcg if idcg > 0 else 0.0
            elif name == "recall":
                value = sum(hits) / num_relevant if num_relevant else 0.0
            elif name == "precision":
                value = sum(hits) / k
            elif name == "mrr":
                value = next((1.0 / (rank + 1) for rank, hit in enumerate(hits) if hit), 0.0)
            else:  # map
                found, total = 0, 0.0
                for rank, hit in enumerate(hits):
                    if hit:
                        found += 1
                        total += found / (rank + 1)
                value = total / num_relevant if num_relevant else 0.0
            out[f"{name}@{k}"] = value
    return out


def evaluate_run(
    run: Run,
    qrels: Qrels,
    ks: Sequence[int] = (1, 5, 10, 100),
    metrics: Sequence[str] = METRICS,
    *,
    gain: str = "linear",
) -> MetricResult:
    """Score a run against graded qrels for every k in `ks` (see the module docstring for conventions).

    Returns the mean over queries with at least one relevant document, and per-query values.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise QembedError(f"cut-offs k must be positive integers, got {ks}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise QembedError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    if gain not in GAINS:
        raise QembedError(f"nDCG gain must be 'linear' or 'exponential', got {gain!r}")
    per_query: dict[str, dict[str, float]] = {}
    for qid, judgments in qrels.items():
        if not any(g > 0 for g in judgments.values()):
            continue
        ranking = rank_documents(run.get(qid, []))
        per_query[qid] = query_metrics(ranking, judgments, ks, metrics, gain=gain)
    if not per_query:
        raise QembedError("no query in the qrels has a relevant document (grade > 0): nothing to evaluate")
    keys = [f"{m}@{k}" for m in metrics for k in ks]
    mean = {key: sum(values[key] for values in per_query.values()) / len(per_query) for key in keys}
    return MetricResult(mean=mean, per_query=per_query)
