"""The evaluation engine: encode a BEIR collection with one or more models, search, optionally rerank, score.

For each model (and dim) the corpus is encoded once, in streaming chunks through the embedding cache, and
added to a vector index as the chunks come; each query format then encodes its queries (cached too),
searches the index and is scored. `metrics.json`, `report.md` and `recall_at_k.png` are (re)written after
each model, so a failure on a later model keeps the earlier results. Training evaluation uses the same
engine: `evaluate(..., cache=False)` for an embedder, `evaluate_reranking` for a reranker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from qembed.cache import KEY_BYTES, text_key
from qembed.data.beir import RetrievalDataset
from qembed.data.corpus import corpus_path
from qembed.encode import CachedEncoder
from qembed.errors import QembedError
from qembed.eval.metrics import GAINS, METRICS, evaluate_run, trec_order
from qembed.index import open_index, parse_spec
from qembed.models.prompts import MODEL_DEFAULT, QueryFormat

log = logging.getLogger(__name__)

__all__ = ["MODEL_DEFAULT", "QueryFormat", "evaluate", "evaluate_reranking", "rerank_run"]

DEFAULT_KS = (1, 5, 10, 30, 100)
TIE_MARGIN = 10  # extra candidates fetched so documents tied at the cut-off are all considered


def evaluate(
    models,
    dataset: RetrievalDataset | str | Path,
    *,
    split: str = "test",
    instruction=MODEL_DEFAULT,
    dim: int | None = None,
    k: Sequence[int] = DEFAULT_KS,
    index: str = "faiss",
    reranker=None,
    rerank_top: int = 100,
    ndcg_gain: str = "linear",
    output: str | Path | None = None,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    batch_tokens: int | None = None,
    device: str | None = None,
    show_progress: bool | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    engine=None,
) -> list[dict]:
    """Evaluate retrieval of each model on a BEIR dataset; returns one result dict per run.

    `models`: model names/paths or loaded `Embedder`s (one or a list). `instruction`: a query format —
    `MODEL_DEFAULT`, `None` (bare queries), an instruction text or a `QueryFormat` — or a list of these to
    compare side by side. `reranker`: a name/path or `Reranker` that reorders each query's top `rerank_top`
    candidates. `index`: an `open_index` spec (`faiss`, `hnsw`, `milvus:PATH.db`, `milvus:http://HOST:PORT`).
    `cache=False` keeps vectors in memory only (for weights that change, as in training). `device`, `dtype`
    and `batch_tokens` (padded tokens per batch; None: each model's measured default) are passed to the models;
    `quantize="int8"` loads models given by name for int8 inference on the CPU. Metrics are
    fractions in [0, 1] keyed `"<metric>@<k>"` (see `qembed.eval.metrics`; nDCG gain `ndcg_gain`).
    `engine`: a `qembed.ray_engine.RayOptions` to encode the corpus on Ray (into the cache) first.
    """
    from qembed.eval.report import write_outputs
    from qembed.models.embedder import Embedder
    from qembed.models.reranker import Reranker

    ks = sorted({int(x) for x in k})
    if not ks or ks[0] < 1:
        raise QembedError(f"k values must be positive integers, got {list(k)}")
    if rerank_top < 1:
        raise QembedError(f"rerank_top must be at least 1, got {rerank_top}")
    if ndcg_gain not in GAINS:
        raise QembedError(f"nDCG gain must be 'linear' or 'exponential', got {ndcg_gain!r}")
    parse_spec(index)  # a bad spec fails before any model is loaded
    corpus_source = None if isinstance(dataset, RetrievalDataset) else corpus_path(dataset)
    if not isinstance(dataset, RetrievalDataset):
        dataset = RetrievalDataset.load(dataset, split=split)
    models = models if isinstance(models, (list, tuple)) else [models]
    if not models:
        raise QembedError("no model given")
    settings = instruction if isinstance(instruction, (list, tuple)) else [instruction]

    rr, rr_name = None, None
    if reranker is not None:
        rr = reranker if isinstance(reranker, Reranker) else Reranker.from_pretrained(reranker, device=device, dtype=dtype,
                                                                                      quantize=quantize)  # fmt: skip
        rr_name = str(getattr(rr, "name_or_path", reranker))
    options = {"dim": dim, "cache_dir": cache_dir, "persist": cache, "batch_tokens": batch_tokens}
    results: list[dict] = []
    for model in models:
        started = time.perf_counter()
        emb = model if isinstance(model, Embedder) else Embedder.from_pretrained(model, device=device, dtype=dtype,
                                                                                 quantize=quantize)  # fmt: skip
        name = str(model) if not isinstance(model, Embedder) else emb.name_or_path
        load_s = time.perf_counter() - started
        if dim is not None and not (isinstance(dim, int) and 0 < dim <= emb.hidden_size):
            raise QembedError(f"dim must be an integer between 1 and {emb.hidden_size} for {name}, got {dim!r}")
        try:
            formats = _query_formats(emb, settings, name)
            docs = CachedEncoder(emb, prompt=emb.document_prompt, normalize=emb.search_normalize, **options)
        except (TypeError, ValueError) as exc:  # a bad query format, a dim below the Matryoshka minimum
            raise QembedError(f"{name}: {exc}") from None
        if engine is not None:
            from qembed.ray_engine import corpus_of, fill_cache

            fill_cache(docs, corpus_source or corpus_of(dataset), engine, keep_blank=True, show_progress=show_progress)
        vector_index, doc_keys, corpus_timing = _index_corpus(docs, dataset, index, show_progress, name)
        with vector_index:  # a temporary Milvus collection is dropped here, also on failure
            for fmt in formats:
                timings = {"load_s": load_s, **corpus_timing}
                t = time.perf_counter()
                queries = CachedEncoder(emb, query_format=fmt, normalize=emb.search_normalize, **options)
                query_vectors = np.concatenate([v for _, v in queries.iter_chunks(
                    [dataset.queries[q] for q in dataset.query_ids], show_progress=show_progress,
                    desc=f"{_short(name)}: queries")])  # fmt: skip
                timings["encode_queries_s"] = time.perf_counter() - t
                timings["queries_encoded"] = queries.stats.encoded

                t = time.perf_counter()
                depth = min(len(doc_keys), max(ks[-1], rerank_top if rr else 0))
                rows, _ = vector_index.search_rows(query_vectors, min(len(doc_keys), depth + TIE_MARGIN),
                                                  show_progress=show_progress)
                run = {qid: _exact_ranking(row, vector, docs, doc_keys, dataset.doc_ids, depth)
                       for qid, row, vector in zip(dataset.query_ids, rows, query_vectors)}  # fmt: skip
                timings["search_s"] = time.perf_counter() - t
                if rr is not None:
                    t = time.perf_counter()
                    run = rerank_run(rr, dataset, run, rerank_top, show_progress, batch_tokens=batch_tokens)
                    timings["rerank_s"] = time.perf_counter() - t
                metrics = evaluate_run(run, dataset.qrels, ks, METRICS, gain=ndcg_gain).mean
                timings["total_s"] = sum(v for key, v in timings.items() if key.endswith("_s"))
                results.append({
                    "model": name,
                    "dataset": dataset.name,
                    "split": dataset.split,
                    "instruction": fmt.label,
                    "query_format": fmt.kind,
                    "dim": int(query_vectors.shape[1]),
                    "reranker": rr_name,
                    "quantize": emb.quantize,
                    "index": index,
                    "ndcg_gain": ndcg_gain,
                    "num_queries": len(dataset.query_ids),
                    "num_docs": len(doc_keys),
                    "metrics": {key: round(float(value), 6) for key, value in metrics.items()},
                    "timings": {key: round(v, 3) if isinstance(v, float) else v for key, v in timings.items()},
                })  # fmt: skip
        if output is not None:
            write_outputs(results, output)
    return results


def evaluate_reranking(rr, dataset: RetrievalDataset, candidates: Mapping[str, Sequence[str]], *,
                       k: Sequence[int] = (1, 5, 10), metrics: Sequence[str] = METRICS, ndcg_gain: str = "linear",
                       show_progress: bool | None = False) -> dict[str, float]:  # fmt: skip
    """Mean metrics of `rr` reordering each query's given candidate documents (the engine's rerank stage
    without a first stage); only the queries of `candidates` are scored."""
    run = {qid: [(doc_id, 0.0) for doc_id in docs] for qid, docs in candidates.items()}
    longest = max((len(docs) for docs in candidates.values()), default=1)
    reranked = rerank_run(rr, dataset, run, max(longest, 1), show_progress)
    qrels = {qid: dataset.qrels[qid] for qid in candidates if qid in dataset.qrels}
    return evaluate_run(reranked, qrels, k, metrics, gain=ndcg_gain).mean


def rerank_run(rr, dataset: RetrievalDataset, run: Mapping[str, Sequence[tuple[str, float]]], top: int,
               show_progress: bool | None = None, *, batch_tokens: int | None = None) -> dict[str, list[str]]:  # fmt: skip
    """Reorder each query's first `top` candidates by reranker score (trec_eval tie order); the rest keep their
    order below. The pairs of all queries are scored as one stream (`Reranker.score_pairs`), so batches fill."""
    pairs = [(dataset.queries[qid], dataset.doc_text(doc_id)) for qid, ranked in run.items() for doc_id, _ in ranked[:top]]
    scores = iter(rr.score_pairs(pairs, batch_tokens=batch_tokens, show_progress=show_progress))
    reranked: dict[str, list[str]] = {}
    for qid, ranked in run.items():
        ordered = trec_order([(doc_id, next(scores)) for doc_id, _ in ranked[:top]])
        reranked[qid] = [doc_id for doc_id, _ in ordered] + [doc_id for doc_id, _ in ranked[top:]]
    return reranked


def _query_formats(emb, settings: list, name: str) -> list[QueryFormat]:
    """The resolved query formats of the instruction settings; one that encodes like an earlier one is dropped."""
    formats, seen = [], set()
    for setting in settings:
        fmt = emb.resolve_query_format(setting)
        if fmt.prefix in seen:
            log.warning("%s: query format %r encodes like an earlier one; skipped", name, setting)
            continue
        seen.add(fmt.prefix)
        formats.append(fmt)
    return formats


def _index_corpus(docs: CachedEncoder, dataset: RetrievalDataset, spec: str, show_progress, name: str):
    """Encode the corpus chunk by chunk (via the cache) into a fresh index; returns the index, the text keys
    of its rows (`(n, 20)` uint8, to read document vectors back from the cache by row) and timings."""
    t = time.perf_counter()
    vector_index = None
    add_s = 0.0
    doc_ids = dataset.doc_ids
    keys = np.empty((len(doc_ids), KEY_BYTES), dtype=np.uint8)  # 20 bytes per document, no object per key

    def texts():  # streamed: a `DiskCorpus` never holds the collection's text
        for row, text in enumerate(dataset.iter_doc_texts()):
            keys[row] = np.frombuffer(text_key(text), dtype=np.uint8)
            yield text

    try:
        for start, vectors in docs.iter_chunks(texts(), total=len(doc_ids), show_progress=show_progress,
                                               desc=f"{_short(name)}: corpus"):  # fmt: skip
            if vector_index is None:
                vector_index = open_index(spec, vectors.shape[1], capacity=len(doc_ids))
            t_add = time.perf_counter()
            vector_index.add(doc_ids[start : start + len(vectors)], vectors)
            add_s += time.perf_counter() - t_add
    except BaseException:
        if vector_index is not None:
            vector_index.close()  # drops a temporary Milvus collection
        raise
    total = time.perf_counter() - t
    log.info("%s: corpus %d from cache, %d encoded", name, docs.stats.hits, docs.stats.encoded)
    timings = {"encode_corpus_s": total - add_s, "index_add_s": add_s, "corpus_encoded": docs.stats.encoded}
    return vector_index, keys, timings


def _exact_ranking(rows: np.ndarray, query_vector: np.ndarray, docs: CachedEncoder, keys: np.ndarray,
                   doc_ids: list[str], depth: int) -> list[tuple[str, float]]:  # fmt: skip
    """The index's candidates re-scored exactly (float64 dot products of the stored float32 vectors) and
    ranked in trec_eval's order, so the ranking does not depend on a backend's floating-point summation
    order: identical documents tie exactly, and FAISS and Milvus give the same metrics."""
    rows = [int(r) for r in rows if r >= 0]
    if not rows:
        return []
    vectors = docs.rows(keys[rows]).astype(np.float64)
    scores = (vectors * query_vector.astype(np.float64)).sum(axis=1)
    return trec_order([(doc_ids[r], float(s)) for r, s in zip(rows, scores)])[:depth]


def _short(name: str) -> str:
    path = Path(name)
    return f"{path.parent.name}/{path.name}" if path.name in ("model", "") and path.parent.name else path.name
