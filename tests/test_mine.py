"""`qembed mine` with the real all-MiniLM-L6-v2 on a slice of NFCorpus (train qrels), checked against an
independent sentence-transformers encoding and a brute-force re-implementation of the rules."""

import json
from pathlib import Path

import numpy as np
import pytest

from qembed.cli import main
from qembed.data import corpus as corpus_module
from qembed.data.beir import read_qrels, read_queries, write_beir
from qembed.data.corpus import read_corpus
from qembed.data.jsonl import read_jsonl, write_jsonl
from qembed.data.text import normalize_text
from qembed.errors import QembedError
from qembed.mine import mine_hard_negatives

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nf_slice(tmp_path_factory, shared_dir):
    """40 train queries with 1-3 positives each, and a 200-document corpus holding their positives."""
    src = shared_dir / "data" / "nfcorpus"
    corpus, queries = read_corpus(src / "corpus.jsonl"), read_queries(src / "queries.jsonl")
    qrels = read_qrels(src / "qrels" / "train.tsv")
    chosen = {}
    for qid in sorted(qrels):
        pos = [d for d, g in qrels[qid].items() if g > 0]
        if qid in queries and 1 <= len(pos) <= 3 and all(d in corpus for d in pos):
            chosen[qid] = {d: qrels[qid][d] for d in pos}
        if len(chosen) == 40:
            break
    keep = {d for judged in chosen.values() for d in judged}
    for doc_id in corpus:
        if len(keep) >= 200:
            break
        keep.add(doc_id)
    path = tmp_path_factory.mktemp("nfslice")
    write_beir(
        path, {d: corpus[d] for d in corpus if d in keep}, {q: queries[q] for q in chosen}, {"train": chosen}
    )
    return path


@pytest.fixture(scope="module")
def emb(minilm_path):
    from qembed import Embedder

    return Embedder.from_pretrained(minilm_path, device="cpu")


@pytest.fixture(scope="module")
def reference(nf_slice, minilm_path):
    """Scores from an independent sentence-transformers encoding of the slice."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path), device="cpu")
    docs = read_corpus(nf_slice / "corpus.jsonl")
    queries = read_queries(nf_slice / "queries.jsonl")
    ids, texts = list(docs), list(docs.values())
    doc_vecs = st.encode(texts, normalize_embeddings=True, batch_size=64)
    qids = list(queries)
    q_vecs = st.encode([queries[q] for q in qids], normalize_embeddings=True)
    return {"ids": ids, "texts": texts, "qids": qids, "scores": q_vecs @ doc_vecs.T}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("embedding-cache")


def expected_negatives(ref, qrels, qid, *, rmin, rmax, n, max_score=None, min_score=None, margin=None):
    """The selection rules re-implemented on a brute-force ranking; returns normalised negative texts."""
    scores = ref["scores"][ref["qids"].index(qid)]
    pos_ids = {d for d, g in qrels[qid].items() if g > 0}
    pos_texts = {normalize_text(ref["texts"][ref["ids"].index(d)]) for d in pos_ids}
    pos_score = max(scores[ref["ids"].index(d)] for d in pos_ids)
    seen, kept = set(), []
    for row in np.argsort(-scores, kind="stable")[rmin:rmax]:
        text, s = normalize_text(ref["texts"][row]), scores[row]
        ok = ref["ids"][row] not in pos_ids and text not in pos_texts and text not in seen
        ok = ok and (max_score is None or s <= max_score) and (min_score is None or s >= min_score)
        ok = ok and (margin is None or s <= pos_score - margin)
        seen.add(text)
        if ok:
            kept.append(text)
    return kept[:n]


def test_every_negative_obeys_every_rule(nf_slice, emb, reference, cache, tmp_path):
    rules = dict(range_min=3, range_max=30, num_negatives=4, max_score=0.7, min_score=0.05, margin=0.02)
    result = mine_hard_negatives(emb, nf_slice, tmp_path / "mined.jsonl", cache_dir=cache, **rules)
    out = read_jsonl(tmp_path / "mined.jsonl")
    qrels = read_qrels(nf_slice / "qrels" / "train.tsv")
    assert len(out) == 40 and sum(len(r["neg"]) for r in out) > 40
    ref = reference
    for rec in out:
        qid = rec["query_id"]
        scores = ref["scores"][ref["qids"].index(qid)]
        pos_ids = set(rec["pos_ids"])
        assert not pos_ids & set(rec["neg_ids"])  # no negative is a positive, by id...
        assert not {normalize_text(t) for t in rec["pos"]} & {
            normalize_text(t) for t in rec["neg"]
        }  # ...or text
        fresh_pos = [scores[ref["ids"].index(d)] for d in rec["pos_ids"]]
        np.testing.assert_allclose(rec["pos_scores"], fresh_pos, atol=1e-4)
        for doc_id, text, score in zip(rec["neg_ids"], rec["neg"], rec["neg_scores"]):
            row = ref["ids"].index(doc_id)
            assert ref["texts"][row] == text
            fresh = scores[row]
            assert fresh == pytest.approx(score, abs=1e-4)
            assert 0.05 - 1e-4 <= fresh <= 0.7 + 1e-4
            assert fresh <= max(fresh_pos) - 0.02 + 1e-4
            # its rank (ties within 1e-5 either way) lies in [3, 30)
            assert (scores > fresh + 1e-5).sum() < 30 and (scores >= fresh - 1e-5).sum() > 3
        assert rec["neg_scores"] == sorted(rec["neg_scores"], reverse=True)
        expected = expected_negatives(
            ref, qrels, qid, rmin=3, rmax=30, n=4, max_score=0.7, min_score=0.05, margin=0.02
        )
        assert [normalize_text(t) for t in rec["neg"]] == expected
    summary = json.loads((tmp_path / "mined.summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["queries"] == 40 and sum(summary["negatives_per_query"].values()) == 40
    assert summary["negatives"] == sum(len(r["neg"]) for r in out)
    assert summary["candidates_in_window"] - sum(summary["removed"].values()) >= summary["negatives"]
    assert summary["removed"]["positive"] > 0 and summary["removed"]["margin"] > 0


def test_random_sampling_is_seeded_and_drawn_from_survivors(nf_slice, emb, cache, tmp_path):
    common = dict(
        cache_dir=cache, range_min=0, range_max=40, max_score=None, relative_margin=0.1, margin=None
    )

    def run(name, **kwargs):
        mine_hard_negatives(emb, nf_slice, tmp_path / name, **common, **kwargs)
        return read_jsonl(tmp_path / name)

    survivors = run("all.jsonl", num_negatives=1000)
    a = run("a.jsonl", num_negatives=3, sampling="random", seed=3)
    b = run("b.jsonl", num_negatives=3, sampling="random", seed=3)
    c = run("c.jsonl", num_negatives=3, sampling="random", seed=4)
    assert a == b
    assert a != c
    for full, rec in zip(survivors, a):
        assert set(rec["neg_ids"]) <= set(full["neg_ids"])
        assert len(rec["neg_ids"]) == min(3, len(full["neg_ids"]))
        for score, pos in [(s, max(rec["pos_scores"])) for s in rec["neg_scores"]]:
            assert score <= pos * 0.9 + 1e-6


def test_reranker_guard_drops_what_it_should(nf_slice, emb, cache, tmp_path, tiny_reranker_path):
    from qembed import Reranker

    pairs = tmp_path / "pairs.jsonl"
    queries = read_queries(nf_slice / "queries.jsonl")
    qrels = read_qrels(nf_slice / "qrels" / "train.tsv")
    docs = read_corpus(nf_slice / "corpus.jsonl")
    rows = []
    for qid in list(queries)[:6]:
        pos_ids = [d for d in qrels[qid]]
        rows.append({"query": queries[qid], "pos": [docs[d] for d in pos_ids], "pos_ids": pos_ids})
    write_jsonl(pairs, rows)
    common = dict(corpus=nf_slice / "corpus.jsonl", cache_dir=cache, range_min=0, range_max=12, margin=None)
    mine_hard_negatives(emb, pairs, tmp_path / "all.jsonl", num_negatives=100, **common)
    survivors = read_jsonl(tmp_path / "all.jsonl")
    reranker = Reranker.from_pretrained(tiny_reranker_path, device="cpu", max_length=128)  # short: fast
    rr_scores = [reranker.score(r["query"], r["neg"]) for r in survivors]
    ordered = np.unique(np.concatenate(rr_scores))
    threshold = float(ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # between two scores
    calls = []
    score_pairs = reranker.score_pairs
    reranker.score_pairs = lambda batch, **kw: calls.append(len(batch)) or score_pairs(batch, **kw)
    result = mine_hard_negatives(emb, pairs, tmp_path / "guarded.jsonl", num_negatives=3, reranker=reranker,
                                 reranker_max_score=threshold, **common)  # fmt: skip
    assert calls == [sum(len(r["neg"]) for r in survivors)]  # all 6 queries' candidates in one stream
    guarded = read_jsonl(tmp_path / "guarded.jsonl")
    dropped = 0
    for full, scores, rec in zip(survivors, rr_scores, guarded):
        allowed = [d for d, s in zip(full["neg_ids"], scores) if s <= threshold]
        dropped += len(full["neg_ids"]) - len(allowed)
        assert rec["neg_ids"] == allowed[:3]
    assert dropped > 0
    assert result.summary["removed"]["reranker"] == dropped


def test_edge_cases(emb, cache, tmp_path, capsys, monkeypatch):
    docs = [
        "Apples are a sweet red fruit.", "apples are a  SWEET red fruit.",  # the same text twice
        "Broccoli is a green vegetable rich in fibre.", "Salmon contains omega-3 fatty acids.",
        "Green tea has antioxidants.", "Green tea has antioxidants.", "Lentils are high in protein.",
        "Whole grains lower the risk of heart disease.",
    ]  # fmt: skip
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(docs) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [
        {"query": "which fruit is sweet and red?", "pos": ["Apples are a sweet red fruit."]},
        {"query": "does coffee raise blood pressure?", "pos": ["Caffeine raises blood pressure briefly."]},
        {"query": "plant protein sources", "pos": ["Lentils are high in protein."], "neg": ["old"]},
    ])  # fmt: skip
    rules = dict(range_min=0, range_max=50, num_negatives=10, max_score=None, margin=None, cache_dir=cache)
    result = mine_hard_negatives(emb, pairs, tmp_path / "out.jsonl", corpus=corpus, **rules)
    out = read_jsonl(tmp_path / "out.jsonl")
    s = result.summary
    assert s["queries_with_positive_not_in_corpus"] == 1  # the coffee query: reported...
    assert len(out[1]["neg"]) == 6  # ...and still mined (8 docs, 2 repeated texts)
    assert s["queries_with_fewer_negatives"] == 3
    # apples query: both spellings of its positive removed, one repeated tea text; lentils: one positive, two repeats
    assert s["removed"]["positive"] == 3 and s["removed"]["duplicate"] == 1 + 2 + 2
    for rec in out:
        texts = [normalize_text(t) for t in rec["neg"]]
        assert len(texts) == len(set(texts))
        assert not set(texts) & {normalize_text(p) for p in rec["pos"]}
        assert "old" not in rec["neg"]
    assert len(out[0]["neg"]) == 5  # both spellings of the positive removed
    # .txt ids are 1-based line numbers: lines 1-2 are the apples, 5-6 the same tea text
    assert set(out[0]["neg_ids"]) - {"5", "6"} == {"3", "4", "7", "8"}
    assert all(docs[int(i) - 1] == t for r in out for i, t in zip(r["neg_ids"], r["neg"]))

    # resume: a run killed after one line (and half of the next) ends with the same file
    full = (tmp_path / "out.jsonl").read_text()
    lines = full.splitlines(keepends=True)
    (tmp_path / "out.jsonl").write_text(lines[0] + lines[1][:20])
    again = mine_hard_negatives(emb, pairs, tmp_path / "out.jsonl", corpus=corpus, **rules)
    assert again.summary["skipped_already_written"] == 1 and again.summary["queries_this_run"] == 2
    assert again.summary["queries"] == 3  # the summary describes the whole output...
    assert again.summary["rule_counts_cover_queries"] == 2  # ...and says which counts the killed run lost
    assert (tmp_path / "out.jsonl").read_text() == full

    # the same with the corpus kept on disk (ids and byte offsets only), as for files over 1 GiB
    monkeypatch.setattr(corpus_module, "IN_MEMORY_MAX_BYTES", 0)
    assert isinstance(corpus_module.open_corpus(corpus), corpus_module.CorpusFile)
    mine_hard_negatives(emb, pairs, tmp_path / "disk.jsonl", corpus=corpus, **rules)
    assert (tmp_path / "disk.jsonl").read_text() == full
    monkeypatch.undo()

    # the same through Milvus Lite
    mine_hard_negatives(
        emb, pairs, tmp_path / "milvus.jsonl", corpus=corpus, index=f"milvus:{tmp_path / 'm.db'}", **rules
    )
    same_texts = [[normalize_text(t) for t in r["neg"]] for r in out]  # repeated texts tie: compare texts
    assert [
        [normalize_text(t) for t in r["neg"]] for r in read_jsonl(tmp_path / "milvus.jsonl")
    ] == same_texts

    # default corpus: the positives of all records
    positives_only = mine_hard_negatives(emb, pairs, tmp_path / "p.jsonl", **rules)
    assert positives_only.summary["corpus_size"] == 3
    first = read_jsonl(tmp_path / "p.jsonl")[0]
    assert sorted(first["neg"]) == ["Caffeine raises blood pressure briefly.", "Lentils are high in protein."]

    # bad input: clear errors
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(QembedError, match="empty"):
        mine_hard_negatives(
            emb, tmp_path / "empty.jsonl", tmp_path / "x.jsonl", corpus=corpus, cache_dir=cache
        )
    write_jsonl(tmp_path / "nopos.jsonl", [{"query": "q", "pos": []}])
    with pytest.raises(QembedError, match=r"nopos.jsonl:1: 'pos'"):
        mine_hard_negatives(
            emb, tmp_path / "nopos.jsonl", tmp_path / "x.jsonl", corpus=corpus, cache_dir=cache
        )
    with pytest.raises(QembedError, match="not a result of this input"):
        write_jsonl(tmp_path / "other.jsonl", [{"query": "another"}])
        mine_hard_negatives(emb, pairs, tmp_path / "other.jsonl", corpus=corpus, cache_dir=cache)


def test_cli(minilm_path, cache, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(
        pairs, [{"query": "red fruit", "pos": ["Apples are red."]}, {"query": "tea", "pos": ["Tea is hot."]}]
    )
    corpus = tmp_path / "c.jsonl"
    write_jsonl(
        corpus,
        [{"_id": f"d{i}", "text": t} for i, t in enumerate(["Apples are red.", "Tea is hot.", "Rice."])],
    )
    args = ["mine", "--model", str(minilm_path), "--input", str(pairs), "--corpus", str(corpus), "--range-min", "0",
            "--no-max-score", "--margin", "0", "--cache-dir", str(cache), "--output", str(tmp_path / "o.jsonl")]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "queries mined: 2" in printed and "o.summary.json" in printed
    assert {r["neg_ids"][0] for r in read_jsonl(tmp_path / "o.jsonl")} <= {"d0", "d1", "d2"}
    assert main([*args, "--margin", "0.1", "--relative-margin", "0.1"]) == 2  # exclusive options
    assert "not allowed with argument" in capsys.readouterr().err
    bad = main(["mine", "--model", str(minilm_path), "--input", str(tmp_path / "missing.jsonl"),
                "--output", str(tmp_path / "x.jsonl")])  # fmt: skip
    err = capsys.readouterr().err
    assert bad == 2 and "missing.jsonl" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert Path(tmp_path / "o.summary.json").is_file()
