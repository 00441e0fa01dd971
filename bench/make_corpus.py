"""A deterministic large corpus (and query set) made from the real texts in `../shared/data`, for the
corpus-scale benchmarks (`bench/bench_scale.py`).

How it is made: every real text — NFCorpus titles and abstracts, NFCorpus queries, the Chinese agriculture
QA questions, passages and answers, and both STS-B sentences — is split into sentences (at `.`, `?`, `!` before
whitespace, and after `。`, `？`, `！`, `；`), giving a pool of about 60K distinct sentences in English and Chinese. Document `i`
draws its language family (English or Chinese, by the two pools' sizes) and then 1 to 3 sentences from that
family (uniform count; sentences uniform at random) with a numpy generator seeded by `--seed`, and joins
them. The same arguments always give byte-identical files. Ids are `d0000000`, `d0000001`, ...

Queries (`--queries N`): NFCorpus queries, agriculture questions and STS-B sentences, drawn with the same
seed, with ids `q00000`, ...

    python bench/make_corpus.py --docs 1000000 --output /tmp/corpus-1m.jsonl --queries 2000
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+|(?<=[。？！；])")  # "0.484" and "15.3公斤" stay whole
_HAN = re.compile(r"[\u4e00-\u9fff]")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) >= 8]


def real_texts(shared: Path = SHARED) -> tuple[list[str], list[str]]:
    """(passage-like texts, query-like texts) from the shared data, in a fixed order."""
    passages, queries = [], []
    with (shared / "nfcorpus" / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            passages += [record.get("title", ""), record["text"]]
    with (shared / "nfcorpus" / "queries.jsonl").open(encoding="utf-8") as f:
        queries += [json.loads(line)["text"] for line in f]
    for name in ("rice_dqa_zh.json", "corn_dqa_zh.json"):
        for row in json.loads((shared / "agri-zh" / name).read_text(encoding="utf-8")):
            passages += [row["input"].strip("（）"), row["output"]]
            queries.append(row["instruction"])
    with gzip.open(shared / "stsb-en" / "stsbenchmark.tsv.gz", "rt", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7:
                passages += row[5:7]
                queries.append(row[5])
    return [p for p in passages if p], [q for q in queries if q]


def sentence_pools(passages: list[str]) -> tuple[list[str], list[str]]:
    """Distinct sentences, split into (English-like, Chinese) pools, in first-seen order."""
    seen: dict[str, None] = {}
    for text in passages:
        for sentence in _sentences(text):
            seen.setdefault(sentence, None)
    english = [s for s in seen if not _HAN.search(s)]
    chinese = [s for s in seen if _HAN.search(s)]
    return english, chinese


def write_corpus(path: Path, docs: int, seed: int = 0, shared: Path = SHARED) -> dict:
    """Write `docs` documents to `path` (JSONL `{"_id", "text"}`); returns facts about the pool."""
    passages, _ = real_texts(shared)
    english, chinese = sentence_pools(passages)
    rng = np.random.default_rng(seed)
    share_chinese = len(chinese) / (len(english) + len(chinese))
    chars = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    block = 100_000
    with path.open("w", encoding="utf-8") as out:
        for start in range(0, docs, block):
            n = min(block, docs - start)
            is_chinese = rng.random(n) < share_chinese
            counts = rng.integers(1, 4, size=n)
            picks = rng.random((n, 3))
            lines = []
            for i in range(n):
                pool = chinese if is_chinese[i] else english
                joiner = "" if is_chinese[i] else " "
                text = joiner.join(pool[int(p * len(pool))] for p in picks[i, : counts[i]])
                chars += len(text)
                lines.append(json.dumps({"_id": f"d{start + i:07d}", "text": text}, ensure_ascii=False))
            out.write("\n".join(lines) + "\n")
    return {"documents": docs, "english_sentences": len(english), "chinese_sentences": len(chinese),
            "mean_chars": round(chars / max(docs, 1), 1)}  # fmt: skip


def write_queries(path: Path, count: int, seed: int = 0, shared: Path = SHARED) -> None:
    """Write `count` real queries (JSONL `{"_id", "text"}`), drawn without replacement."""
    _, queries = real_texts(shared)
    queries = list(dict.fromkeys(queries))
    rng = np.random.default_rng(seed + 1)
    chosen = rng.choice(len(queries), size=min(count, len(queries)), replace=False)
    with path.open("w", encoding="utf-8") as out:
        for i, row in enumerate(chosen):
            out.write(json.dumps({"_id": f"q{i:05d}", "text": queries[int(row)]}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1_000_000, help="number of documents (default: 1000000)")
    parser.add_argument("--output", type=Path, required=True, help="corpus JSONL to write")
    parser.add_argument("--queries", type=int, default=0, help="also write N queries to OUTPUT.queries.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    facts = write_corpus(args.output, args.docs, args.seed)
    if args.queries:
        write_queries(args.output.with_suffix(".queries.jsonl"), args.queries, args.seed)
    print(json.dumps(facts), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
