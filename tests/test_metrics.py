import math
import random

import pytest
import pytrec_eval

from qembed.errors import QembedError
from qembed.eval.metrics import evaluate_run, rank_documents


def test_hand_computed_single_query():
    # Ranking: d1 (grade 2), d2 (0), d3 (1), d4 (unjudged), d5 (2). Relevant docs: d1, d3, d5, d6 (4 in all).
    run = {"q": [("d1", 0.9), ("d2", 0.8), ("d3", 0.7), ("d4", 0.6), ("d5", 0.5)]}
    qrels = {"q": {"d1": 2, "d2": 0, "d3": 1, "d5": 2, "d6": 1}}
    m = evaluate_run(run, qrels, ks=[1, 3, 5]).mean

    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@3"] == pytest.approx(2 / 4)
    assert m["recall@5"] == pytest.approx(3 / 4)
    assert m["precision@3"] == pytest.approx(2 / 3)
    assert m["precision@5"] == pytest.approx(3 / 5)
    assert m["mrr@1"] == 1.0
    assert m["map@3"] == pytest.approx((1 / 1 + 2 / 3) / 4)
    assert m["map@5"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 4)
    # Linear gain by default (trec_eval, BEIR, MTEB): the grade itself. Discounts log2(rank + 1).
    dcg5_lin = 2 / math.log2(2) + 1 / math.log2(4) + 2 / math.log2(6)
    idcg5_lin = 2 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)
    assert m["ndcg@5"] == pytest.approx(dcg5_lin / idcg5_lin)
    assert m["ndcg@1"] == pytest.approx(1.0)
    # Exponential gain on request: grade 2 -> 3, grade 1 -> 1.
    exponential = evaluate_run(run, qrels, ks=[5], metrics=["ndcg"], gain="exponential").mean
    dcg5 = 3 / math.log2(2) + 1 / math.log2(4) + 3 / math.log2(6)
    idcg5 = 3 / math.log2(2) + 3 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)
    assert exponential["ndcg@5"] == pytest.approx(dcg5 / idcg5)


def test_mrr_and_missing_query_and_mean():
    run = {"a": ["x", "y", "z"], "b": ["p", "q"]}  # plain ranked lists
    qrels = {
        "a": {"z": 1},
        "b": {"p": 1},
        "c": {"w": 1},
        "d": {"v": 0},
    }  # c missing from run; d has no relevant
    r = evaluate_run(run, qrels, ks=[2, 3], metrics=["mrr", "recall"])
    assert set(r.per_query) == {"a", "b", "c"}  # d is not evaluated
    assert r.per_query["a"]["mrr@2"] == 0.0
    assert r.per_query["a"]["mrr@3"] == pytest.approx(1 / 3)
    assert r.per_query["c"] == {"mrr@2": 0.0, "mrr@3": 0.0, "recall@2": 0.0, "recall@3": 0.0}
    assert r.mean["mrr@3"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert r.mean["recall@2"] == pytest.approx((0 + 1 + 0) / 3)


def test_ties_broken_as_trec_eval_does():
    # Equal scores: doc id descending; scores equal as float32 are ties too.
    assert rank_documents([("b", 1.0), ("a", 1.0), ("c", 2.0)]) == ["c", "b", "a"]
    assert rank_documents({"a": 0.5, "b": 0.5}) == ["b", "a"]
    assert rank_documents({"a": 1.00000001, "b": 1.0}) == ["b", "a"]
    assert rank_documents({"a": 1.000001, "b": 1.0}) == ["a", "b"]
    assert rank_documents(["z", "a"]) == ["z", "a"]
    qrels = {"q": {"a": 1}}
    for run in ({"q": {"a": 1.0, "b": 1.0}}, {"q": {"a": 1.00000001, "b": 1.0}}, {"q": {"a": 1.0, "b": 0.5}}):
        ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)["q"]["recip_rank"]
        assert evaluate_run(run, qrels, ks=[10], metrics=["mrr"]).mean["mrr@10"] == pytest.approx(ref)


def test_bad_arguments():
    with pytest.raises(QembedError):
        evaluate_run({}, {"q": {"d": 1}}, ks=[0])
    with pytest.raises(QembedError):
        evaluate_run({}, {"q": {"d": 1}}, metrics=["bleu"])
    with pytest.raises(QembedError):
        evaluate_run({}, {"q": {"d": 0}})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_pytrec_eval_on_random_runs(seed):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(60)]
    qrels, run = {}, {}
    for q in range(40):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 25))
        qrels[qid] = {d: rng.choice([0, 0, 1, 2, 3]) for d in judged}
        qrels[qid][rng.choice(judged)] = rng.randint(1, 3)  # at least one relevant
        retrieved = rng.sample(docs, rng.randint(0, 50))
        scores = [rng.randrange(20) for _ in retrieved]  # many ties: broken as trec_eval breaks them
        run[qid] = [(d, s / 20) for d, s in zip(retrieved, scores)]
    ks = [1, 3, 5, 10, 20]
    mine = evaluate_run(run, qrels, ks=ks)
    mine_exp = evaluate_run(run, qrels, ks=ks, metrics=["ndcg"], gain="exponential")

    measures = {"ndcg_cut." + ",".join(map(str, ks)), "recall." + ",".join(map(str, ks)),
                "map_cut." + ",".join(map(str, ks)), "P." + ",".join(map(str, ks))}  # fmt: skip
    trec_run = {qid: {d: s for d, s in pairs} for qid, pairs in run.items()}
    ref = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(trec_run)
    # trec_eval's gain is the grade itself: feeding it 2^g - 1 as grades gives the exponential gain.
    exp_qrels = {q: {d: 2**g - 1 for d, g in j.items()} for q, j in qrels.items()}
    ref_exp = pytrec_eval.RelevanceEvaluator(exp_qrels, {"ndcg_cut." + ",".join(map(str, ks))}).evaluate(
        trec_run
    )

    evaluated = [q for q in qrels if run[q]]  # pytrec_eval only reports queries with results
    assert len(evaluated) > 30
    for qid in evaluated:
        got = mine.per_query[qid]
        for k in ks:
            assert got[f"ndcg@{k}"] == pytest.approx(ref[qid][f"ndcg_cut_{k}"], abs=1e-9)
            assert got[f"recall@{k}"] == pytest.approx(ref[qid][f"recall_{k}"], abs=1e-9)
            assert got[f"map@{k}"] == pytest.approx(ref[qid][f"map_cut_{k}"], abs=1e-9)
            assert got[f"precision@{k}"] == pytest.approx(ref[qid][f"P_{k}"], abs=1e-9)
            assert mine_exp.per_query[qid][f"ndcg@{k}"] == pytest.approx(
                ref_exp[qid][f"ndcg_cut_{k}"], abs=1e-9
            )
    # MRR@k is trec_eval's recip_rank on the run cut at k.
    for k in ks:
        cut = {}
        for qid in evaluated:
            top = [(d, s) for d, s in run[qid] if d in rank_documents(run[qid])[:k]]
            cut[qid] = {d: s for d, s in top}
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        for qid in evaluated:
            assert mine.per_query[qid][f"mrr@{k}"] == pytest.approx(rr[qid]["recip_rank"], abs=1e-9)
