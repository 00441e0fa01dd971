"""The Ray Data engine against the single process on the same cores: equal vectors, overhead ratio.

A deterministic corpus from `bench/make_corpus.py` (real sentences from ../shared/data recombined) is encoded
with all-MiniLM-L6-v2 (or the Qwen3 architecture with random weights, `--model qwen3-tiny`) twice:

- one process: `Embedder.encode` on all the machine's cores (`torch.set_num_threads(N)`), model load included;
- Ray: a local cluster with N CPUs (started before timing), `qembed.ray_engine.encode_corpus` with N CPU
  actors of one thread each, each loading the model (included), reading the corpus as Ray Data blocks and
  streaming the vectors back to the driver.

On one machine Ray cannot be faster than the single process (the same cores do the same work); the ratio is
the engine's overhead: actor start-up, per-batch scheduling, moving vectors through the object store. What
scales is the number of actors: N GPUs, or the CPUs of many machines (see docs/ray.md). Each variant runs
`--repeats` times, alternating the order, and its best time counts. The largest difference between the two
engines' vectors (by text) is printed.

    python bench/bench_ray.py [--docs 20000] [--actors 2] [--batch-size 1024] [--repeats 2] [--model minilm]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import machine_line  # noqa: E402
from make_corpus import write_corpus  # noqa: E402


def cpu_flags() -> str:
    """The CPU's vector extensions that matter for inference."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return "cpu flags: unknown"
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]
    present = [f for f in wanted if f in flags]
    return "cpu flags: " + (" ".join(present) if present else "none of avx2/avx512/amx")


def model_path(name: str, workdir: Path) -> str:
    from qembed.testing import build_qwen3_embedding, minilm_dir

    if name == "minilm":
        return str(minilm_dir())
    if name == "qwen3-tiny":
        return str(build_qwen3_embedding(workdir / "qwen3-tiny", seed=0))
    raise SystemExit(f"unknown --model {name!r}: minilm or qwen3-tiny")


def run_single(model: str, texts: list[str], threads: int) -> tuple[float, dict[bytes, np.ndarray]]:
    import torch

    from qembed import Embedder
    from qembed.cache import text_key

    torch.set_num_threads(threads)
    start = time.perf_counter()
    embedder = Embedder.from_pretrained(model, device="cpu")
    vectors = embedder.encode(texts, prompt=embedder.document_prompt, normalize=False, show_progress=False)
    seconds = time.perf_counter() - start
    return seconds, {text_key(t): v for t, v in zip(texts, vectors)}


def run_ray(model: str, corpus: Path, actors: int, batch_size: int) -> tuple[float, dict[bytes, np.ndarray]]:
    import torch

    from qembed import Embedder
    from qembed.ray_engine import RayOptions, encode_corpus

    driver = Embedder.from_pretrained(model, device="cpu")  # the driver's copy: cache identity, prompt
    torch.set_num_threads(1)
    start = time.perf_counter()
    found: dict[bytes, np.ndarray] = {}
    for block in encode_corpus(driver, corpus, prompt=driver.document_prompt,
                               options=RayOptions(actors=actors, batch_size=batch_size), show_progress=False):  # fmt: skip
        found.update(zip(block.key_list(), block.vectors))
    return time.perf_counter() - start, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=20000, help="corpus size (default: 20000)")
    parser.add_argument("--model", default="minilm", help="minilm (the real all-MiniLM-L6-v2) or qwen3-tiny")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors = CPUs used by both engines (default: 2)")
    parser.add_argument("--batch-size", type=int, default=1024, help="texts per Ray actor call (default: 1024)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each engine, alternating (default: 2)")
    args = parser.parse_args(argv)

    import ray

    from qembed.data.corpus import iter_corpus

    workdir = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    corpus = workdir / "corpus.jsonl"
    write_corpus(corpus, args.docs)
    texts = [doc.text for doc in iter_corpus(corpus)]
    model = model_path(args.model, workdir)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = time.perf_counter()
    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - started:.1f} s (not counted)")
    best = {"single": float("inf"), "ray": float("inf")}
    vectors: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for engine in (["single", "ray"] if repeat % 2 == 0 else ["ray", "single"]):
            if engine == "single":
                seconds, found = run_single(model, texts, args.actors)
            else:
                seconds, found = run_ray(model, corpus, args.actors, args.batch_size)
            best[engine] = min(best[engine], seconds)
            vectors[engine] = found
            print(f"  run {repeat + 1} {engine}: {seconds:.1f} s ({len(texts) / seconds:.0f} docs/s)", flush=True)
    ray.shutdown()
    single, on_ray = vectors["single"], vectors["ray"]
    assert set(single) == set(on_ray), "the engines encoded different texts"
    keys = list(single)
    diff = float(np.abs(np.stack([single[k] for k in keys]) - np.stack([on_ray[k] for k in keys])).max())
    print(f"\n{machine_line()} (at the end of the run); {cpu_flags()}")
    print(f"model {args.model}, {len(texts)} documents ({len(keys)} distinct), {args.actors} CPUs, "
          f"Ray batch {args.batch_size}, best of {args.repeats} (model loads included)")  # fmt: skip
    print(f"  single process ({args.actors} threads): {best['single']:.1f} s, {len(texts) / best['single']:.0f} docs/s")
    print(f"  Ray ({args.actors} actors x 1 thread): {best['ray']:.1f} s, {len(texts) / best['ray']:.0f} docs/s")
    print(f"  Ray / single process: {best['ray'] / best['single']:.2f}x time (overhead {best['ray'] / best['single'] - 1:+.0%})")
    print(f"  largest |difference| of the unnormalised vectors: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
