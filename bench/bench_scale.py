"""`qembed index build` at corpus scale: throughput, memory beyond the vectors, and a kill at ~50 % resumed.

A deterministic corpus from `bench/make_corpus.py` (real sentences from ../shared/data recombined) is indexed
with all-MiniLM-L6-v2 (`--quantize int8` by default) through the CLI, each build a process of its own with an
embedding cache of its own:

1. a small build (`--baseline-docs`) for the process's fixed memory (Python, torch, OpenVINO, the model);
2. the full build, uninterrupted: documents/s, tokens/s (the model's tokenizer, its max length), peak RSS
   (`wait4`'s ru_maxrss), and peak RSS minus the vectors' bytes (FAISS Flat: 4 bytes x dim per document) and
   minus the baseline's peak: the memory that grows with the corpus, per document; and the resident set
   sampled at every progress line, whose rise from 25 % of the corpus to its end, per document, is the growth
   without the one-off costs of the first documents (the flat index reserves all vectors up front);
3. the same build killed (SIGKILL) once its progress passes `--kill-at`, then the same command again: how
   many documents the rerun encodes beyond those the killed run had not reached (its last progress line),
   and whether the result is byte-equal to the uninterrupted build (docs.jsonl, offsets, ids; vectors 1e-6).

    python bench/bench_scale.py --docs 100000 [--quantize int8|none] [--kill-at 0.5 | --no-kill] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_flags_line, resident_bytes  # noqa: E402

PROGRESS = re.compile(r"qembed: index: (\d+)/(\d+)")


def build_command(model: str, corpus: Path, output: Path, cache: Path, quantize: str | None) -> list[str]:
    command = [sys.executable, "-m", "qembed", "index", "build", "--model", model, "--corpus", str(corpus),
               "--output", str(output), "--cache-dir", str(cache)]  # fmt: skip
    return command + (["--quantize", quantize] if quantize else [])


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "QEMBED_PROGRESS_INTERVAL": "2", "PYTHONPATH": str(ROOT)}


def run_build(command: list[str], kill_at: float | None = None) -> dict:
    """Run one build; returns wall seconds, peak RSS (bytes), stdout, and the last progress position (and
    whether it was killed there)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    done = total = 0
    killed = False
    rss: list[tuple[int, int]] = []  # (documents done, resident bytes) at each progress line
    for line in proc.stderr:
        found = PROGRESS.search(line)
        if found:
            done, total = int(found.group(1)), int(found.group(2))
            rss.append((done, resident_bytes(proc.pid)))
            if kill_at is not None and done >= kill_at * total:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read()
    if not killed and proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}): {' '.join(command)}")
    return {"seconds": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024, "stdout": out,
            "progress": done, "killed": killed, "rss": rss}  # fmt: skip


def growth_per_document(rss: list[tuple[int, int]], total: int, start: float = 0.25) -> float:
    """Bytes of resident memory added per document from `start` of the corpus to its last progress line. The
    flat index reserves (and zero-fills) all vectors before the first document, so this is growth besides
    them: what the corpus size adds, without the one-off costs of the first documents."""
    points = [(done, size) for done, size in rss if size and done >= start * total]
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return float("nan")
    (first_done, first_size), (last_done, last_size) = points[0], points[-1]
    return (last_size - first_size) / (last_done - first_done)


def count_tokens(model: str, corpus: Path) -> int:
    from qembed.data.corpus import iter_corpus
    from qembed.models.embedder import Embedder

    embedder = Embedder.from_pretrained(model)
    texts = (doc.text for doc in iter_corpus(corpus))
    total = 0
    while chunk := list(islice(texts, 4096)):  # streamed: the corpus is never held whole
        total += sum(len(ids) for ids in embedder.prepare(chunk))
    return total


def same_index(a: Path, b: Path) -> bool:
    from qembed.index import load_index

    for name in ("docs.jsonl", "docs.offsets.npy", "vectors/ids.bin"):
        if (a / name).read_bytes() != (b / name).read_bytes():
            return False
    va, vb = (load_index(x / "vectors")._index for x in (a, b))
    return va.ntotal == vb.ntotal and np.allclose(va.reconstruct_n(0, va.ntotal), vb.reconstruct_n(0, vb.ntotal),
                                                   rtol=0, atol=1e-6)  # fmt: skip


def main() -> None:
    from qembed.testing import minilm_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--baseline-docs", type=int, default=2_000)
    parser.add_argument("--quantize", default="int8", help="int8 (default) or none")
    parser.add_argument("--kill-at", type=float, default=0.5)
    parser.add_argument("--no-kill", action="store_true", help="the uninterrupted build only (memory, throughput)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qembed-scale"))
    args = parser.parse_args()
    quantize = None if args.quantize == "none" else args.quantize
    model = str(minilm_dir())
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(cpu_flags_line())
    corpora = {}
    for name, docs in (("baseline", args.baseline_docs), ("corpus", args.docs)):
        corpora[name] = work / f"{name}-{docs}.jsonl"
        if not corpora[name].is_file():
            subprocess.run([sys.executable, str(ROOT / "bench/make_corpus.py"), "--docs", str(docs), "--output",
                            str(corpora[name])], check=True)  # fmt: skip
    for name in ("baseline", "full", "killed"):  # fresh folders and caches: nothing cached from a last run
        subprocess.run(["rm", "-rf", str(work / name), str(work / f"cache-{name}")], check=True)

    tokens = count_tokens(model, corpora["corpus"])
    base = run_build(build_command(model, corpora["baseline"], work / "baseline", work / "cache-baseline", quantize))
    full = run_build(build_command(model, corpora["corpus"], work / "full", work / "cache-full", quantize))
    vector_bytes = args.docs * 384 * 4
    growth = full["peak_rss"] - base["peak_rss"] - (vector_bytes - args.baseline_docs * 384 * 4)
    print(f"model all-MiniLM-L6-v2, quantize {quantize or 'none'}; corpus {args.docs} documents, {tokens} tokens "
          f"({tokens / args.docs:.1f} per document)")  # fmt: skip
    print(f"uninterrupted build: {full['seconds']:.0f} s wall, {args.docs / full['seconds']:.0f} documents/s, "
          f"{tokens / full['seconds']:.0f} tokens/s (model load and corpus check included)")  # fmt: skip
    print(f"peak RSS {full['peak_rss'] / 2**20:.0f} MiB; minus vectors ({vector_bytes / 2**20:.0f} MiB): "
          f"{(full['peak_rss'] - vector_bytes) / 2**20:.0f} MiB; baseline process ({args.baseline_docs} documents) "
          f"{base['peak_rss'] / 2**20:.0f} MiB; growth beyond vectors and baseline: {growth / 2**20:.1f} MiB = "
          f"{growth / (args.docs - args.baseline_docs):.1f} bytes/document")  # fmt: skip
    quarters = [next((size for done, size in full["rss"] if size and done >= q * args.docs / 4), 0) for q in (1, 2, 3, 4)]
    print("resident at 25/50/75/100 % of the documents: " + ", ".join(f"{size / 2**20:.0f} MiB" for size in quarters)
          + f"; growth from 25 % to the end: {growth_per_document(full['rss'], args.docs):.1f} bytes/document")  # fmt: skip
    if args.no_kill:
        return
    command = build_command(model, corpora["corpus"], work / "killed", work / "cache-killed", quantize)
    killed = run_build(command, kill_at=args.kill_at)
    rerun = run_build(command)
    found = re.search(r"(\d+) encoded, (\d+) from the cache", rerun["stdout"])
    encoded, cached = int(found.group(1)), int(found.group(2))
    beyond = encoded - (args.docs - killed["progress"])
    print(f"killed at {killed['progress']}/{args.docs} documents after {killed['seconds']:.0f} s; the rerun "
          f"({rerun['seconds']:.0f} s) encoded {encoded} and took {cached} from the cache: {beyond} encoded again "
          f"beyond the killed run's last progress line")  # fmt: skip
    print(f"rerun equals the uninterrupted build: {same_index(work / 'killed', work / 'full')}")


if __name__ == "__main__":
    main()
