"""`qembed mine`: hard negatives for training pairs, with false-negative guards, in bounded memory.

Input: training-format JSONL (`qembed.data.pairs`) or a BEIR folder (queries with a positive in the qrels
split). Corpus: any file `qembed.data.corpus` reads (a BEIR folder or `corpus.jsonl`, a JSONL file with a
`text` field, a `.txt` file); by default the BEIR input's own corpus, or the positives of all records. A
corpus file over 1 GiB stays on disk (ids and byte offsets in memory). The corpus is encoded once (through
the embedding cache) in streaming batches into a vector index; queries are encoded and searched in chunks.
Selection rules: `qembed.negatives`.

Output: one line per input record, in input order, with `neg`, `neg_ids`, `neg_scores` (query-negative
scores) and `pos_scores` (query-positive scores) set; existing `neg` values are replaced, except negatives
an LLM wrote (`qembed.data.pairs.llm_negatives`), which stay in front of the mined ones (id and score null).
A run that stops resumes after the last complete line. A summary of the whole output (also the lines an
earlier, interrupted run wrote) is printed and written next to the output (`<output stem>.summary.json`); the
rule counts behind it are kept per chunk in `.<output name>.stats.jsonl` beside it, so a resumed run can add
them up.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qembed.data.corpus import CorpusFile, open_corpus
from qembed.data.jsonl import JsonlAppender, iter_jsonl, write_jsonl
from qembed.data.pairs import PairRecord, llm_negatives, read_pairs
from qembed.errors import QembedError
from qembed.models.prompts import MODEL_DEFAULT, QueryFormat
from qembed.negatives import (
    NUM_NEGATIVES,
    MiningConfig,
    MiningStats,
    Negative,
    QueryChunk,
    QueryInput,
    mine_chunks,
    text_hash,
)

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------- inputs
def load_pairs(path: str | Path, split: str = "train") -> tuple[list[PairRecord], Mapping[str, str] | None]:
    """Records from training-format JSONL (`qembed.data.pairs`), or from a BEIR folder (then also its
    corpus, kept on disk when large)."""
    path = Path(path)
    if not path.is_dir() or (path / "state.json").is_file():  # a file, or a folder saved with datasets' save_to_disk
        return read_pairs(path), None
    from qembed.data.beir import RetrievalDataset

    data = RetrievalDataset.load(path, split=split)
    records = []
    for qid, judged in data.qrels.items():
        pos_ids = [did for did, grade in judged.items() if grade > 0]
        if pos_ids:
            pos = [data.doc_text(did) for did in pos_ids]
            record = {"query": data.queries[qid], "query_id": qid, "pos": pos, "pos_ids": pos_ids}
            records.append(PairRecord(data.queries[qid], pos, pos_ids=pos_ids, record=record))
    if not records:
        raise QembedError(f"{path}: no query of split {split!r} has a positive (grade > 0)")
    return records, data.corpus


def corpus_from_positives(records: list[PairRecord]) -> dict[str, str]:
    """Every distinct positive text of the records; ids are `pos_ids` where given, else `pos-<n>`."""
    corpus: dict[str, str] = {}
    seen: set[str] = set()
    for rec in records:
        for j, text in enumerate(rec.pos):
            if text in seen or not text.strip():
                continue
            seen.add(text)
            doc_id = rec.pos_ids[j] if rec.pos_ids else f"pos-{len(corpus)}"
            if doc_id in corpus:
                raise QembedError("the records' pos_ids name different texts with the same id")
            corpus[doc_id] = text
    return corpus


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
    instruction: QueryFormat | str | None = MODEL_DEFAULT,
    dim: int | None = None,
    index: str = "faiss",
    cache_dir: str | Path | None = None,
    batch_tokens: int | None = None,
    chunk_size: int = 1024,
    overwrite: bool = False,
    show_progress: bool | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> MiningResult:
    """Mine hard negatives for every record of `input` and write them to `output` (JSONL).

    `model`/`reranker` are names/paths or loaded `Embedder`/`Reranker` objects. `relative_margin` replaces
    the absolute `margin` when given. `instruction` is the query format: the model's own (`MODEL_DEFAULT`), a
    text, a `QueryFormat`, or None (bare queries).
    `index` is an index spec (`faiss`, `hnsw`, `milvus:PATH_OR_URI`). An existing `output` is resumed
    (records already written are skipped) unless `overwrite`. `device`, `dtype` and `batch_tokens` (padded
    tokens per batch; None: each model's measured default) are passed to the embedder and the reranker.
    """
    from qembed.encode import CachedEncoder
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
    docs = open_corpus(corpus) if corpus is not None else beir_corpus or corpus_from_positives(records)
    on_disk = isinstance(docs, CorpusFile)
    doc_ids = docs.ids if on_disk else list(docs)
    output = Path(output)
    done = resume_point(output, records, overwrite)

    emb = model if isinstance(model, Embedder) else Embedder.from_pretrained(model, device=device, dtype=dtype)
    if reranker is not None and isinstance(reranker, (str, Path)):
        from qembed.models.reranker import Reranker

        reranker = Reranker.from_pretrained(reranker, device=device, dtype=dtype)
    try:
        options = {"dim": dim, "cache_dir": cache_dir, "batch_tokens": batch_tokens}
        encode_queries = CachedEncoder(emb, query_format=instruction, **options)
        encode_documents = CachedEncoder(emb, prompt=emb.document_prompt, **options)
    except (TypeError, ValueError) as exc:
        raise QembedError(str(exc)) from None

    # Corpus: streamed from its file (a large one is never held as text), encoded once (cached) into the index.
    t0 = time.perf_counter()
    row_hashes = np.empty(len(doc_ids), dtype=np.int64)

    def texts():
        for row, text in enumerate(docs.values()):
            row_hashes[row] = text_hash(text)
            yield text

    store = None
    try:
        for start, batch in encode_documents.iter_chunks(texts(), total=len(doc_ids), show_progress=show_progress,
                                                         desc="corpus"):  # fmt: skip
            if store is None:
                store = open_index(index, batch.shape[1], capacity=len(doc_ids))
            store.add(doc_ids[start : start + len(batch)], batch)
    except BaseException:
        if store is not None:
            store.close()  # drops a temporary Milvus collection
        raise
    corpus_s = time.perf_counter() - t0
    row_of = docs.rows if on_disk else {doc_id: row for row, doc_id in enumerate(doc_ids)}
    sorted_hashes = np.sort(row_hashes)

    todo = records[done:]
    missing_positive = 0

    def chunks():
        nonlocal missing_positive
        for begin in range(0, len(todo), chunk_size):
            part = todo[begin : begin + chunk_size]
            q = encode_queries([r.query for r in part])
            p = encode_documents([t for r in part for t in r.pos])
            inputs, offset = [], 0
            for i, rec in enumerate(part):
                pos_scores = p[offset : offset + len(rec.pos)] @ q[i]
                offset += len(rec.pos)
                hashes = frozenset(text_hash(t) for t in rec.pos)
                rows = frozenset(row_of[d] for d in rec.pos_ids or [] if d in row_of)
                if not rows and not _any_in(hashes, sorted_hashes):
                    missing_positive += 1
                inputs.append(QueryInput(float(pos_scores.max()), rows, hashes))
                rec.record["pos_scores"] = [round(float(s), 6) for s in pos_scores]
            yield QueryChunk(done + begin, q, inputs)

    guard = None
    if reranker is not None:

        def guard(batch: list[tuple[int, list[Negative]]]) -> list[list[bool]]:
            """One chunk's candidates, all queries together, scored as one stream of pairs."""
            pairs = [(records[number].query, docs[doc_ids[c.row]]) for number, cands in batch for c in cands]
            scores = iter(reranker.score_pairs(pairs, batch_tokens=batch_tokens, show_progress=False))
            return [[next(scores) <= reranker_max_score for _ in cands] for _, cands in batch]

    stats = MiningStats()
    counted = resume_stats(output, done, stats)  # the lines already written, and their rule counts
    t0 = time.perf_counter()
    with JsonlAppender(output, fsync=False) as out, JsonlAppender(stats_path(output), fsync=False) as counts, store:
        for chunk, selected in mine_chunks(store, chunks(), config, stats, row_hashes=row_hashes, guard=guard,
                                           total=len(todo), show_progress=show_progress):  # fmt: skip
            for i, negatives in enumerate(selected):
                record = dict(records[chunk.start + i].record)
                written = llm_negatives(record)  # kept in front (no corpus id, not scored here)
                record["neg"] = written + [docs[doc_ids[n.row]] for n in negatives]
                record["neg_ids"] = [None] * len(written) + [doc_ids[n.row] for n in negatives]
                record["neg_scores"] = [None] * len(written) + [round(n.score, 6) for n in negatives]
                if written:
                    record["meta"] = {**record["meta"], "neg_source": "llm+mined", "llm_negatives": len(written)}
                out.write(record)
            counted += len(selected)
            counts.write({"through": chunk.start + len(selected), "counted": counted,
                          "candidates": stats.candidates, "removed": dict(stats.removed)})  # fmt: skip
    summary = stats.summary(config)
    if counted < summary["queries"]:  # a kill between a chunk's lines and its counts: say what they cover
        summary["rule_counts_cover_queries"] = counted
    summary.update({
        "input": str(input), "output": str(output), "model": emb.name_or_path, "index": index,
        "corpus_size": len(doc_ids), "records": len(records), "skipped_already_written": done,
        "queries_this_run": len(todo),
        "queries_with_positive_not_in_corpus": missing_positive,
        "reranker": getattr(reranker, "name_or_path", None),
        "timings": {"corpus_encode_index_s": round(corpus_s, 3), "mining_s": round(time.perf_counter() - t0, 3),
                    "total_s": round(time.perf_counter() - started, 3)},
    })  # fmt: skip
    summary_path = output.with_name(output.stem + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return MiningResult(output, summary, summary_path)


def _any_in(values: frozenset[int], sorted_array: np.ndarray) -> bool:
    wanted = np.fromiter(values, dtype=np.int64, count=len(values))
    found = np.minimum(np.searchsorted(sorted_array, wanted), len(sorted_array) - 1)
    return bool(np.any(sorted_array[found] == wanted))


def resume_point(output: Path, records: list[PairRecord], overwrite: bool) -> int:
    """How many records `output` already holds (0 when absent or `overwrite`); checks they match the input."""
    if overwrite or not output.exists():
        if output.exists():
            output.unlink()
        return 0
    written = 0
    for written, line in enumerate(iter_jsonl(output, allow_truncated_tail=True), start=1):
        if written > len(records):
            raise QembedError(
                f"{output} has more lines than the input has records: pass overwrite to start afresh"
            )
        if line.get("query") != records[written - 1].query:
            raise QembedError(
                f"{output}:{written} is not a result of this input: pass overwrite to start afresh"
            )
    if written:
        log.warning("%s: resuming after %d record(s) already written", output, written)
    return written


def stats_path(output: Path) -> Path:
    """The file beside `output` holding the rule counts after each chunk (cumulative; `through`: output lines)."""
    return output.with_name(f".{output.name}.stats.jsonl")


def resume_stats(output: Path, done: int, stats: MiningStats) -> int:
    """Add the first `done` lines of `output` (written by an earlier run) to `stats`, with the rule counts its
    stats file holds for them; returns how many queries those counts cover (`done`, or fewer when a run was
    killed between writing a chunk's lines and its counts). Cuts the stats file back to `done` lines."""
    path = stats_path(output)
    if done == 0:
        path.unlink(missing_ok=True)
        return 0
    for number, record in enumerate(iter_jsonl(output, allow_truncated_tail=True), start=1):
        if number > done:
            break
        mined = [s for s in record.get("neg_scores") or [] if s is not None]  # LLM-written negatives have none
        stats.queries += 1
        stats.per_query[len(mined)] += 1
        stats.neg_scores.extend(float(s) for s in mined)
        if record.get("pos_scores"):
            stats.pos_scores.append(max(float(s) for s in record["pos_scores"]))
    kept = [c for c in iter_jsonl(path, allow_truncated_tail=True) if c.get("through", 0) <= done] if path.is_file() else []
    write_jsonl(path, kept)
    if not kept:
        return 0
    stats.candidates = int(kept[-1]["candidates"])
    stats.removed.update(kept[-1]["removed"])
    return int(kept[-1]["counted"])


def summary_lines(summary: dict) -> list[str]:
    """The summary as a few readable lines."""
    cfg = summary["config"]
    hist = ", ".join(f"{n}: {c}" for n, c in summary["negatives_per_query"].items())
    removed = ", ".join(f"{rule} {count}" for rule, count in summary["removed"].items())
    done = summary.get("skipped_already_written", 0)
    resumed = f" (resumed: {done} already written, {summary.get('queries_this_run', '?')} in this run)" if done else ""
    lines = [
        f"queries mined: {summary['queries']}{resumed}; corpus: {summary.get('corpus_size', '?')} documents",
        f"negatives: {summary['negatives']}; per query {{{hist}}}; "
        f"fewer than {cfg['num_negatives']}: {summary['queries_with_fewer_negatives']}",
        f"candidates in ranks [{cfg['range_min']}, {cfg['range_max']}): {summary['candidates_in_window']}; "
        f"removed: {removed}"
        + (f" (counted for {summary['rule_counts_cover_queries']} of the queries)"
           if "rule_counts_cover_queries" in summary else ""),
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
