"""Search benchmark: exact (FAISS flat) and HNSW inner-product search over random normalised vectors.

    python bench/bench_search.py                      # exact: 100,000 queries x 1,000,000 docs, 1024-d; HNSW: 100,000 docs
    python bench/bench_search.py --docs 100000 --queries 10000 --exact-sample 0   # smaller, every query timed

The corpus is generated batch by batch straight into the index (no second copy), and queries are searched
in chunks, so memory is the index plus one chunk of scores. Exact search of 100k x 1M x 1024 is ~2e14
multiply-adds; on a small machine time a sample of the queries (`--exact-sample`) and the script
extrapolates the queries/s to the full set, saying so. Each phase runs in its own process so its peak RSS
is its own. HNSW recall@10 is measured against exact top-10 computed by a streaming pass over the corpus.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def unit_batch(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def corpus_batches(n: int, dim: int, seed: int, batch: int = 50_000):
    """The same corpus every time, generated batch by batch (each batch has its own seed)."""
    for i, start in enumerate(range(0, n, batch)):
        yield start, unit_batch(np.random.default_rng([seed, i]), min(batch, n - start), dim)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def build(index, args) -> float:
    t0 = time.perf_counter()
    for start, x in corpus_batches(args.docs, args.dim, args.seed):
        index.add([str(start + i) for i in range(len(x))], x)
        print(f"  added {start + len(x):>9,} / {args.docs:,}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return time.perf_counter() - t0


def queries(args, n: int) -> np.ndarray:
    return unit_batch(np.random.default_rng([args.seed, 10**6]), n, args.dim)


def exact_topk(q: np.ndarray, args, k: int) -> np.ndarray:
    """Exact top-k rows by a streaming pass over the regenerated corpus (no index held)."""
    import faiss

    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    for start, x in corpus_batches(args.docs, args.dim, args.seed):
        scores, rows = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, rows + start)
    heap.finalize()
    return heap.I


def phase_exact(args) -> dict:
    from qembed.index import open_index

    index = open_index("faiss", args.dim, capacity=args.docs)
    build_s = build(index, args)
    sampled = 0 < args.exact_sample < args.queries
    n = args.exact_sample if sampled else args.queries
    q = queries(args, n)
    t0 = time.perf_counter()
    index.search_rows(q, args.k, batch_size=args.batch, show_progress=True)
    search_s = time.perf_counter() - t0
    return {
        "phase": "exact", "docs": args.docs, "dim": args.dim, "queries_timed": n, "queries_total": args.queries,
        "sampled": sampled, "build_s": build_s, "search_s": search_s, "qps": n / search_s,
        "est_total_search_s": args.queries * search_s / n, "peak_rss_gib": peak_rss_gib(),
        "corpus_gib": args.docs * args.dim * 4 / 2**30,
    }  # fmt: skip


def phase_hnsw(args) -> dict:
    from qembed.index import open_index

    ef_values = [int(v) for v in str(args.ef_search).split(",")]
    spec = f"hnsw:m={args.m},ef_construction={args.ef_construction},ef_search={ef_values[0]}"
    index = open_index(spec, args.dim)
    build_s = build(index, args)
    n = min(args.hnsw_sample, args.queries) if args.hnsw_sample > 0 else args.queries
    q = queries(args, n)
    n_check = min(n, args.recall_queries)
    truth = exact_topk(q[:n_check], args, args.k)
    runs = []
    for ef in ef_values:  # one graph, several search-time settings
        index.ef_search = ef
        t0 = time.perf_counter()
        rows, _ = index.search_rows(q, args.k, batch_size=args.batch, show_progress=True)
        search_s = time.perf_counter() - t0
        recall = float(np.mean([len(set(rows[i]) & set(truth[i])) / args.k for i in range(n_check)]))
        runs.append({"ef_search": ef, "search_s": search_s, "qps": n / search_s, f"recall@{args.k}": recall})
    return {
        "phase": "hnsw", "docs": args.docs, "dim": args.dim, "m": args.m, "ef_construction": args.ef_construction,
        "queries_timed": n, "build_s": build_s, "runs": runs, "recall_queries": n_check,
        "peak_rss_gib": peak_rss_gib(),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=4096, help="queries per search chunk")
    p.add_argument(
        "--exact-sample", type=int, default=2000, help="time exact search on this many queries (0: all)"
    )
    p.add_argument(
        "--hnsw-docs",
        type=int,
        default=100_000,
        help="corpus size for HNSW (building it on 1M x 1024-d takes hours on 2 cores)",
    )
    p.add_argument("--hnsw-sample", type=int, default=5000, help="HNSW queries timed (0: all)")
    p.add_argument("--recall-queries", type=int, default=1000, help="HNSW queries checked against exact")
    p.add_argument("--m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=100)
    p.add_argument("--ef-search", default="128", help="efSearch, or a comma list to compare on one graph")
    p.add_argument("--phase", choices=["all", "exact", "hnsw"], default="all")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.phase != "all":
        if args.phase == "hnsw" and args.hnsw_docs:
            args.docs = min(args.docs, args.hnsw_docs)
        result = phase_exact(args) if args.phase == "exact" else phase_hnsw(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)
    results = []
    for phase in ("exact", "hnsw"):
        print(f"== {phase}", flush=True)
        cmd = [sys.executable, *sys.argv, "--phase", phase]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        print(out, end="")
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    exact, hnsw = results
    print("\n== summary")
    tag = f" (sample of {exact['queries_timed']:,}; extrapolated)" if exact["sampled"] else ""
    print(f"exact  {exact['docs']:,} x {exact['dim']}-d: build {exact['build_s']:.0f} s, {exact['qps']:,.0f} queries/s"
          f"{tag}, {exact['queries_total']:,} queries ~ {exact['est_total_search_s'] / 60:.1f} min, "
          f"peak RSS {exact['peak_rss_gib']:.2f} GiB (vectors {exact['corpus_gib']:.2f} GiB)")  # fmt: skip
    for run in hnsw["runs"]:
        print(f"hnsw   {hnsw['docs']:,} x {hnsw['dim']}-d, M={hnsw['m']} efC={hnsw['ef_construction']} "
              f"efS={run['ef_search']}: build {hnsw['build_s']:.0f} s, {run['qps']:,.0f} queries/s "
              f"({hnsw['queries_timed']:,} timed), recall@{args.k} {run[f'recall@{args.k}']:.3f} "
              f"({hnsw['recall_queries']:,} queries vs exact), peak RSS {hnsw['peak_rss_gib']:.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
