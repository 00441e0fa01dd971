"""Mining benchmark: hard negatives for random queries against a corpus of random normalised vectors,
through the same index and selection code `qembed mine` runs after encoding (`qembed.negatives.mine_chunks`).

    python bench/bench_mine.py                                # 100,000 queries x 1,000,000 docs, 384-d
    python bench/bench_mine.py --sample 5000                  # time 5,000 of them and extrapolate

Encoding is excluded. The corpus is generated batch by batch straight into the exact FAISS index (storage
reserved up front, no second copy); queries go through in chunks, so peak memory is the corpus vectors plus
a fixed overhead, whatever the number of queries. Each query gets a known positive row (checked, rarely in
its window on random data) and a positive vector at a varied distance, whose score drives the margin rule.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from qembed.index import open_index  # noqa: E402
from qembed.mine import summary_lines  # noqa: E402
from qembed.negatives import MiningConfig, MiningStats, QueryChunk, QueryInput, mine_chunks  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--sample", type=int, default=0, help="mine only this many of the queries and extrapolate")
    p.add_argument("--chunk-size", type=int, default=1024, help="queries searched at a time (as qembed mine)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    corpus_gib = args.docs * args.dim * 4 / 2**30
    base = peak_rss_gib()
    t0 = time.perf_counter()
    index = open_index("faiss", args.dim, capacity=args.docs)
    for start in range(0, args.docs, 50_000):
        n = min(50_000, args.docs - start)
        index.add(
            [str(i) for i in range(start, start + n)],
            unit(rng.standard_normal((n, args.dim), dtype=np.float32)),
        )
    row_hashes = rng.integers(
        -(2**63), 2**63 - 1, size=args.docs, dtype=np.int64
    )  # as the text hashes mine keeps
    build_s = time.perf_counter() - t0
    print(f"corpus {args.docs:,} x {args.dim}-d ({corpus_gib:.2f} GiB) indexed in {build_s:.0f} s; "
          f"peak RSS so far {peak_rss_gib():.2f} GiB", flush=True)  # fmt: skip

    n_queries = args.sample if 0 < args.sample < args.queries else args.queries

    def chunks():
        for start in range(0, n_queries, args.chunk_size):
            n = min(args.chunk_size, n_queries - start)
            pos = unit(rng.standard_normal((n, args.dim), dtype=np.float32))
            # noise of varied strength: positive scores spread from ~0.2 to ~0.9, so the margin rule bites sometimes
            noise = rng.uniform(0.5, 5.0, size=(n, 1)).astype(np.float32)
            q = unit(pos + noise * unit(rng.standard_normal((n, args.dim), dtype=np.float32)))
            pos_scores = np.einsum("ij,ij->i", q, pos)
            rows = rng.integers(0, args.docs, size=n)
            yield QueryChunk(
                start, q, [QueryInput(float(s), frozenset({int(r)})) for s, r in zip(pos_scores, rows)]
            )

    config = MiningConfig(num_negatives=5)  # the recorded run: ranks [20, 50), 5 negatives, max 0.8, margin 0.1, top
    stats = MiningStats()
    t0 = time.perf_counter()
    written = 0
    for _, selected in mine_chunks(index, chunks(), config, stats, row_hashes=row_hashes, total=n_queries):
        written += sum(len(s) for s in selected)
    mine_s = time.perf_counter() - t0
    qps = n_queries / mine_s
    peak = peak_rss_gib()
    print("\n".join(summary_lines({**stats.summary(config), "corpus_size": args.docs})))
    sampled = (
        f" (sample of {n_queries:,}; {args.queries:,} queries extrapolated)"
        if n_queries < args.queries
        else ""
    )
    print(f"mining: {n_queries:,} queries in {mine_s:.0f} s = {qps:,.1f} queries/s{sampled}; "
          f"{args.queries:,} queries ~ {args.queries / qps / 60:.1f} min (+ {build_s:.0f} s indexing)")  # fmt: skip
    print(f"peak RSS {peak:.2f} GiB = corpus vectors {corpus_gib:.2f} GiB + {peak - corpus_gib:.2f} GiB "
          f"(interpreter and libraries at start: {base:.2f} GiB); limit 2 x corpus + overhead = "
          f"{2 * corpus_gib:.2f} GiB + overhead")  # fmt: skip


if __name__ == "__main__":
    main()
