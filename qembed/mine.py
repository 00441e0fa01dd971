"""`qembed mine`: hard negatives for training pairs, with false-negative guards, in bounded memory.

Input: training-format JSONL (`{"query", "pos": [...], "neg"?, "query_id"?, "pos_ids"?}`) or a BEIR folder
(queries with a positive in the qrels split). Corpus: a BEIR folder or `corpus.jsonl`, a JSONL file with a
`text` field, or a `.txt` file (one document per line); by default the BEIR input's own corpus, or the
positives of all records. The corpus is encoded once (through the embedding cache) in streaming batches
into a vector index; queries are encoded and searched in chunks. Selection rules: `qembed.negatives`.

Output: one line per input record, in input order, with `neg`, `neg_ids`, `neg_scores` (query-negative
scores) and `pos_scores` (query-positive scores) set; existing `neg` values are replaced. A run that stops
resumes after the last complete line. A summary is printed and written next to the output
(`<output stem>.summary.json`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qembed.data.jsonl import JsonlAppender, iter_jsonl
from qembed.errors import QembedError
from qembed.negatives import (
    NUM_NEGATIVES,
    MiningConfig,
    MiningStats,
    QueryChunk,
    QueryInput,
    mine_chunks,
    text_hash,
)

log = logging.getLogger(__name__)

DEFAULT = object()  # "the model's own query instruction"


@dataclass
class Corpus:
    ids: list[str]
    texts: list[str]


@dataclass
class PairRecord:
    query: str
    pos: list[str]
    pos_ids: list[str] | None
    record: dict


# ---------------------------------------------------------------------------------------------- inputs
def load_pairs(path: str | Path, split: str = "train") -> tuple[list[PairRecord], Corpus | None]:
    """Records from training-format JSONL, or from a BEIR folder (then also its corpus)."""
    path = Path(path)
    if path.is_dir():
        from qembed.data.beir import RetrievalDataset

        data = RetrievalDataset.load(path, split=split)
        records = []
        for qid, judged in data.qrels.items():
            pos_ids = [did for did, grade in judged.items() if grade > 0]
            if pos_ids:
                pos = [data.doc_text(did) for did in pos_ids]
                record = {"query": data.queries[qid], "query_id": qid, "pos": pos, "pos_ids": pos_ids}
                records.append(PairRecord(data.queries[qid], pos, pos_ids, record))
        corpus = Corpus(data.doc_ids, data.doc_texts())
        if not records:
            raise QembedError(f"{path}: no query of split {split!r} has a positive (grade > 0)")
        return records, corpus
    records = []
    for number, record in enumerate(iter_jsonl(path), start=1):
        query, pos, pos_ids = record.get("query"), record.get("pos"), record.get("pos_ids")
        if not isinstance(query, str) or not query.strip():
            raise QembedError(f"{path}: record {number}: 'query' must be a non-empty string")
        if isinstance(pos, str):
            pos = [pos]
        if not isinstance(pos, list) or not pos or not all(isinstance(p, str) for p in pos):
            raise QembedError(f"{path}: record {number}: 'pos' must be a non-empty list of strings")
        if pos_ids is not None:
            if not isinstance(pos_ids, list) or len(pos_ids) != len(pos):
                raise QembedError(f"{path}: record {number}: 'pos_ids' must be a list as long as 'pos'")
            pos_ids = [str(i) for i in pos_ids]
        records.append(PairRecord(query, pos, pos_ids, record))
    if not records:
        raise QembedError(f"{path}: no records: the input is empty")
    return records, None


def load_corpus(path: str | Path) -> Corpus:
    """A BEIR folder / `corpus.jsonl` (`_id`, `title` + `text`), a JSONL file with `text` (`_id`/`id` optional)
    or a `.txt` file (one document per line; id = line number from 0). Blank documents are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    ids, texts = [], []
    if path.suffix == ".jsonl":
        for number, record in enumerate(iter_jsonl(path), start=1):
            text, title = record.get("text"), record.get("title") or ""
            if not isinstance(text, str) or not isinstance(title, str):
                raise QembedError(f"{path}: record {number}: 'text' (and 'title') must be strings")
            doc_id = record.get("_id", record.get("id", number - 1))
            ids.append(str(doc_id))
            texts.append(f"{title} {text}".strip())
    else:
        if not path.is_file():
            raise QembedError(f"corpus file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise QembedError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        ids, texts = [str(i) for i in range(len(lines))], lines
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if len(keep) < len(texts):
        log.warning("%s: skipped %d blank document(s)", path, len(texts) - len(keep))
    if not keep:
        raise QembedError(f"{path}: the corpus is empty")
    if len(set(ids)) < len(ids):
        raise QembedError(f"{path}: document ids are not unique")
    return Corpus([ids[i] for i in keep], [texts[i] for i in keep])


def corpus_from_positives(records: list[PairRecord]) -> Corpus:
    """Every distinct positive text of the records; ids are `pos_ids` where given, else `pos-<n>`."""
    ids, texts, seen = [], [], set()
    for rec in records:
        for j, text in enumerate(rec.pos):
            if text in seen or not text.strip():
                continue
            seen.add(text)
            ids.append(rec.pos_ids[j] if rec.pos_ids else f"pos-{len(ids)}")
            texts.append(text)
    if len(set(ids)) < len(ids):
        raise QembedError("the records' pos_ids name different texts with the same id")
    return Corpus(ids, texts)


# ---------------------------------------------------------------------------------------------- mining
@dataclass
class MiningResult:
    """Where the mined records and the summary went, and the summary itself."""

    output: Path
    summary: dict
    summary_path: Path

    def lines(self) -> list[str]:
        return summary_lines(self.summary)


def mine_hard_negatives(
    model,
    input: str | Path,
    output: str | Path,
    *,
    corpus: str | Path | None = None,
    split: str = "train",
    num_negatives: int = NUM_NEGATIVES,
    range_min: int = 20,
    range_max: int = 50,
    max_score: float | None = 0.8,
    min_score: float | None = None,
    margin: float | None = 0.1,
    relative_margin: float | None = None,
    sampling: str = "top",
    seed: int = 0,
    reranker=None,
    reranker_max_score: float | None = None,
    instruction: str | None | object = DEFAULT,
    dim: int | None = None,
    index: str = "faiss",
    cache_dir: str | Path | None = None,
    chunk_size: int = 1024,
    overwrite: bool = False,
    show_progress: bool | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_tokens: int | None = None,
) -> MiningResult:
    """Mine hard negatives for every record of `input` and write them to `output` (JSONL).

    `model`/`reranker` are names/paths or loaded `Embedder`/`Reranker` objects. `relative_margin` replaces
    the absolute `margin` when given. `instruction` defaults to the model's query instruction (None: none).
    `index` is an index spec (`faiss`, `hnsw`, `milvus:PATH_OR_URI`). An existing `output` is resumed
    (records already written are skipped) unless `overwrite`. `device`, `dtype` and `batch_tokens` (None: the
    model's default) are passed to the models.
    """
    from qembed.eval.cache import iter_encode_with_cache
    from qembed.index import open_index
    from qembed.models.embedder import Embedder

    if relative_margin is not None:
        margin = None
    config = MiningConfig(num_negatives, range_min, range_max, max_score, min_score, margin, relative_margin,
                          sampling, seed, reranker_max_score)  # fmt: skip
    config.validate()
    if chunk_size < 1:
        raise QembedError(f"chunk_size must be positive, got {chunk_size}")
    if (reranker is None) != (reranker_max_score is None):
        raise QembedError("the reranker guard needs both a reranker and reranker_max_score")
    started = time.perf_counter()
    records, beir_corpus = load_pairs(input, split)
    docs = load_corpus(corpus) if corpus is not None else beir_corpus or corpus_from_positives(records)
    output = Path(output)
    done = resume_point(output, records, overwrite)

    emb = model if isinstance(model, Embedder) else Embedder.from_pretrained(model, device=device, dtype=dtype)
    if reranker is not None and isinstance(reranker, (str, Path)):
        from qembed.models.reranker import Reranker

        reranker = Reranker.from_pretrained(reranker, device=device, dtype=dtype)
    doc_prompt = emb.document_prompt
    if instruction is DEFAULT:
        query_options = {"instruction": emb.default_instruction, "prompt": emb.query_prompt}
    else:
        query_options = {"instruction": instruction, "prompt": ""}
    encode_options = {"dim": dim, "cache_dir": cache_dir, "show_progress": show_progress, "batch_tokens": batch_tokens}

    # Corpus: encoded once (cached), streamed into the index.
    t0 = time.perf_counter()
    vectors = iter_encode_with_cache(emb, docs.texts, prompt=doc_prompt, desc="corpus", **encode_options)
    store = None
    for start, batch in vectors:
        if store is None:
            store = open_index(index, batch.shape[1], capacity=len(docs.texts), collection="qembed_mine")
        store.add(docs.ids[start : start + len(batch)], batch)
    corpus_s = time.perf_counter() - t0
    row_of = {doc_id: row for row, doc_id in enumerate(docs.ids)}
    row_hashes = np.fromiter((text_hash(t) for t in docs.texts), dtype=np.int64, count=len(docs.texts))
    corpus_hashes = set(row_hashes.tolist())

    todo = records[done:]
    missing_positive = 0

    encode_queries = cached_encoder(emb, cache_dir, dim, **query_options, batch_tokens=batch_tokens)
    encode_positives = cached_encoder(emb, cache_dir, dim, instruction=None, prompt=doc_prompt, batch_tokens=batch_tokens)

    def chunks():
        nonlocal missing_positive
        for begin in range(0, len(todo), chunk_size):
            part = todo[begin : begin + chunk_size]
            q = encode_queries([r.query for r in part])
            p = encode_positives([t for r in part for t in r.pos])
            inputs, offset = [], 0
            for i, rec in enumerate(part):
                pos_scores = p[offset : offset + len(rec.pos)] @ q[i]
                offset += len(rec.pos)
                hashes = frozenset(text_hash(t) for t in rec.pos)
                rows = frozenset(row_of[d] for d in rec.pos_ids or [] if d in row_of)
                if not rows and not hashes & corpus_hashes:
                    missing_positive += 1
                inputs.append(QueryInput(float(pos_scores.max()), rows, hashes))
                rec.record["pos_scores"] = [round(float(s), 6) for s in pos_scores]
            yield QueryChunk(done + begin, q, inputs)

    guard = None
    if reranker is not None:

        def guard(number: int, cands) -> list[bool]:
            texts = [docs.texts[c.row] for c in cands]
            return [
                s <= reranker_max_score
                for s in reranker.score(records[number].query, texts, show_progress=False)
            ]

    stats = MiningStats()
    t0 = time.perf_counter()
    with JsonlAppender(output, fsync=False) as out:
        for chunk, selected in mine_chunks(store, chunks(), config, stats, row_hashes=row_hashes, guard=guard,
                                           total=len(todo), show_progress=show_progress):  # fmt: skip
            for i, negatives in enumerate(selected):
                record = dict(records[chunk.start + i].record)
                record["neg"] = [docs.texts[n.row] for n in negatives]
                record["neg_ids"] = [docs.ids[n.row] for n in negatives]
                record["neg_scores"] = [round(n.score, 6) for n in negatives]
                out.write(record)
    summary = stats.summary(config)
    summary.update({
        "input": str(input), "output": str(output), "model": emb.name_or_path, "index": index,
        "corpus_size": len(docs.ids), "records": len(records), "skipped_already_written": done,
        "queries_with_positive_not_in_corpus": missing_positive,
        "reranker": getattr(reranker, "name_or_path", None),
        "timings": {"corpus_encode_index_s": round(corpus_s, 3), "mining_s": round(time.perf_counter() - t0, 3),
                    "total_s": round(time.perf_counter() - started, 3)},
    })  # fmt: skip
    summary_path = output.with_name(output.stem + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return MiningResult(output, summary, summary_path)


def cached_encoder(emb, cache_dir, dim: int | None, *, instruction: str | None, prompt: str,
                   batch_tokens: int | None = None):
    """`texts -> vectors` through one embedding-cache setting, opened once (not once per chunk)."""
    from qembed.eval.cache import EmbeddingCache, text_key

    cache = EmbeddingCache(cache_dir, fingerprint=emb.fingerprint, instruction=instruction, dim=dim,
                           normalize=True, prompt=prompt)  # fmt: skip

    def encode(texts: list[str]) -> np.ndarray:
        keys = [text_key(t) for t in texts]
        missing = {key: text for key, text in zip(keys, texts) if key not in cache}
        if missing:
            extra = {} if batch_tokens is None else {"batch_tokens": batch_tokens}
            vectors = emb.encode(list(missing.values()), instruction=instruction, prompt=prompt, dim=dim,
                                 show_progress=False, **extra)  # fmt: skip
            cache.add(list(missing), vectors)
        return cache.get(keys)

    return encode


def resume_point(output: Path, records: list[PairRecord], overwrite: bool) -> int:
    """How many records `output` already holds (0 when absent or `overwrite`); checks they match the input."""
    if overwrite or not output.exists():
        if output.exists():
            output.unlink()
        return 0
    written = list(iter_jsonl(output, allow_truncated_tail=True))
    if len(written) > len(records):
        raise QembedError(
            f"{output} has more lines than the input has records: pass overwrite to start afresh"
        )
    for i, line in enumerate(written):
        if line.get("query") != records[i].query:
            raise QembedError(
                f"{output}:{i + 1} is not a result of this input: pass overwrite to start afresh"
            )
    if written:
        log.warning("%s: resuming after %d record(s) already written", output, len(written))
    return len(written)


def summary_lines(summary: dict) -> list[str]:
    """The summary as a few readable lines."""
    cfg = summary["config"]
    hist = ", ".join(f"{n}: {c}" for n, c in summary["negatives_per_query"].items())
    removed = ", ".join(f"{rule} {count}" for rule, count in summary["removed"].items())
    lines = [
        f"queries mined: {summary['queries']} (skipped, already written: {summary.get('skipped_already_written', 0)})"
        f"; corpus: {summary.get('corpus_size', '?')} documents",
        f"negatives: {summary['negatives']}; per query {{{hist}}}; "
        f"fewer than {cfg['num_negatives']}: {summary['queries_with_fewer_negatives']}",
        f"candidates in ranks [{cfg['range_min']}, {cfg['range_max']}): {summary['candidates_in_window']}; "
        f"removed: {removed}",
    ]
    if "queries_with_positive_not_in_corpus" in summary:
        lines.append(
            f"queries whose positive is not in the corpus: {summary['queries_with_positive_not_in_corpus']}"
        )
    for name in ("pos_score", "neg_score"):
        s = summary[name]
        if s.get("count"):
            lines.append(f"{name}: mean {s['mean']:.3f}, p5 {s['p5']:.3f}, p50 {s['p50']:.3f}, p95 {s['p95']:.3f} "
                         f"(n={s['count']})")  # fmt: skip
    return lines
