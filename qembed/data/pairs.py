"""Training pairs: the one record schema of `train`, `mine` and `filter` output, validated in one place.

A record is `{"query": str, "pos": str | [str, ...], "neg"?: str | [str, ...], "instruction"?: str,
"pos_ids"?: [id, ...]}` (`pos_ids` as long as `pos`); other fields are kept as they are. Files of other
trainers' formats (ms-swift, sentence-transformers; JSONL, Parquet or a `datasets` folder) are read through
`qembed.data.formats`, which turns their rows into such records.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qembed.data.formats import FORMATS, check_output, iter_qembed_dicts, to_rows, write_rows
from qembed.errors import QembedError


@dataclass
class PairRecord:
    """A training record, checked: query, positives, negatives, optional instruction and positive ids,
    and `record`, the row as read with every field (kept when written back)."""

    query: str
    pos: list[str]
    neg: list[str] = field(default_factory=list)
    instruction: str | None = None
    pos_ids: list[str] | None = None
    record: dict[str, Any] = field(default_factory=dict)  # the record as read, every field


def parse_pair(raw: dict[str, Any], where: str) -> PairRecord:
    """One record, checked; a bad one raises `QembedError` starting with `where` (e.g. `file:line`)."""
    query = raw.get("query")
    if not isinstance(query, str) or not query.strip():
        raise QembedError(f"{where}: 'query' must be a non-empty string")
    pos = _strings(raw.get("pos"), "pos", where)
    if not pos:
        raise QembedError(f"{where}: 'pos' must be a non-empty list of strings")
    neg = _strings(raw.get("neg") or [], "neg", where)
    instruction = raw.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise QembedError(f"{where}: 'instruction' must be a string")
    pos_ids = raw.get("pos_ids")
    if pos_ids is not None:
        if not isinstance(pos_ids, list) or len(pos_ids) != len(pos):
            raise QembedError(f"{where}: 'pos_ids' must be a list as long as 'pos'")
        pos_ids = [str(i) for i in pos_ids]
    return PairRecord(query, pos, neg, instruction or None, pos_ids, raw)


def iter_pairs(path: str | Path, format: str | None = None) -> Iterator[tuple[int, PairRecord]]:
    """`(line or row number, record)` for every record of a pairs file, streamed: qembed JSONL, or any format
    and container of `qembed.data.formats` (`format` None: detected from the first row)."""
    for number, raw in iter_qembed_dicts(path, format):
        yield number, parse_pair(raw, f"{path}:{number}")


def read_pairs(path: str | Path, format: str | None = None) -> list[PairRecord]:
    """Every record of a pairs file (see `iter_pairs`); an empty file raises `QembedError`."""
    records = [record for _, record in iter_pairs(path, format)]
    if not records:
        raise QembedError(f"{path}: no training records (the file is empty)")
    return records


def _strings(value: Any, name: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QembedError(f"{where}: '{name}' must be a list of strings")
    return value


def llm_negatives(record: dict[str, Any]) -> list[str]:
    """The negatives an LLM wrote for a record (`qembed synth --llm-negatives`): the first
    `meta.llm_negatives` of `neg` (all of them when that count is absent) when `meta.neg_source` is `llm`,
    or `llm+mined` after `qembed mine` added mined ones behind them."""
    meta = record.get("meta")
    if not isinstance(meta, dict) or meta.get("neg_source") not in ("llm", "llm+mined"):
        return []
    neg = record.get("neg") or []
    neg = [neg] if isinstance(neg, str) else [n for n in neg if isinstance(n, str)]
    count = meta.get("llm_negatives")
    return neg[:count] if isinstance(count, int) and count >= 0 else neg


def convert(input: str | Path, output: str | Path, *, from_format: str | None, to_format: str) -> tuple[int, int, dict[str, int]]:
    """Convert a pairs file between formats (and containers); returns (records read, rows written, notes)."""
    if to_format not in FORMATS:
        raise QembedError(f"unknown format {to_format!r}: choose {', '.join(FORMATS)}")
    if Path(input).resolve() == Path(output).resolve():
        raise QembedError("--output must differ from --input")
    check_output(output)
    records = read_pairs(input, format=from_format)
    rows, notes = to_rows(records, to_format)
    write_rows(output, rows)
    return len(records), len(rows), notes
