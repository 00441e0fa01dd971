"""Throughput of `qembed synth` (both stages) against the scripted OpenAI-compatible server with an
artificial per-request latency, as a real LLM server would have. Prints documents/s end to end.

    python bench/bench_synth.py --docs 1000 --concurrency 32 --latency 0.2

The server runs in a subprocess (tests/llm_server.py) on the same machine. Documents are the first
`--docs` passages of ../shared/data/nfcorpus. Persona candidates: `--personas fixed` gives every document
the same 5 personas (no embedder: the pure client figure); `--personas minilm` retrieves the top-5 of the
built-in 352-persona library per document with all-MiniLM-L6-v2, inside the timed run.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qembed.data.corpus import Document, read_corpus  # noqa: E402
from qembed.synth.generate import SynthConfig, synthesize  # noqa: E402
from qembed.synth.llm import OpenAIChat, RetryPolicy  # noqa: E402
from qembed.synth.personas import PersonaMatcher, load_personas  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server waits per request")
    parser.add_argument("--personas", choices=["fixed", "minilm"], default="fixed")
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "nfcorpus" / "corpus.jsonl"))
    args = parser.parse_args()

    docs = [Document(*item) for item in read_corpus(args.corpus, limit=args.docs).items()]
    library = load_personas()
    setup = time.perf_counter()
    if args.personas == "fixed":
        matcher = PersonaMatcher(library[:5])
    else:
        from qembed import Embedder
        from qembed.testing import minilm_dir

        matcher = PersonaMatcher(library, Embedder.from_pretrained(str(minilm_dir()), device="cpu"))
    setup = time.perf_counter() - setup

    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "llm_server.py"), "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        base_url = server.stdout.readline().strip()
        llm = OpenAIChat(base_url, "scripted", concurrency=args.concurrency, timeout=30,
                         retry=RetryPolicy(max_retries=2, backoff_base=0.1))  # fmt: skip
        config = SynthConfig(languages=["en", "zh"], concurrency=args.concurrency)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        with tempfile.TemporaryDirectory() as tmp:
            stats = synthesize(docs, Path(tmp) / "out.jsonl", llm, matcher=matcher, config=config, show_progress=False)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        server.terminate()
        server.wait()
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    rate = stats.done / stats.seconds
    print(f"documents: {len(docs)}  done: {stats.done}  failed: {stats.failed}  cores: {os.cpu_count()}")
    print(f"server latency: {args.latency * 1000:.0f} ms/request, 2 requests/document, concurrency {args.concurrency}")
    print(f"personas: {args.personas}" + (f" (library of {len(library)} embedded in {setup:.1f}s, not timed)"
                                          if args.personas == "minilm" else " (5 given, no embedder)"))  # fmt: skip
    print(f"end to end: {stats.seconds:.1f}s -> {rate:.1f} documents/s "
          f"(ideal at this latency: {args.concurrency / (2 * args.latency):.0f}/s)")  # fmt: skip
    print(f"client CPU: {client_cpu:.1f}s = {1000 * client_cpu / max(len(docs), 1):.1f} ms/document; "
          f"machine load average at the end: {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
