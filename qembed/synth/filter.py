"""Quality filter for synthetic pairs: keep a (query, positive) pair when the embedder's cosine similarity
is above a threshold (the query encoded with its record's instruction, else the model's retrieval
instruction), drop exact and near-duplicate queries, optionally balance a field's shares, drop LLM-written
negatives that score above their positive, and report what was dropped and how the data's make-up changed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qembed.data.formats import iter_qembed_dicts
from qembed.data.jsonl import write_jsonl
from qembed.data.pairs import llm_negatives
from qembed.data.text import normalize_text
from qembed.errors import QembedError
from qembed.synth.balance import BalanceSpec, balance_records, check_balance, field_value
from qembed.synth.parsing import detect_language, length_unit, text_length
from qembed.synth.personas import cosine_encode_options

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


def _profile(records: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> dict[str, Counter]:
    profile: dict[str, Counter] = {name: Counter() for name in (*REPORT_FIELDS, *extra)}
    for record in records:
        meta = record.get("meta") or {}
        for name in REPORT_FIELDS[:-1]:
            profile[name][str(meta.get(name))] += 1
        profile["length"][length_bucket(record)] += 1
        for path in extra:
            profile[path][field_value(record, path)] += 1
    return profile


@dataclass
class FilterReport:
    total: int
    kept: int
    threshold: float
    dropped: dict[str, int] = field(default_factory=dict)
    before: dict[str, Counter] = field(default_factory=dict)
    after: dict[str, Counter] = field(default_factory=dict)
    llm_negatives: int = 0  # LLM-written negatives of the kept records, before the check
    llm_negatives_dropped: int = 0  # of those, scored above their record's positive
    balance: str | None = None  # the --balance spec, described

    def format(self) -> str:
        lines = [f"kept {self.kept} of {self.total} pairs (cosine > {self.threshold:g})"]
        for reason, count in self.dropped.items():
            lines.append(f"  dropped {count:>7}  {reason}")
        if self.llm_negatives:
            lines.append(f"LLM negatives: dropped {self.llm_negatives_dropped} of {self.llm_negatives} "
                         "(scored above their positive)")  # fmt: skip
        for name in self.before:
            lines.append(f"{name + ':':<22}{'before':>14}{'after':>16}")
            keys = sorted(set(self.before.get(name, {})) | set(self.after.get(name, {})))
            for key in keys:
                b, a = self.before[name][key], self.after[name][key]
                pb = 100 * b / max(sum(self.before[name].values()), 1)
                pa = 100 * a / max(self.kept, 1)
                lines.append(f"  {key:<20}{b:>7} {pb:5.1f}%{a:>9} {pa:5.1f}%")
        return "\n".join(lines)


def _query_vectors(records: list[dict[str, Any]], embedder: Any, options: dict[str, Any]):
    """Queries encoded with their record's `instruction` (grouped by it), else the model's own."""
    import numpy as np

    from qembed.encode import encode_texts
    from qembed.models.prompts import MODEL_DEFAULT

    groups: dict[str | None, list[int]] = {}
    for i, record in enumerate(records):
        instruction = record.get("instruction")
        groups.setdefault(instruction if isinstance(instruction, str) and instruction else None, []).append(i)
    vectors = None
    for instruction, rows in groups.items():
        encoded = encode_texts(embedder, [records[i]["query"] for i in rows],
                               instruction=MODEL_DEFAULT if instruction is None else instruction, **options)
        if vectors is None:
            vectors = np.zeros((len(records), encoded.shape[1]), dtype=np.float32)
        vectors[rows] = encoded
    return vectors


def _encode_pairs(records: list[dict[str, Any]], embedder: Any, options: dict[str, Any]):
    """(query vectors, cosine of each query with its first positive)."""
    import numpy as np

    from qembed.encode import encode_texts

    q = _query_vectors(records, embedder, options)
    d = encode_texts(embedder, [r["pos"][0] for r in records], prompt=embedder.document_prompt, **options)
    return q, np.einsum("ij,ij->i", q, d)


def pair_scores(records: list[dict[str, Any]], embedder: Any, *, batch_tokens: int | None = None):
    """The filter's cosine(query, first positive) of each record (as `meta.score` would be)."""
    import numpy as np

    if not records:
        return np.zeros(0, dtype=np.float32)
    return _encode_pairs(records, embedder, cosine_encode_options(batch_tokens))[1]


def drop_llm_negatives_above_positive(records: list[dict[str, Any]], query_vectors: Any, pos_scores: Any,
                                      embedder: Any, options: dict[str, Any]) -> tuple[list[dict[str, Any]], int, int]:  # fmt: skip
    """Each record without its LLM-written negatives (`qembed.data.pairs.llm_negatives`) that the embedder
    scores above the record's positive (they probably answer the query); returns (records, negatives
    checked, negatives dropped). Other negatives are kept as they are."""
    import numpy as np

    owners = [(i, text) for i, r in enumerate(records) for text in llm_negatives(r)]
    if not owners:
        return records, 0, 0
    from qembed.encode import encode_texts

    vectors = encode_texts(embedder, [text for _, text in owners], prompt=embedder.document_prompt, **options)
    scores = np.einsum("ij,ij->i", query_vectors[[i for i, _ in owners]], vectors)
    above: dict[int, set[int]] = {}
    position: dict[int, int] = {}
    for (i, _), score in zip(owners, scores):
        j = position.get(i, 0)
        position[i] = j + 1
        if score > pos_scores[i]:
            above.setdefault(i, set()).add(j)
    out = []
    for i, record in enumerate(records):
        if i in above:
            meta = dict(record["meta"])
            written = meta.get("llm_negatives", len(record["neg"]))
            neg = [n for j, n in enumerate(record["neg"]) if j not in above[i]]
            meta["llm_negatives"] = written - len(above[i])
            record = {**record, "neg": neg, "meta": meta}
            if "neg_ids" in record and isinstance(record["neg_ids"], list):
                record["neg_ids"] = [x for j, x in enumerate(record["neg_ids"]) if j not in above[i]]
        out.append(record)
    return out, len(owners), sum(len(v) for v in above.values())


def filter_records(records: list[dict[str, Any]], embedder: Any, *, threshold: float = 0.7,
                   batch_tokens: int | None = None, balance: BalanceSpec | None = None,
                   seed: int = 0) -> tuple[list[dict[str, Any]], FilterReport]:  # fmt: skip
    """Kept records (each gets `meta.score`, the cosine) and the report. Records without a string `query`
    and a non-empty `pos` are dropped as `malformed`. With `balance`, the kept records are then downsampled
    to the asked shares of a field (`qembed.synth.balance`, seeded by `seed`). Last, LLM-written negatives
    scored above their record's positive are removed."""
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
    options = cosine_encode_options(batch_tokens)
    scores = np.zeros(len(valid), dtype=np.float32)
    q = None
    if valid:
        q, scores = _encode_pairs(valid, embedder, options)
    kept: list[dict[str, Any]] = []
    rows: list[int] = []
    seen_exact: set[str] = set()
    seen_norm: set[str] = set()
    for row, (record, score) in enumerate(zip(valid, scores)):
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
        rows.append(row)
    if balance is not None and kept:
        chosen = {id(r) for r in balance_records(kept, balance, seed=seed)}
        if len(chosen) < len(kept):
            dropped[f"balance {balance.describe()}"] = len(kept) - len(chosen)
        rows = [row for row, r in zip(rows, kept) if id(r) in chosen]
        kept = [r for r in kept if id(r) in chosen]
    checked = removed = 0
    if kept:
        kept, checked, removed = drop_llm_negatives_above_positive(kept, q[rows], scores[rows], embedder, options)
    extra = (balance.field,) if balance is not None and balance.field not in REPORT_FIELDS else ()
    report = FilterReport(total=len(records), kept=len(kept), threshold=threshold, dropped=dict(dropped),
                          before=_profile(valid, extra), after=_profile(kept, extra), llm_negatives=checked,
                          llm_negatives_dropped=removed, balance=balance.describe() if balance else None)  # fmt: skip
    return kept, report


def filter_file(input_path: str | Path, output_path: str | Path, model: str, *, threshold: float = 0.7,
                device: str | None = None, dtype: str | None = None, batch_tokens: int | None = None,
                balance: BalanceSpec | None = None, seed: int = 0) -> FilterReport:  # fmt: skip
    """Filter a synthetic-pairs JSONL file into `output_path` (written atomically) with embedding `model`."""
    from qembed.models.embedder import Embedder

    if not -1.0 <= threshold <= 1.0:
        raise QembedError(f"--threshold {threshold} is not a cosine similarity (between -1 and 1)")
    if Path(input_path).resolve() == Path(output_path).resolve():
        raise QembedError("--output must differ from --input")
    records = [record for _, record in iter_qembed_dicts(input_path, allow_truncated_tail=True)]
    if balance is not None:
        check_balance(records, balance)
    embedder = Embedder.from_pretrained(model, device=device, dtype=dtype)
    kept, report = filter_records(records, embedder, threshold=threshold, batch_tokens=batch_tokens,
                                  balance=balance, seed=seed)  # fmt: skip
    write_jsonl(output_path, kept)
    return report
