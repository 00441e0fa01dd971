"""Selection rules on hand-made rankings (no model)."""

import numpy as np
import pytest

from qembed.data.text import normalize_text
from qembed.errors import QembedError
from qembed.index import open_index
from qembed.negatives import (
    MiningConfig,
    MiningStats,
    QueryChunk,
    QueryInput,
    mine_chunks,
    select_negatives,
    text_hash,
)


def ranking(scores):
    return np.arange(len(scores)), np.asarray(scores, dtype=np.float32)


def test_rules_in_order_with_counts():
    # ranks:          0     1     2     3     4     5     6     7     8     9
    rows, scores = ranking([0.95, 0.9, 0.85, 0.72, 0.66, 0.6, 0.5, 0.4, 0.3, 0.1])
    hashes = np.array([10, 11, 12, 13, 14, 13, 16, 17, 18, 19])  # row 5 repeats row 3's text
    query = QueryInput(pos_score=0.75, positive_rows=frozenset({4}), positive_hashes=frozenset({16}))
    config = MiningConfig(
        num_negatives=10, range_min=1, range_max=10, max_score=0.8, min_score=0.2, margin=0.05
    )
    stats = MiningStats()
    kept = select_negatives(rows, scores, query, config, stats, row_hashes=hashes)
    # rank 0 outside the window; 1, 2 > max_score; 3 > 0.75 - 0.05 (margin); 4 positive by row; 5 duplicate
    # text; 6 positive by text; 9 < min_score. Left: 7, 8.
    assert [n.row for n in kept] == [7, 8]
    assert [n.rank for n in kept] == [7, 8]
    assert stats.candidates == 9
    assert dict(stats.removed) == {"max_score": 2, "margin": 1, "positive": 2, "duplicate": 1, "min_score": 1}


def test_relative_margin_top_and_random_sampling():
    rows, scores = ranking([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    query = QueryInput(pos_score=0.8)
    config = MiningConfig(
        num_negatives=2, range_min=0, range_max=7, max_score=None, margin=None, relative_margin=0.2
    )
    kept = select_negatives(rows, scores, query, config, MiningStats())
    assert [n.row for n in kept] == [3, 4]  # ceiling 0.64
    config.sampling = "random"
    draws = {tuple(n.row for n in select_negatives(rows, scores, query, config, MiningStats(),
                                                   rng=np.random.default_rng(s))) for s in range(30)}  # fmt: skip
    assert all(set(d) <= {3, 4, 5, 6} and list(d) == sorted(d) for d in draws)
    assert len(draws) > 1


def test_reranker_guard_and_short_rankings():
    rows, scores = ranking([0.5, 0.4, 0.3])
    stats = MiningStats()
    config = MiningConfig(num_negatives=5, range_min=0, range_max=50, margin=None)
    kept = select_negatives(
        rows, scores, QueryInput(1.0), config, stats, guard=lambda c: [n.row != 1 for n in c]
    )
    assert [n.row for n in kept] == [0, 2]
    assert stats.removed["reranker"] == 1
    padded_rows = np.array([0, -1, -1])  # what an index returns when it has fewer than k vectors
    assert [n.row for n in select_negatives(padded_rows, scores, QueryInput(1.0), config, stats)] == [0]
    summary = stats.summary(config)
    assert summary["negatives_per_query"] == {"1": 1, "2": 1}
    assert summary["queries_with_fewer_negatives"] == 2


def test_config_validation():
    for bad in [dict(num_negatives=0), dict(range_min=5, range_max=5), dict(margin=0.1, relative_margin=0.1),
                dict(sampling="best"), dict(min_score=0.9, max_score=0.5)]:  # fmt: skip
        with pytest.raises(QembedError):
            MiningConfig(**bad).validate()


def test_text_identity():
    assert normalize_text("  Hello\u00a0 WORLD\n") == "hello world"
    assert text_hash("Ｆｏｏ  bar") == text_hash("foo bar")
    assert text_hash("foo") != text_hash("food")
    assert text_hash("Rice-blast, again!") == text_hash("rice blast again")  # punctuation does not count


def test_mine_chunks_matches_brute_force_and_is_chunking_independent():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((400, 16)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[:30] + 0.3 * rng.standard_normal((30, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = open_index("faiss", 16)
    index.add([str(i) for i in range(400)], docs)
    inputs = [QueryInput(float(queries[i] @ docs[i]), frozenset({i})) for i in range(30)]
    config = MiningConfig(
        num_negatives=4, range_min=3, range_max=25, max_score=0.9, margin=0.05, sampling="random"
    )

    def run(chunk):
        chunks = [QueryChunk(s, queries[s : s + chunk], inputs[s : s + chunk]) for s in range(0, 30, chunk)]
        return [
            [n.row for n in negs]
            for _, sel in mine_chunks(index, chunks, config, MiningStats())
            for negs in sel
        ]

    assert run(7) == run(30)
    top = MiningConfig(**{**config.__dict__, "sampling": "top"})
    chunks = [QueryChunk(0, queries, inputs)]
    got = [negs for _, sel in mine_chunks(index, chunks, top, MiningStats()) for negs in sel]
    full = queries @ docs.T
    for i, negs in enumerate(got):
        order = np.argsort(-full[i], kind="stable")
        expected = [
            int(r)
            for r in order[3:25]
            if r != i and full[i, r] <= 0.9 and full[i, r] <= inputs[i].pos_score - 0.05
        ]
        assert [n.row for n in negs] == expected[:4]
