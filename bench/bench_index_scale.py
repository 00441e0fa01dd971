"""IVF against exact search at corpus scale: recall@10 and queries/s on real all-MiniLM-L6-v2 (int8) vectors.

The corpus comes from `bench/make_corpus.py` (real sentences from `../shared/data`, recombined; deterministic),
the queries are that script's real queries (NFCorpus, agriculture questions, STS-B). Documents are embedded once
with qembed `quantize="int8"` and the vectors kept in `--cache` (reused by later runs with the same size and
seed; `--subset N` embeds and uses only the first N documents, and a later run continues the cache). Then, with qembed's FAISS index (`qembed.index.faiss_index.FaissIndex`, the index behind
`--index faiss:...`): an exact `Flat` index and `IVF<nlist>,Flat` (nlist ~ 4 sqrt(N) unless `--nlist`), trained
on a seeded sample; for each nprobe, recall@10 of the IVF answer against the exact one, and the queries/s of
both (`--time-queries` queries, `--batch-size` per search call: 1 = one request at a time as `qembed search`
and the server see them, a large batch = bulk search, where exact search is one matrix product; best of
`--repeats`, exact and IVF alternating), with the ratio.

    python bench/bench_index_scale.py --docs 100000 [--subset 30000] [--queries 2000] [--nprobe 1,2,4,8,16,32,64]
                                      [--batch-size 1] [--time-queries 200] [--threads 2]
    python bench/bench_index_scale.py --vectors-from /tmp/qembed-scale/full   # the 1M build of bench_scale.py

`--vectors-from INDEX` takes the document vectors of a folder `qembed index build` wrote with MiniLM int8 (a
FAISS Flat index, e.g. `bench/bench_scale.py --docs 1000000`'s `full` build) instead of embedding a corpus.

Target (issue 18, at 1M documents): recall@10 >= 0.95 at >= 10x the exact search's queries/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import cpu_flags_line, machine_line  # noqa: E402
from make_corpus import write_corpus, write_queries  # noqa: E402


def read_texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def embed_cached(texts: list[str], cache: Path, chunk: int = 4096) -> np.ndarray:
    """MiniLM int8 vectors of `texts`, appended chunk by chunk to `cache` (a raw float32 file), so that an
    interrupted run continues where it stopped."""
    from qembed import Embedder
    from qembed.testing import minilm_dir

    dim = 384
    done = cache.stat().st_size // (4 * dim) if cache.exists() else 0
    if done < len(texts):
        embedder = Embedder.from_pretrained(minilm_dir(), device="cpu", quantize="int8")
        start = time.perf_counter()
        tokens = 0
        with cache.open("ab") as out:
            out.truncate(done * 4 * dim)
            for begin in range(done, len(texts), chunk):
                part = texts[begin : begin + chunk]
                tokens += sum(len(ids) for ids in embedder.prepare(part))
                out.write(np.ascontiguousarray(embedder.encode(part), dtype=np.float32).tobytes())
                out.flush()
                seconds = time.perf_counter() - start
                print(f"  embedded {begin + len(part)}/{len(texts)}: {(begin + len(part) - done) / seconds:.0f} "
                      f"docs/s, {tokens / seconds:.0f} tokens/s", flush=True)  # fmt: skip
    return np.fromfile(cache, dtype=np.float32).reshape(-1, dim)[: len(texts)]


def queries_per_second(index, queries: np.ndarray, k: int, params, batch_size: int) -> float:
    start = time.perf_counter()
    index.search_rows(queries, k, params=params, batch_size=batch_size)
    return len(queries) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--vectors-from", type=Path, metavar="INDEX", help="document vectors of this index folder")
    parser.add_argument("--subset", type=int, help="use only the first N documents of the corpus (embedded first)")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--nlist", type=int, help="IVF lists (default: 4 sqrt(docs), rounded to a power of 2)")
    parser.add_argument("--nprobe", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="queries per search call while timing: 1 = one request at a time, as `qembed search` "
                             "and the server; 2000 = bulk (exact search becomes one matrix product)")
    parser.add_argument("--time-queries", type=int, default=200, help="queries timed (recall uses all of them)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "qembed-bench-index-scale")
    args = parser.parse_args()
    import faiss

    from qembed.index.base import SearchParams
    from qembed.index.faiss_index import FaissIndex

    faiss.omp_set_num_threads(args.threads)
    print(f"machine: {machine_line()}; faiss {faiss.__version__}, {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f} at start, {time.strftime('%H:%M')}\n{cpu_flags_line()}")  # fmt: skip
    args.cache.mkdir(parents=True, exist_ok=True)
    query_file = args.cache / f"queries-{args.queries}-s{args.seed}.jsonl"
    if not query_file.exists():
        write_queries(query_file, args.queries, args.seed)
    if args.vectors_from:
        from qembed.index import load_index

        flat = load_index(args.vectors_from / "vectors")._index
        docs = flat.reconstruct_n(0, flat.ntotal)[: args.subset or flat.ntotal]
        print(f"{len(docs)} document vectors from {args.vectors_from}; embedding {args.queries} queries (MiniLM int8)")
    else:
        print(f"embedding {args.docs} documents and {args.queries} queries (MiniLM int8; cached in {args.cache})")
        corpus = args.cache / f"corpus-{args.docs}-s{args.seed}.jsonl"
        if not corpus.exists():
            write_corpus(corpus.with_suffix(".tmp"), args.docs, args.seed)
            corpus.with_suffix(".tmp").rename(corpus)
        texts = read_texts(corpus)[: args.subset or args.docs]
        docs = embed_cached(texts, args.cache / f"docs-{args.docs}-s{args.seed}.f32")
    queries = embed_cached(read_texts(query_file), args.cache / f"queries-{args.queries}-s{args.seed}.f32")
    k = 10
    nlist = args.nlist or int(2 ** round(np.log2(4 * len(docs) ** 0.5)))
    exact = FaissIndex(docs.shape[1], factory="Flat", capacity=len(docs))
    exact.add(None, docs)
    start = time.perf_counter()
    ivf = FaissIndex(docs.shape[1], factory=f"IVF{nlist},Flat", seed=args.seed)
    ivf.add(None, docs)
    ivf.search_rows(queries[:1], k)  # trains on a seeded sample of the vectors added
    print(f"IVF{nlist},Flat trained on {ivf.train_size} vectors and filled in {time.perf_counter() - start:.1f} s")
    truth, _ = exact.search_rows(queries, k)
    print(f"\n{len(docs)} documents, {len(queries)} queries, k={k}; queries/s over {args.time_queries} queries, "
          f"{args.batch_size} per search call, best of {args.repeats}, alternating order")
    print(f"| index                     | recall@{k} | queries/s | vs exact |")
    rows = []
    for nprobe in [int(n) for n in args.nprobe.split(",") if int(n) <= nlist]:
        params = SearchParams(nprobe=nprobe)
        rows_ivf, _ = ivf.search_rows(queries, k, params=params)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(rows_ivf.tolist(), truth.tolist())]))
        exact_qps = ivf_qps = 0.0
        for turn in range(args.repeats):  # alternate which goes first
            pair = [("exact", exact, None), ("ivf", ivf, params)]
            for name, index, p in pair if turn % 2 == 0 else reversed(pair):
                qps = queries_per_second(index, queries[: args.time_queries], k, p, args.batch_size)
                if name == "exact":
                    exact_qps = max(exact_qps, qps)
                else:
                    ivf_qps = max(ivf_qps, qps)
        rows.append((nprobe, recall, ivf_qps, exact_qps))
        print(f"| IVF{nlist},Flat nprobe={nprobe:<4} | {recall:9.3f} | {ivf_qps:9.0f} | {ivf_qps / exact_qps:7.1f}x |"
              f"  (exact {exact_qps:.0f} q/s)", flush=True)  # fmt: skip
    good = [r for r in rows if r[1] >= 0.95]
    if good:
        nprobe, recall, ivf_qps, exact_qps = max(good, key=lambda r: r[2])
        print(f"fastest at recall@{k} >= 0.95: nprobe={nprobe}, recall {recall:.3f}, {ivf_qps / exact_qps:.1f}x exact")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
