"""`qembed eval` / `evaluate`: end to end on the tiny Qwen3 models, against an independent computation,
the embedding cache across runs, bad input, and the NFCorpus check with the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qembed.cli import main
from qembed.data.beir import RetrievalDataset, write_beir
from qembed.eval import MODEL_DEFAULT, QueryFormat, evaluate
from qembed.eval.metrics import evaluate_run

TOPICS = ["rice blast", "maize rust", "wheat aphids", "soybean cyst", "potato blight", "apple scab",
          "tomato wilt", "grape mildew"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """8 queries, 32 short documents, graded judgments."""
    corpus, queries, qrels = {}, {}, {}
    for i, topic in enumerate(TOPICS):
        queries[f"q{i}"] = f"how to control {topic}?"
        qrels[f"q{i}"] = {f"d{i}a": 2, f"d{i}b": 1}
        corpus[f"d{i}a"] = {"title": topic, "text": f"Spray fungicide early to control {topic}."}
        corpus[f"d{i}b"] = {"title": "", "text": f"{topic} spreads in wet weather."}
        corpus[f"d{i}c"] = {"title": "Market", "text": f"Prices of crops affected by {topic} rose."}
        corpus[f"d{i}d"] = {"title": "", "text": f"Unrelated note number {i} about irrigation."}
    path = tmp_path_factory.mktemp("tiny-beir")
    write_beir(path, corpus, queries, {"test": qrels})
    return path


def _exact_run(doc_vectors, query_vectors, doc_ids, query_ids, depth):
    scores = query_vectors @ doc_vectors.T
    return {qid: [(doc_ids[j], float(scores[i, j])) for j in np.argsort(-scores[i])[:depth]]
            for i, qid in enumerate(query_ids)}  # fmt: skip


def test_cli_end_to_end_with_reranker_and_instruction_modes(tiny_dataset, tiny_embedder_path, tiny_reranker_path,
                                                            tmp_path, capsys):  # fmt: skip
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = main(["eval", "--model", str(tiny_embedder_path), "--dataset", str(tiny_dataset),
                 "--instruction-modes", "default,none", "--reranker", str(tiny_reranker_path), "--rerank-top", "5",
                 "--k", "1,5,10", "--cache-dir", str(cache), "--output", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    entries = json.loads((out / "metrics.json").read_text())
    assert len(entries) == 2
    for entry in entries:
        assert {"model", "dataset", "split", "instruction", "dim", "reranker", "num_queries", "num_docs", "metrics",
                "timings"} <= set(entry)  # fmt: skip
        assert entry["num_queries"] == 8 and entry["num_docs"] == 32 and entry["dim"] == 64
        assert entry["reranker"] == str(tiny_reranker_path)
        assert {"ndcg@10", "recall@5", "mrr@10", "map@10", "recall@1"} <= set(entry["metrics"])
        assert all(key == key.lower() and 0.0 <= v <= 1.0 for key, v in entry["metrics"].items())
    assert entries[0]["instruction"].startswith("Given a web search query") and entries[1]["instruction"] is None

    # Independent computation of the bare-query run: exact search, then the reranker on the top 5.
    from qembed import Embedder, Reranker

    ds = RetrievalDataset.load(tiny_dataset)
    emb, rr = Embedder.from_pretrained(tiny_embedder_path), Reranker.from_pretrained(tiny_reranker_path)
    run = _exact_run(emb.encode_documents(ds.doc_texts()), emb.encode_queries(list(ds.queries.values()), instruction=None),
                     ds.doc_ids, ds.query_ids, 10)  # fmt: skip
    reranked = {}
    for qid, candidates in run.items():
        head = [d for d, _ in candidates[:5]]
        order = rr.rerank(ds.queries[qid], [ds.doc_text(d) for d in head])
        reranked[qid] = [head[i] for i, _ in order] + [d for d, _ in candidates[5:]]
    expected = evaluate_run(reranked, ds.qrels, (1, 5, 10)).mean
    for key, value in expected.items():
        assert entries[1]["metrics"][key] == pytest.approx(value, abs=1e-6), key

    report = (out / "report.md").read_text()
    assert "no instruction" in report and "instruction: Given a web search" in report and "**" in report
    assert "| run | ndcg@10 | recall@1 | recall@5 | recall@10 | mrr@10 | map@10 |" in report
    assert (out / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| run | ndcg@10" in printed and "no instruction" in printed

    # Second evaluation (other k list, no reranker): nothing is re-encoded, retrieval metrics agree.
    again = evaluate(str(tiny_embedder_path), tiny_dataset, instruction=[None], k=(5, 20), cache_dir=cache)
    assert again[0]["timings"]["corpus_encoded"] == 0 and again[0]["timings"]["queries_encoded"] == 0
    plain = evaluate_run(run, ds.qrels, (5, 20)).mean
    assert again[0]["metrics"]["recall@5"] == pytest.approx(plain["recall@5"], abs=1e-6)
    # Reranking the top 5 reorders within them only: recall@5 and recall@10 are unchanged by it.
    assert entries[1]["metrics"]["recall@5"] == pytest.approx(plain["recall@5"], abs=1e-6)

    # nDCG's gain is linear by default (trec_eval, BEIR, MTEB); --ndcg-gain exponential keeps the other.
    assert entries[1]["ndcg_gain"] == "linear"
    assert main(["eval", "--model", str(tiny_embedder_path), "--dataset", str(tiny_dataset), "--no-instruction",
                 "--ndcg-gain", "exponential", "--k", "5,10", "--cache-dir", str(cache), "--output", str(tmp_path / "exp")]) == 0  # fmt: skip
    exponential = json.loads((tmp_path / "exp" / "metrics.json").read_text())[0]
    want = evaluate_run(run, ds.qrels, (5, 10), gain="exponential").mean
    assert exponential["ndcg_gain"] == "exponential"
    assert exponential["metrics"]["ndcg@10"] == pytest.approx(want["ndcg@10"], abs=1e-6)
    assert exponential["metrics"]["ndcg@10"] != pytest.approx(evaluate_run(run, ds.qrels, (10,)).mean["ndcg@10"], abs=1e-4)


def test_changed_document_reencodes_only_it(tiny_dataset, tiny_embedder_path, tmp_path):
    from qembed import Embedder

    emb = Embedder.from_pretrained(tiny_embedder_path)
    ds = RetrievalDataset.load(tiny_dataset)
    first = evaluate(emb, ds, cache_dir=tmp_path, k=(5,))
    assert first[0]["timings"]["corpus_encoded"] == 32
    ds.corpus["d3a"] = "soybean cyst Rotate crops and use resistant varieties."
    second = evaluate(emb, ds, cache_dir=tmp_path, k=(5,))
    assert second[0]["timings"]["corpus_encoded"] == 1 and second[0]["timings"]["queries_encoded"] == 0
    # The default instruction and a given text are different settings; the same text twice is one run.
    # The query format written out as a raw prompt is the same format again: one run.
    same = QueryFormat("prompt", f"Instruct: {emb.default_instruction}\nQuery:")
    runs = evaluate(emb, ds, instruction=[MODEL_DEFAULT, "Find the answer", "Find the answer", same],
                    cache_dir=tmp_path, k=(5,))  # fmt: skip
    assert [r["instruction"] for r in runs] == [emb.default_instruction, "Find the answer"]
    assert [r["query_format"] for r in runs] == ["instruction", "instruction"]


def test_results_are_written_after_each_model(tiny_dataset, tiny_embedder_path, tmp_path):
    from qembed.errors import QembedError

    with pytest.raises(QembedError):
        evaluate([str(tiny_embedder_path), str(tmp_path / "missing-model")], tiny_dataset, k=(5,),
                 cache_dir=tmp_path / "c", output=tmp_path / "out")  # fmt: skip
    kept = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [entry["model"] for entry in kept] == [str(tiny_embedder_path)]
    assert "recall@5" in (tmp_path / "out" / "report.md").read_text()


def test_reranker_runs_across_queries_and_training_uses_the_engine(tiny_dataset, tiny_embedder_path,
                                                                    tiny_reranker_path, tmp_path, monkeypatch):  # fmt: skip
    from qembed import Embedder, Reranker
    from qembed.train.embedder import evaluate_embedder
    from qembed.train.reranker import evaluate_reranker

    emb, rr = Embedder.from_pretrained(tiny_embedder_path), Reranker.from_pretrained(tiny_reranker_path)
    ds = RetrievalDataset.load(tiny_dataset)
    calls = []
    real = rr.score_pairs
    monkeypatch.setattr(rr, "score_pairs", lambda pairs, **kw: calls.append(len(pairs)) or real(pairs, **kw))
    monkeypatch.setattr(rr, "score", None)  # not once per query
    evaluate(emb, ds, reranker=rr, rerank_top=5, k=(5,), cache_dir=tmp_path)
    assert calls == [8 * 5]
    calls.clear()
    metrics = evaluate_reranker(rr, ds, num_candidates=4)
    assert calls == [8 * 4] and {"ndcg@10", "recall@5", "mrr@1"} <= set(metrics)

    # Training evaluation: the same engine, nothing written to any cache (the weights change between calls).
    monkeypatch.setenv("QEMBED_CACHE", str(tmp_path / "must-stay-empty"))
    emb.model.train()
    got = evaluate_embedder(emb, ds)
    assert emb.model.training  # restored
    want = evaluate(emb, ds, k=(1, 5, 10, 100), cache_dir=tmp_path)[0]["metrics"]
    assert got == {key: value for key, value in want.items() if key.split("@")[0] in ("ndcg", "recall", "mrr")}
    assert not (tmp_path / "must-stay-empty").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "/nonexistent/ds"], "dataset folder not found"),
        (["--instruction-modes", "default,sometimes"], "--instruction-modes takes default and/or none"),
        (["--k", "5,ten"], "--k must be comma-separated integers"),
        (["--dim", "4096"], "dim must be an integer between 1 and 64"),
        (["--split", "dev"], "no qrels for split 'dev'"),
        (["--index", "annoy"], "unknown index 'annoy'"),
    ],
)
def test_bad_input_one_line_error(tiny_dataset, tiny_embedder_path, tmp_path, capsys, args, message):
    base = {"--model": str(tiny_embedder_path), "--dataset": str(tiny_dataset), "--output": str(tmp_path / "o"),
            "--cache-dir": str(tmp_path / "c")}  # fmt: skip
    for flag in args[::2]:
        base.pop(flag, None)
    argv = ["eval"] + [x for pair in base.items() for x in pair] + args
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_nfcorpus_minilm_matches_published_backends_agree_and_int8_is_close(shared_dir, minilm_path, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    """all-MiniLM-L6-v2 on NFCorpus test, plain title+text, exact search, linear gain (trec_eval):
    nDCG@10 = 31.67 +- 0.3 (measured 31.59 with trec_eval's tie order, the MTEB leaderboard's figure).
    FAISS and Milvus Lite give the same metrics; the second backend reuses the cached embeddings. The same
    model with `quantize="int8"` is within half a point of fp32 on both int8 backends, OpenVINO and ONNX Runtime
    (one test, so the fp32 vectors are encoded once for all checks)."""
    from qembed import Embedder

    emb = Embedder.from_pretrained(minilm_path)
    dataset = RetrievalDataset.load(shared_dir / "data" / "nfcorpus", split="test")
    faiss_run = evaluate(emb, dataset, index="faiss", cache_dir=tmp_path / "cache", output=tmp_path / "faiss")[0]
    assert faiss_run["num_queries"] == 323 and faiss_run["num_docs"] == 3633
    assert faiss_run["ndcg_gain"] == "linear"
    assert abs(100 * faiss_run["metrics"]["ndcg@10"] - 31.67) <= 0.3, faiss_run["metrics"]["ndcg@10"]

    milvus_run = evaluate(emb, dataset, index=f"milvus:{tmp_path / 'nf.db'}", cache_dir=tmp_path / "cache")[0]
    assert milvus_run["timings"]["corpus_encoded"] == 0 and milvus_run["timings"]["queries_encoded"] == 0
    assert milvus_run["metrics"].keys() == faiss_run["metrics"].keys()
    for key, value in faiss_run["metrics"].items():
        assert milvus_run["metrics"][key] == pytest.approx(value, abs=1e-6), key

    for backend in ("openvino", "onnxruntime"):
        monkeypatch.setenv("QEMBED_INT8_BACKEND", backend)
        int8 = Embedder.from_pretrained(minilm_path, quantize="int8")
        int8_run = evaluate(int8, dataset, index="faiss", cache_dir=tmp_path / "cache", k=[10], show_progress=False)[0]
        encoded = faiss_run["timings"]["corpus_encoded"]  # distinct texts: NFCorpus repeats some documents
        assert int8_run["quantize"] == "int8" and int8_run["timings"]["corpus_encoded"] == encoded > 3500  # its own
        fp32, quantized = faiss_run["metrics"]["ndcg@10"], int8_run["metrics"]["ndcg@10"]
        print(f"all-MiniLM-L6-v2 NFCorpus nDCG@10: int8 ({backend}) {100 * quantized:.2f}, fp32 {100 * fp32:.2f}")
        assert abs(quantized - fp32) <= 0.005, (backend, quantized, fp32)


def test_instruction_options_combine():
    import argparse

    from qembed.cli.eval import parse_instruction_settings

    def settings(**kwargs):
        return parse_instruction_settings(argparse.Namespace(**{"instruction": None, "no_instruction": False,
                                                                "instruction_modes": None, **kwargs}))  # fmt: skip

    assert settings() == [MODEL_DEFAULT]
    assert settings(no_instruction=True) == [None]
    assert settings(instruction=["Find it"], no_instruction=True) == ["Find it", None]
    assert settings(instruction_modes=["default", "none"]) == [MODEL_DEFAULT, None]  # as the parser splits "default,none"
