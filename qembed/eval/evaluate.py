"""`evaluate`: encode a BEIR collection with one or more models, search, optionally rerank, score, report.

For each model (and dim) the corpus is encoded once, in streaming chunks through the embedding cache, and
added to a vector index as the chunks come; each instruction setting then encodes its queries (cached
too), searches the index and is scored. Runs are written to `metrics.json`, `report.md` and
`recall_at_k.png` when an output folder is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qembed.data.beir import RetrievalDataset
from qembed.errors import QembedError
from qembed.eval.cache import CacheStats, EmbeddingCache, iter_encode_with_cache, text_key
from qembed.eval.metrics import METRICS, evaluate_run
from qembed.index import open_index, parse_spec

log = logging.getLogger(__name__)


class _ModelDefault:
    def __repr__(self) -> str:
        return "MODEL_DEFAULT"


MODEL_DEFAULT = _ModelDefault()
"""Instruction setting: the model's own default query instruction (none for models without one)."""

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
    output: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    show_progress: bool | None = None,
    quantize: str | None = None,
) -> list[dict]:
    """Evaluate retrieval of each model on a BEIR dataset; returns one result dict per run.

    `models`: model names/paths or loaded `Embedder`s (one or a list). `instruction`: `MODEL_DEFAULT`,
    `None` (bare queries), a text, or a list of these to compare settings side by side. `reranker`: a
    name/path or `Reranker` that reorders each query's top `rerank_top` candidates. `index`: an
    `open_index` spec (`faiss`, `hnsw`, `milvus:PATH.db`, `milvus:http://HOST:PORT`). Metrics are
    fractions in [0, 1] keyed `"<metric>@<k>"` (see `qembed.eval.metrics`; nDCG gain `2^grade - 1`).
    `quantize="int8"` loads models given by name with int8 Linear layers on the CPU.
    """
    from qembed.models.embedder import Embedder
    from qembed.models.reranker import Reranker

    ks = sorted({int(x) for x in k})
    if not ks or ks[0] < 1:
        raise QembedError(f"k values must be positive integers, got {list(k)}")
    if rerank_top < 1:
        raise QembedError(f"rerank_top must be at least 1, got {rerank_top}")
    parse_spec(index)  # a bad spec fails before any model is loaded
    if not isinstance(dataset, RetrievalDataset):
        dataset = RetrievalDataset.load(dataset, split=split)
    models = models if isinstance(models, (list, tuple)) else [models]
    if not models:
        raise QembedError("no model given")
    settings = instruction if isinstance(instruction, (list, tuple)) else [instruction]

    rr, rr_name = None, None
    if reranker is not None:
        rr = reranker if isinstance(reranker, Reranker) else Reranker.from_pretrained(reranker, device=device, quantize=quantize)
        rr_name = str(getattr(rr, "name_or_path", reranker))
    query_ids = dataset.query_ids
    query_texts = [dataset.queries[q] for q in query_ids]
    doc_ids = dataset.doc_ids
    depth = min(len(doc_ids), max(ks[-1], rerank_top if rr else 0))

    results = []
    for model in models:
        started = time.perf_counter()
        emb = model if isinstance(model, Embedder) else Embedder.from_pretrained(model, device=device, quantize=quantize)
        name = str(model) if not isinstance(model, Embedder) else emb.name_or_path
        load_s = time.perf_counter() - started

        if dim is not None and not (isinstance(dim, int) and 0 < dim <= emb.hidden_size):
            raise QembedError(f"dim must be an integer between 1 and {emb.hidden_size} for {name}, got {dim!r}")
        try:
            vector_index, doc_vectors, corpus_timing = _index_corpus(emb, dataset, doc_ids, dim, index, cache_dir,
                                                                     show_progress, name)  # fmt: skip
        except ValueError as exc:  # e.g. a dim below the model's Matryoshka minimum
            raise QembedError(f"{name}: {exc}") from None
        done: set = set()
        for setting in settings:
            query_instruction, query_prompt = _query_format(emb, setting)
            if (query_instruction, query_prompt) in done:
                log.warning("%s: instruction setting %r is the same as an earlier one; skipped", name, setting)
                continue
            done.add((query_instruction, query_prompt))
            timings = {"load_s": load_s, **corpus_timing}
            t = time.perf_counter()
            stats = CacheStats()
            query_vectors = np.concatenate([v for _, v in iter_encode_with_cache(
                emb, query_texts, instruction=query_instruction, prompt=query_prompt, dim=dim, cache_dir=cache_dir,
                show_progress=show_progress, desc=f"{_short(name)}: queries", stats=stats)])  # fmt: skip
            timings["encode_queries_s"] = time.perf_counter() - t
            timings["queries_encoded"] = stats.encoded

            t = time.perf_counter()
            rows, _ = vector_index.search_rows(query_vectors, min(len(doc_ids), depth + TIE_MARGIN))
            run = {qid: _exact_ranking(row, query_vector, doc_vectors, doc_ids, depth)
                   for qid, row, query_vector in zip(query_ids, rows, query_vectors)}  # fmt: skip
            timings["search_s"] = time.perf_counter() - t
            if rr is not None:
                t = time.perf_counter()
                run = _rerank(rr, dataset, run, rerank_top, show_progress)
                timings["rerank_s"] = time.perf_counter() - t
            metrics = evaluate_run(run, dataset.qrels, ks, METRICS).mean
            timings["total_s"] = sum(v for key, v in timings.items() if key.endswith("_s"))
            results.append({
                "model": name,
                "dataset": dataset.name,
                "split": dataset.split,
                "instruction": query_instruction if query_instruction is not None else (query_prompt or None),
                "dim": int(query_vectors.shape[1]),
                "reranker": rr_name,
                "quantize": emb.quantize,
                "index": index,
                "num_queries": len(query_ids),
                "num_docs": len(doc_ids),
                "metrics": {key: round(float(value), 6) for key, value in metrics.items()},
                "timings": {key: round(v, 3) if isinstance(v, float) else v for key, v in timings.items()},
            })  # fmt: skip
        if hasattr(vector_index, "close"):
            vector_index.close()

    if output is not None:
        from qembed.eval.report import write_outputs

        write_outputs(results, output)
    return results


def _index_corpus(emb, dataset, doc_ids, dim, spec, cache_dir, show_progress, name):
    """Encode the corpus chunk by chunk (via the cache) into a fresh index.

    Returns the index, a `_CachedVectors` view of the document vectors (read back from the cache by
    row) and timings.
    """
    t = time.perf_counter()
    stats = CacheStats()
    vector_index = None
    add_s = 0.0
    keys: list[bytes] = []
    prompt = emb.document_prompt

    def texts():  # streamed: a `DiskCorpus` never holds the collection's text
        for text in dataset.iter_doc_texts():
            keys.append(text_key(text))
            yield text

    for start, vectors in iter_encode_with_cache(
        emb, texts(), total=len(doc_ids), prompt=prompt, dim=dim, cache_dir=cache_dir,
        show_progress=show_progress, desc=f"{_short(name)}: corpus", stats=stats,
    ):  # fmt: skip
        if vector_index is None:
            vector_index = open_index(spec, vectors.shape[1], **({"capacity": len(doc_ids)} if spec == "faiss" else {}))
        t_add = time.perf_counter()
        vector_index.add(doc_ids[start : start + len(vectors)], vectors)
        add_s += time.perf_counter() - t_add
    total = time.perf_counter() - t
    log.info("%s: corpus %d from cache, %d encoded", name, stats.hits, stats.encoded)
    cache = EmbeddingCache(cache_dir, fingerprint=emb.fingerprint, instruction=None, dim=dim, normalize=True,
                           prompt=prompt)  # fmt: skip
    timings = {"encode_corpus_s": total - add_s, "index_add_s": add_s, "corpus_encoded": stats.encoded}
    return vector_index, _CachedVectors(cache, keys), timings


class _CachedVectors:
    """Document vectors by row number, read from the embedding cache (nothing held in memory)."""

    def __init__(self, cache: EmbeddingCache, keys: list[bytes]) -> None:
        self.cache, self.keys = cache, keys

    def rows(self, rows) -> np.ndarray:
        return self.cache.get([self.keys[r] for r in rows])


def _exact_ranking(rows: np.ndarray, query_vector: np.ndarray, doc_vectors: _CachedVectors, doc_ids: list[str],
                   depth: int) -> list[tuple[str, float]]:  # fmt: skip
    """The index's candidates re-scored exactly (float64 dot products of the stored float32 vectors) and
    ranked by score then doc id, so the ranking does not depend on a backend's floating-point summation
    order: identical documents tie exactly, and FAISS and Milvus give the same metrics."""
    rows = [int(r) for r in rows if r >= 0]
    if not rows:
        return []
    scores = (doc_vectors.rows(rows).astype(np.float64) * query_vector.astype(np.float64)).sum(axis=1)
    order = sorted(range(len(rows)), key=lambda i: (-scores[i], doc_ids[rows[i]]))[:depth]
    return [(doc_ids[rows[i]], float(scores[i])) for i in order]


def _query_format(emb, setting) -> tuple[str | None, str]:
    """(instruction, raw prompt) used to encode the queries for an instruction setting."""
    if setting is MODEL_DEFAULT:
        instruction = getattr(emb, "default_instruction", None)
        return (instruction, "") if instruction else (None, getattr(emb, "query_prompt", "") or "")
    if setting is None or setting == "":
        return None, ""
    if not isinstance(setting, str):
        raise QembedError(f"instruction must be a text, None or MODEL_DEFAULT, got {setting!r}")
    return setting, ""


def _rerank(rr, dataset: RetrievalDataset, run: dict, top: int, show_progress) -> dict:
    """Reorder each query's first `top` candidates by reranker score; the rest keep their order below."""
    from tqdm.auto import tqdm

    reranked = {}
    disable = not show_progress if show_progress is not None else None
    for qid, candidates in tqdm(run.items(), desc="rerank", unit="query", disable=disable):
        head, tail = candidates[:top], candidates[top:]
        order = rr.rerank(dataset.queries[qid], [dataset.doc_text(d) for d, _ in head], show_progress=False)
        reranked[qid] = [head[i][0] for i, _ in order] + [d for d, _ in tail]
    return reranked


def _short(name: str) -> str:
    path = Path(name)
    return f"{path.parent.name}/{path.name}" if path.name in ("model", "") and path.parent.name else path.name
