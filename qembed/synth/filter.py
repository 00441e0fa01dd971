"""Quality filter for synthetic pairs: keep a (query, positive) pair when the embedder's cosine similarity
is above a threshold (the query encoded with the retrieval instruction), then drop exact and near-duplicate
queries, and report what was dropped and how the data's make-up changed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qembed.data.formats import iter_qembed_dicts
from qembed.data.jsonl import write_jsonl
from qembed.data.text import normalize_text
from qembed.errors import QembedError
from qembed.synth.parsing import detect_language, length_unit, text_length

REPORT_FIELDS = ("question_type", "difficulty", "language", "length")
_BUCKETS = {"words": (5, 10, 20, 40), "chars": (10, 20, 40, 80)}


def length_bucket(record: dict[str, Any]) -> str:
    query = record["query"]
    language = (record.get("meta") or {}).get("language") or detect_language(query)
    unit = length_unit(language)
    n = text_length(query, unit)
    low = 1
    for high in _BUCKETS[unit]:
        if n <= high:
            return f"{low}-{high} {unit}"
        low = high + 1
    return f"{low}+ {unit}"


def _profile(records: list[dict[str, Any]]) -> dict[str, Counter]:
    profile: dict[str, Counter] = {name: Counter() for name in REPORT_FIELDS}
    for record in records:
        meta = record.get("meta") or {}
        for name in REPORT_FIELDS[:-1]:
            profile[name][str(meta.get(name))] += 1
        profile["length"][length_bucket(record)] += 1
    return profile


@dataclass
class FilterReport:
    total: int
    kept: int
    threshold: float
    dropped: dict[str, int] = field(default_factory=dict)
    before: dict[str, Counter] = field(default_factory=dict)
    after: dict[str, Counter] = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"kept {self.kept} of {self.total} pairs (cosine > {self.threshold:g})"]
        for reason, count in self.dropped.items():
            lines.append(f"  dropped {count:>7}  {reason}")
        for name in REPORT_FIELDS:
            lines.append(f"{name + ':':<22}{'before':>14}{'after':>16}")
            keys = sorted(set(self.before.get(name, {})) | set(self.after.get(name, {})))
            for key in keys:
                b, a = self.before[name][key], self.after[name][key]
                pb = 100 * b / max(sum(self.before[name].values()), 1)
                pa = 100 * a / max(self.kept, 1)
                lines.append(f"  {key:<20}{b:>7} {pb:5.1f}%{a:>9} {pa:5.1f}%")
        return "\n".join(lines)


def filter_records(records: list[dict[str, Any]], embedder: Any, *, threshold: float = 0.7,
                   batch_tokens: int | None = None) -> tuple[list[dict[str, Any]], FilterReport]:  # fmt: skip
    """Kept records (each gets `meta.score`, the cosine) and the report. Records without a string `query`
    and a non-empty `pos` are dropped as `malformed`."""
    import numpy as np

    dropped: Counter = Counter()
    valid = []
    for record in records:
        pos = record.get("pos")
        if isinstance(record.get("query"), str) and record["query"].strip() and isinstance(pos, list) and pos \
                and isinstance(pos[0], str):  # fmt: skip
            valid.append(record)
        else:
            dropped["malformed"] += 1
    scores = np.zeros(len(valid), dtype=np.float32)
    if valid:
        options = {} if batch_tokens is None else {"batch_tokens": batch_tokens}  # None: the model's default
        q = embedder.encode_queries([r["query"] for r in valid], **options)
        d = embedder.encode_documents([r["pos"][0] for r in valid], **options)
        scores = np.einsum("ij,ij->i", np.asarray(q, dtype=np.float32), np.asarray(d, dtype=np.float32))
    kept: list[dict[str, Any]] = []
    seen_exact: set[str] = set()
    seen_norm: set[str] = set()
    for record, score in zip(valid, scores):
        if not score > threshold:
            dropped[f"cosine <= {threshold:g}"] += 1
            continue
        query = record["query"]
        norm = normalize_text(query)
        if query in seen_exact:
            dropped["duplicate query"] += 1
            continue
        if norm in seen_norm:
            dropped["near-duplicate query (same normalised text)"] += 1
            continue
        seen_exact.add(query)
        seen_norm.add(norm)
        record = {**record, "meta": {**(record.get("meta") or {}), "score": round(float(score), 4)}}
        kept.append(record)
    report = FilterReport(total=len(records), kept=len(kept), threshold=threshold, dropped=dict(dropped),
                          before=_profile(valid), after=_profile(kept))  # fmt: skip
    return kept, report


def filter_file(input_path: str | Path, output_path: str | Path, model: str, *, threshold: float = 0.7,
                device: str | None = None, dtype: str | None = None, batch_tokens: int | None = None) -> FilterReport:  # fmt: skip
    """Filter a synthetic-pairs JSONL file into `output_path` (written atomically) with embedding `model`."""
    from qembed.models.embedder import Embedder

    if not -1.0 <= threshold <= 1.0:
        raise QembedError(f"--threshold {threshold} is not a cosine similarity (between -1 and 1)")
    if Path(input_path).resolve() == Path(output_path).resolve():
        raise QembedError("--output must differ from --input")
    records = [record for _, record in iter_qembed_dicts(input_path, allow_truncated_tail=True)]
    embedder = Embedder.from_pretrained(model, device=device, dtype=dtype)
    kept, report = filter_records(records, embedder, threshold=threshold, batch_tokens=batch_tokens)
    write_jsonl(output_path, kept)
    return report
