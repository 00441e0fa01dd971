"""Reranking throughput: shared-prefix key/value reuse vs the plain path, on the Qwen3-Reranker-0.6B architecture.

One query (~30 tokens) and 100 documents (~150 tokens each, NFCorpus abstracts cut to length), random
weights, the real Qwen tokenizer. The plain path computes every (query, document) prompt in full; the prefix
path computes the shared part (system prompt, instruction, query) once and reuses its key/value cache.
Both run `--repeats` times in alternating order; best times count; scores must agree to 1e-4.

    python bench/bench_rerank.py [--model-dir DIR] [--repeats 2] [--docs 100] [--quantize int8]
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

from common import SHARED, machine_line  # noqa: E402

from qembed import Reranker  # noqa: E402
from qembed.testing import QWEN3_EMBEDDING_0_6B, build_qwen3_reranker  # noqa: E402

QWEN3_RERANKER_0_6B = QWEN3_EMBEDDING_0_6B  # same Qwen3-0.6B body; the reranker keeps the tied LM head


def cut(tokenizer, text: str, tokens: int) -> str:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens])


def workload(tokenizer, docs: int, query_tokens: int = 30, doc_tokens: int = 150) -> tuple[str, list[str]]:
    with (SHARED / "data/nfcorpus/queries.jsonl").open() as f:
        queries = [json.loads(line)["text"] for line in f]
    query = min(queries, key=lambda q: abs(len(tokenizer(q)["input_ids"]) - query_tokens))
    with (SHARED / "data/nfcorpus/corpus.jsonl").open() as f:
        texts = [(r["title"] + " " + r["text"]).strip() for r in map(json.loads, f)]
    long_enough = [t for t in texts if len(t) > 8 * doc_tokens][:docs]
    return query, [cut(tokenizer, t, doc_tokens) for t in long_enough]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "qembed-bench-qwen3-reranker-0.6b"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--quantize", choices=["int8"])
    args = parser.parse_args()

    model_dir = Path(args.model_dir)
    if not (model_dir / "model.safetensors").exists():
        print(f"building random-weight Qwen3-Reranker-0.6B architecture in {model_dir} ...", flush=True)
        build_qwen3_reranker(model_dir, **QWEN3_RERANKER_0_6B)
    reranker = Reranker.from_pretrained(model_dir, device="cpu", quantize=args.quantize)
    query, documents = workload(reranker.tokenizer, args.docs)
    token_ids = reranker.prepare_pairs(query, documents)
    total = sum(len(ids) for ids in token_ids)
    shared = next(i for i in range(len(token_ids[0])) if any(ids[i] != token_ids[0][i] for ids in token_ids))
    print(f"machine: {machine_line()}; load average {os.getloadavg()[0]:.1f}; quantize: {args.quantize}")
    print(f"query: {len(reranker.tokenizer(query)['input_ids'])} tokens, {len(documents)} documents; prompts "
          f"{total} tokens in all, {shared} of each shared (system prompt + instruction + query)")  # fmt: skip

    def plain() -> list[float]:
        reranker._score_shared_prefix = lambda *a, **k: None  # the plain path: every prompt in full
        try:
            return reranker.score(query, documents)
        finally:
            del reranker._score_shared_prefix

    def reused() -> list[float]:
        return reranker.score(query, documents)

    best = {"plain": float("inf"), "prefix reuse": float("inf")}
    scores = {}
    for repeat in range(args.repeats):
        order = [("plain", plain), ("prefix reuse", reused)]
        for name, fn in order if repeat % 2 == 0 else reversed(order):
            start = time.perf_counter()
            scores[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    diff = max(abs(a - b) for a, b in zip(scores["plain"], scores["prefix reuse"]))
    for name, seconds in best.items():
        print(f"{name:>13}: {seconds:6.1f} s  {len(documents) / seconds:6.1f} documents/s")
    print(f"speed-up of prefix reuse: {best['plain'] / best['prefix reuse']:.2f}x; max |score difference| {diff:.2e}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
