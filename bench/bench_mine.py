"""Mining benchmark: hard negatives for random queries against a corpus of random normalised vectors,
through the same index and selection code `qembed mine` runs after encoding (`qembed.negatives.mine_chunks`).

    python bench/bench_mine.py                                # 100,000 queries x 1,000,000 docs, 384-d
    python bench/bench_mine.py --sample 5000                  # time 5,000 of them and extrapolate
    python bench/bench_mine.py --corpus-gib 1                 # `mine_hard_negatives` on a 1 GiB corpus.jsonl

Encoding is excluded. The corpus is generated batch by batch straight into the exact FAISS index (storage
reserved up front, no second copy); queries go through in chunks, so peak memory is the corpus vectors plus
a fixed overhead, whatever the number of queries. Each query gets a known positive row (checked, rarely in
its window on random data) and a positive vector at a varied distance, whose score drives the margin rule.

`--corpus-gib N` runs the whole of `qembed.mine_hard_negatives` instead, loading included: it writes an
N GiB BEIR `corpus.jsonl` of random words and `--queries` training pairs under /tmp, then mines in a child
process (whose peak RSS is reported), once with the corpus on disk (the default above 1 GiB: ids and byte
offsets in memory) and once forced in memory (the text held, as before), for the ratio. The encoder is
all-MiniLM-L6-v2 loaded as usual with `encode` replaced by a hashing vectoriser (64-d, from blake2b of the
text): encoding 1 GiB with any transformer takes hours on a CPU, and what it uses does not grow with the
corpus, while everything else (reading, the embedding cache, the index, text hashes, negatives read
back from disk, resuming) is the real path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
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


WORK = Path("/tmp/qembed-bench-mine")


def write_corpus(gib: float, queries: int, seed: int) -> tuple[Path, Path]:
    """A BEIR `corpus.jsonl` of about `gib` GiB (documents of ~1 KB of random words) and training pairs
    whose positives are corpus documents (query = a few of the document's words)."""
    corpus, pairs = WORK / "corpus.jsonl", WORK / "pairs.jsonl"
    target = int(gib * 2**30)
    if corpus.is_file() and abs(corpus.stat().st_size - target) < 2**20 and pairs.is_file():
        return corpus, pairs
    WORK.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=n)) for n in rng.integers(3, 10, 20_000)])
    size, n, chosen = 0, 0, []
    every = max(1, int(target / 1100 / queries))
    with corpus.open("w", encoding="utf-8") as f:
        while size < target:
            words = vocab[rng.integers(0, len(vocab), size=(1000, 150))]
            for row in words:
                record = {"_id": f"doc{n}", "title": " ".join(row[:5]), "text": " ".join(row[5:])}
                line = json.dumps(record) + "\n"
                f.write(line)
                size += len(line)
                if n % every == 0 and len(chosen) < queries:
                    chosen.append({"query": " ".join(row[7:15]), "pos": [f"{record['title']} {record['text']}"],
                                   "pos_ids": [record["_id"]]})  # fmt: skip
                n += 1
    with pairs.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in chosen)
    return corpus, pairs


def hashing_encode(texts, *, dim=None, **_) -> np.ndarray:
    """64-d unit vectors from each text's blake2b digest: a stand-in encoder that costs ~nothing."""
    raw = np.frombuffer(b"".join(hashlib.blake2b(t.encode(), digest_size=64).digest() for t in texts), dtype=np.int8)
    return unit(raw.reshape(len(texts), 64).astype(np.float32))


def mine_child(corpus: str, pairs: str, output: str, in_memory: bool) -> None:
    """Run in a child process: the real `mine_hard_negatives`, loading included; prints one JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qembed import Embedder
    from qembed.data import corpus as corpus_module
    from qembed.mine import mine_hard_negatives
    from qembed.testing import minilm_dir

    if in_memory:
        corpus_module.IN_MEMORY_MAX_BYTES = 1 << 60
    emb = Embedder.from_pretrained(minilm_dir(), device="cpu")
    emb.encode = hashing_encode
    base = peak_rss_gib()
    t0 = time.perf_counter()
    result = mine_hard_negatives(emb, pairs, output, corpus=corpus, cache_dir=Path(output).parent / "cache",
                                 overwrite=True, show_progress=False)  # fmt: skip
    print("RESULT " + json.dumps({"peak_rss_gib": peak_rss_gib(), "start_rss_gib": base, "s": time.perf_counter() - t0,
                                  "summary": result.summary}))  # fmt: skip


def end_to_end(args) -> None:
    t0 = time.perf_counter()
    corpus, pairs = write_corpus(args.corpus_gib, args.queries, args.seed)
    size = corpus.stat().st_size
    print(f"corpus {corpus}: {size / 2**30:.2f} GiB; {sum(1 for _ in pairs.open()):,} pairs "
          f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    results = {}
    for mode in ("disk", "memory"):
        run_dir = WORK / mode
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        run_dir.mkdir(parents=True)
        cmd = [sys.executable, __file__, "--child", str(corpus), str(pairs), str(run_dir / "mined.jsonl"), mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        r = results[mode]
        t = r["summary"]["timings"]
        print(f"corpus {mode:6s}: peak RSS {r['peak_rss_gib']:.2f} GiB (model and libraries loaded: "
              f"{r['start_rss_gib']:.2f} GiB); {r['summary']['corpus_size']:,} documents, "
              f"{r['summary']['queries']:,} queries; total {t['total_s']:.0f} s (corpus read + encode + index "
              f"{t['corpus_encode_index_s']:.0f} s, mining {t['mining_s']:.0f} s)", flush=True)  # fmt: skip
    ratio = results["disk"]["peak_rss_gib"] / results["memory"]["peak_rss_gib"]
    print(f"peak RSS on disk / in memory = {ratio:.2f}")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        corpus, pairs, output, mode = sys.argv[2:6]
        return mine_child(corpus, pairs, output, in_memory=mode == "memory")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--sample", type=int, default=0, help="mine only this many of the queries and extrapolate")
    p.add_argument("--chunk-size", type=int, default=1024, help="queries searched at a time (as qembed mine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-gib", type=float, default=0,
                   help="end to end on a generated corpus.jsonl of this size (with --queries pairs, default 2000)")
    args = p.parse_args()
    if args.corpus_gib:
        if args.queries == p.get_default("queries"):
            args.queries = 2000
        return end_to_end(args)

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
