"""Hard-negative selection from a vector index, on vectors only (no model): the core of `qembed mine`.

For each query, in this order: take the ranks `[range_min, range_max)` (0-based) of its ranking; remove its
known positives (by row, and by identical `qembed.data.text.normalize_text` when text hashes are given)
and repeated texts; remove candidates scoring above `max_score`, below `min_score`, or above `pos_score - margin`
(or `pos_score * (1 - relative_margin)`); optionally remove those a guard (a reranker) rejects; then keep the
top `num_negatives` (or a seeded random sample of them, returned in rank order).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from qembed.data.text import normalize_text
from qembed.errors import QembedError
from qembed.progress import progress_bar

NUM_NEGATIVES = 3  # hard negatives per query: one default for `mine` and `train`
RULES = ("positive", "duplicate", "max_score", "min_score", "margin", "reranker")
PERCENTILES = (5, 25, 50, 75, 95)


@dataclass
class MiningConfig:
    """Selection parameters; `margin` and `relative_margin` are exclusive (set one, or neither)."""

    num_negatives: int = NUM_NEGATIVES
    range_min: int = 20
    range_max: int = 50
    max_score: float | None = 0.8
    min_score: float | None = None
    margin: float | None = 0.1
    relative_margin: float | None = None
    sampling: str = "top"
    seed: int = 0
    reranker_max_score: float | None = None

    def validate(self) -> None:
        if self.num_negatives < 1:
            raise QembedError(f"num_negatives must be at least 1, got {self.num_negatives}")
        if not 0 <= self.range_min < self.range_max:
            raise QembedError(f"need 0 <= range_min < range_max, got [{self.range_min}, {self.range_max})")
        if self.margin is not None and self.relative_margin is not None:
            raise QembedError("give either margin or relative_margin, not both")
        if self.sampling not in ("top", "random"):
            raise QembedError(f"sampling must be 'top' or 'random', got {self.sampling!r}")
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise QembedError(f"min_score {self.min_score} is above max_score {self.max_score}")

    def score_ceiling(self, pos_score: float) -> float:
        """The highest score a negative may have given the query's positive score (margin rule)."""
        if self.relative_margin is not None:
            return pos_score * (1.0 - self.relative_margin)
        if self.margin is not None:
            return pos_score - self.margin
        return float("inf")


def text_hash(text: str) -> int:
    """64-bit hash of the normalised text (used to recognise the same document under another id)."""
    digest = hashlib.blake2b(normalize_text(text).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass
class QueryInput:
    """What the selection needs of one query besides its ranking."""

    pos_score: float
    positive_rows: frozenset[int] = frozenset()
    positive_hashes: frozenset[int] = frozenset()


@dataclass
class Negative:
    row: int
    score: float
    rank: int  # 0-based position in the query's ranking


@dataclass
class MiningStats:
    """Running totals for the summary."""

    queries: int = 0
    candidates: int = 0
    removed: Counter = field(default_factory=Counter)
    per_query: Counter = field(default_factory=Counter)  # number of negatives -> number of queries
    pos_scores: list[float] = field(default_factory=list)
    neg_scores: list[float] = field(default_factory=list)

    def add(self, query: QueryInput, negatives: list[Negative]) -> None:
        self.queries += 1
        self.per_query[len(negatives)] += 1
        self.pos_scores.append(float(query.pos_score))
        self.neg_scores.extend(n.score for n in negatives)

    def summary(self, config: MiningConfig) -> dict:
        short = sum(count for n, count in self.per_query.items() if n < config.num_negatives)
        return {
            "queries": self.queries,
            "negatives": len(self.neg_scores),
            "queries_with_fewer_negatives": short,
            "queries_without_negatives": self.per_query.get(0, 0),
            "negatives_per_query": {str(n): self.per_query[n] for n in sorted(self.per_query)},
            "candidates_in_window": self.candidates,
            "removed": {rule: self.removed.get(rule, 0) for rule in RULES},
            "pos_score": score_stats(self.pos_scores),
            "neg_score": score_stats(self.neg_scores),
            "config": asdict(config),
        }


def score_stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    array = np.asarray(values, dtype=np.float64)
    stats = {"count": int(array.size), "mean": float(array.mean()), "min": float(array.min())}
    stats.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(array, PERCENTILES))})
    stats["max"] = float(array.max())
    return stats


# [(query number, candidates), ...] of a whole chunk -> keep flags per query (one reranker stream per chunk)
Guard = Callable[[list[tuple[int, list[Negative]]]], list[list[bool]]]


def select_negatives(
    rows: np.ndarray,
    scores: np.ndarray,
    query: QueryInput,
    config: MiningConfig,
    stats: MiningStats,
    *,
    row_hashes: np.ndarray | None = None,
    guard: Callable[[list[Negative]], list[bool]] | None = None,
    rng: np.random.Generator | None = None,
) -> list[Negative]:
    """Apply the rules to one query's ranking (`rows`/`scores` best first, -1 rows are padding)."""
    kept = apply_rules(rows, scores, query, config, stats, row_hashes=row_hashes)
    if guard is not None and kept:
        kept = apply_guard(kept, guard(kept), stats)
    return choose_negatives(kept, query, config, stats, rng=rng)


def apply_rules(rows: np.ndarray, scores: np.ndarray, query: QueryInput, config: MiningConfig, stats: MiningStats,
                *, row_hashes: np.ndarray | None = None) -> list[Negative]:  # fmt: skip
    """The candidates in the rank window that no rule removes (positives, duplicates, score limits, margin)."""
    window = [
        Negative(int(r), float(s), rank)
        for rank, (r, s) in enumerate(zip(rows.tolist(), scores.tolist()))
        if config.range_min <= rank < config.range_max and r >= 0
    ]
    stats.candidates += len(window)
    ceiling = config.score_ceiling(query.pos_score)
    seen: set[int] = set()
    kept: list[Negative] = []
    for cand in window:
        digest = int(row_hashes[cand.row]) if row_hashes is not None else None
        if cand.row in query.positive_rows or (digest is not None and digest in query.positive_hashes):
            rule = "positive"
        elif digest is not None and digest in seen:
            rule = "duplicate"
        elif config.max_score is not None and cand.score > config.max_score:
            rule = "max_score"
        elif config.min_score is not None and cand.score < config.min_score:
            rule = "min_score"
        elif cand.score > ceiling:
            rule = "margin"
        else:
            rule = None
        if digest is not None:
            seen.add(digest)
        if rule:
            stats.removed[rule] += 1
        else:
            kept.append(cand)
    return kept


def apply_guard(kept: list[Negative], flags: list[bool], stats: MiningStats) -> list[Negative]:
    """The candidates a guard (a reranker) keeps; the others are counted as removed by it."""
    stats.removed["reranker"] += sum(1 for keep in flags if not keep)
    return [cand for cand, keep in zip(kept, flags) if keep]


def choose_negatives(kept: list[Negative], query: QueryInput, config: MiningConfig, stats: MiningStats, *,
                     rng: np.random.Generator | None = None) -> list[Negative]:  # fmt: skip
    """At most `num_negatives` of the surviving candidates (the best, or a seeded random sample)."""
    if len(kept) > config.num_negatives:
        if config.sampling == "random":
            rng = rng if rng is not None else np.random.default_rng(config.seed)
            chosen = sorted(rng.choice(len(kept), size=config.num_negatives, replace=False).tolist())
            kept = [kept[i] for i in chosen]
        else:
            kept = kept[: config.num_negatives]
    stats.add(query, kept)
    return kept


@dataclass
class QueryChunk:
    """A batch of queries: their vectors (n, dim) and selection inputs; `start` numbers the first one."""

    start: int
    vectors: np.ndarray
    queries: list[QueryInput]


def mine_chunks(
    index,
    chunks: Iterable[QueryChunk],
    config: MiningConfig,
    stats: MiningStats,
    *,
    row_hashes: np.ndarray | None = None,
    guard: Guard | None = None,
    total: int | None = None,
    show_progress: bool | None = None,
) -> Iterator[tuple[QueryChunk, list[list[Negative]]]]:
    """Search each chunk's queries in `index` (top `range_max`) and select their negatives.

    Memory is one chunk's (n, range_max) results: never a queries x corpus matrix. Random sampling is
    seeded per query number, so results do not depend on chunking or on resuming.
    """
    config.validate()
    with progress_bar(total=total, desc="mining", unit="query", enabled=show_progress) as bar:
        for chunk in chunks:
            rows, scores = index.search_rows(chunk.vectors, config.range_max)
            kept = [apply_rules(rows[i], scores[i], query, config, stats, row_hashes=row_hashes)
                    for i, query in enumerate(chunk.queries)]  # fmt: skip
            if guard is not None:
                asked = [i for i, cands in enumerate(kept) if cands]
                flags = guard([(chunk.start + i, kept[i]) for i in asked]) if asked else []
                for i, keep in zip(asked, flags):
                    kept[i] = apply_guard(kept[i], keep, stats)
            selected = []
            for i, query in enumerate(chunk.queries):
                number = chunk.start + i
                rng = np.random.default_rng([config.seed, number]) if config.sampling == "random" else None
                selected.append(choose_negatives(kept[i], query, config, stats, rng=rng))
            bar.update(len(chunk.queries))
            yield chunk, selected
