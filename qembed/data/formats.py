"""Training-pair formats of other trainers, read and written as qembed records (`qembed.data.pairs`).

Formats (what a row holds):

- `qembed`: `{"query", "pos", "neg"?, "instruction"?, ...}` (`qembed.data.pairs`).
- `swift`: ms-swift's embedding format (`swift sft --task_type embedding`, InfoNCE): `messages` (the anchor: an
  optional `system` message, the instruction, and one `user` message, the query), `positive_messages` and
  `negative_messages` (lists of message lists; ms-swift takes exactly one positive per row). Keys ms-swift does
  not use are carried as they are.
- `st`: sentence-transformers columns `anchor`, `positive`, `negative_1` .. `negative_n` (or `negative`). A query's
  instruction is written into the anchor in the Qwen3 template (`Instruct: ...\\nQuery:...`, what a
  sentence-transformers Qwen3 prompt gives) and read back from it; other fields cannot be carried (sentence-
  transformers feeds every column to the loss), so they are left out.

Containers, any format: JSONL (`.jsonl`, `.json`), Parquet (`.parquet`) or a `datasets` folder (`save_to_disk`;
Parquet and folders need the `datasets` extra). Rows of swift and st hold one positive each: a qembed record with
several positives becomes one row per positive (fields aligned with `pos`, `pos_ids` and `pos_scores`, are split
with it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qembed.data.jsonl import iter_numbered_jsonl, write_jsonl
from qembed.errors import QembedError
from qembed.files import claim_output_dir, is_owned, mark_owned, remove_owned_dir
from qembed.models.prompts import format_query, instruction_from_prompt, split_query

if TYPE_CHECKING:
    from qembed.data.pairs import PairRecord

log = logging.getLogger(__name__)

FORMATS = ("qembed", "swift", "st")
CORE_FIELDS = ("query", "pos", "neg", "instruction")
POS_ALIGNED = ("pos_ids", "pos_scores")  # one value per positive: split with `pos`
SWIFT_KEYS = ("messages", "positive_messages", "negative_messages")
SWIFT_MEDIA = ("images", "videos", "audios")
_MEDIA_KEYS = {name for key in SWIFT_MEDIA for name in (key, f"positive_{key}", f"negative_{key}")}
CONVERT_VERB = "data convert"


# ------------------------------------------------------------------------------------------------ containers
def container(path: str | Path) -> str:
    """"jsonl", "parquet" or "datasets" (a folder saved with `datasets.Dataset.save_to_disk`)."""
    path = Path(path)
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".json", ".ndjson") or path.is_file():
        return "jsonl"
    return "datasets"


def iter_rows(path: str | Path, *, allow_truncated_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(row number from 1, row)` of a JSONL file (line numbers), a Parquet file or a `datasets` folder."""
    path = Path(path)
    kind = container(path)
    if kind == "jsonl":
        yield from iter_numbered_jsonl(path, allow_truncated_tail=allow_truncated_tail)
    elif kind == "parquet":
        if not path.is_file():
            raise QembedError(f"file not found: {path}")
        yield from iter_parquet_rows(path)
    else:
        yield from enumerate(map(_without_nulls, _load_dataset_folder(path)), start=1)


def iter_parquet_rows(source) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(row number from 1, row)` of a Parquet file: a path or an open random-access file (e.g. one that Ray
    Data opened on shared storage), streamed a batch at a time, nulls dropped (as `iter_rows` gives them)."""
    pq = _require("pyarrow.parquet", "Parquet")
    rows = (row for batch in pq.ParquetFile(source).iter_batches(batch_size=1024) for row in batch.to_pylist())
    yield from enumerate(map(_without_nulls, rows), start=1)


class ParquetRows:
    """Random access to the rows of a Parquet file (`rows[i]`, 0-based, as `iter_rows` gives them): reads the
    row group holding a row and keeps the last one read, so rows read in order cost one pass."""

    def __init__(self, path: str | Path) -> None:
        import numpy as np

        pq = _require("pyarrow.parquet", "Parquet")
        self._file = pq.ParquetFile(path)
        sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._ends = np.cumsum(sizes)
        self._group, self._rows = -1, []

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np

        group = int(np.searchsorted(self._ends, index, side="right"))
        if group != self._group:
            self._group, self._rows = group, self._file.read_row_group(group).to_pylist()
        start = int(self._ends[group - 1]) if group else 0
        return _without_nulls(self._rows[index - start])


def _without_nulls(value: Any) -> Any:
    """A columnar row as the record it was written from: a column (or struct field) a record lacked reads back
    as null, so nulls are dropped from objects (a null and a missing field are the same in these containers)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _load_dataset_folder(path: Path):
    datasets = _require("datasets", "a datasets folder")
    if not path.is_dir():
        raise QembedError(f"not found: {path} (give a .jsonl or .parquet file, or a folder saved with save_to_disk)")
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise QembedError(f"{path} holds several splits ({', '.join(splits)}): give one, e.g. {path / splits[0]}")
    if not (path / "state.json").is_file():
        raise QembedError(f"{path} is not a folder saved with datasets' save_to_disk (no state.json)")
    return datasets.load_from_disk(str(path))


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows as JSONL (atomically), Parquet (atomically) or a `datasets` folder, by `path`'s name: `.jsonl`
    / `.json`, `.parquet`, anything else a folder (new, empty, or one this verb wrote before)."""
    path = Path(path)
    kind = output_container(path)
    if kind == "jsonl":
        write_jsonl(path, rows)
        return
    if kind == "parquet":
        pa = _require("pyarrow", "Parquet")
        pq = _require("pyarrow.parquet", "Parquet")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            pq.write_table(pa.Table.from_pydict(_columns(rows)), tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    datasets = _require("datasets", "a datasets folder")
    claim_output_dir(path, CONVERT_VERB)  # refuses a folder that is not ours before anything is written
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    remove_owned_dir(tmp, CONVERT_VERB)
    datasets.Dataset.from_dict(_columns(rows)).save_to_disk(str(tmp))
    mark_owned(tmp, CONVERT_VERB)
    remove_owned_dir(path, CONVERT_VERB)
    tmp.rename(path)


def output_container(path: str | Path) -> str:
    """The container `write_rows` writes to `path`: "jsonl", "parquet" or "datasets"."""
    path = Path(path)
    return "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else container(path)


def check_output(path: str | Path) -> None:
    """One-line error, before any reading, when `write_rows` would refuse `path`: a folder (a `datasets` output)
    that holds files this verb did not write, or a folder where a file is to be written."""
    path = Path(path)
    if output_container(path) == "datasets":
        if path.is_dir() and any(path.iterdir()) and not is_owned(path, CONVERT_VERB):
            raise QembedError(f"--output {path} is not empty and is not the output of an earlier `qembed "
                              f"{CONVERT_VERB}`: choose a new or empty folder")  # fmt: skip
    elif path.is_dir():
        raise QembedError(f"--output {path} is a folder: give a file name ending in .jsonl or .parquet")


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Rows as columns over the union of their keys (a row without a key gets null there): pyarrow and datasets
    would otherwise take the columns of the first row only."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: [row.get(key) for row in rows] for key in keys}


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise QembedError(f"reading or writing {what} needs the datasets extra: pip install 'qembed[datasets]'") from None


# --------------------------------------------------------------------------------------------- detection
def detect_format(row: dict[str, Any]) -> str:
    """The format a row is in, from its keys: `messages` (swift), `anchor` (st), else qembed."""
    if "messages" in row:
        return "swift"
    return "st" if "anchor" in row else "qembed"


def iter_qembed_dicts(path: str | Path, format: str | None = None, *,
                      allow_truncated_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:  # fmt: skip
    """`(row number, qembed record dict)` of a file in any format (`None`: detected from the first row); the
    records are not validated here (`qembed.data.pairs.parse_pair` does that)."""
    if format is not None and format not in FORMATS:
        raise QembedError(f"unknown format {format!r}: choose {', '.join(FORMATS)}")
    for number, row in iter_rows(path, allow_truncated_tail=allow_truncated_tail):
        where = f"{path}:{number}"
        format = format or detect_format(row)
        yield number, to_qembed(row, format, where)


def to_qembed(row: dict[str, Any], format: str, where: str) -> dict[str, Any]:
    """A row of `format` as a qembed record dict."""
    if format == "qembed":
        return row
    if format == "swift":
        return _from_swift(row, where)
    return _from_st(row, where)


# ------------------------------------------------------------------------------------------------- swift
def _from_swift(row: dict[str, Any], where: str) -> dict[str, Any]:
    for name in sorted(_MEDIA_KEYS):
        if row.get(name):
            raise QembedError(f"{where}: '{name}': multimodal records are not supported (text only)")
    label = row.get("label")
    if label is not None and label != 1:
        raise QembedError(f"{where}: 'label' {label!r}: ms-swift cosine/contrastive-loss data, not (query, positive) "
                          "pairs; qembed reads the InfoNCE format (no label, or label 1)")  # fmt: skip
    system, query = _turns(row.get("messages"), f"{where}: 'messages'")
    if not isinstance(row.get("positive_messages"), list) or not row["positive_messages"]:
        raise QembedError(f"{where}: 'positive_messages' must be a non-empty list of message lists")
    pos = [_document(m, f"{where}: 'positive_messages'[{i}]") for i, m in enumerate(row["positive_messages"])]
    negatives = row.get("negative_messages") or []
    if not isinstance(negatives, list):
        raise QembedError(f"{where}: 'negative_messages' must be a list of message lists")
    neg = [_document(m, f"{where}: 'negative_messages'[{i}]") for i, m in enumerate(negatives)]
    record: dict[str, Any] = {"query": query, "pos": pos}
    if neg:
        record["neg"] = neg
    if system:
        record["instruction"] = instruction_from_prompt(system) or system  # a Qwen3-template system: its instruction
    record.update({key: value for key, value in row.items() if key not in SWIFT_KEYS and key not in _MEDIA_KEYS})
    return record


def _turns(messages: Any, where: str) -> tuple[str | None, str]:
    """(system content or None, user content) of a message list with at most one system and exactly one user turn."""
    if not isinstance(messages, list) or not messages:
        raise QembedError(f"{where} must be a non-empty list of {{'role', 'content'}} messages")
    system, user = None, None
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise QembedError(f"{where}: every message needs a 'role' and a string 'content'")
        role = message.get("role")
        if role == "system" and system is None:
            system = message["content"]
        elif role == "user" and user is None:
            user = message["content"]
        else:
            raise QembedError(f"{where}: expected an optional system message and one user message, got a "
                              f"{role!r} message more (multi-turn records are not supported)")  # fmt: skip
    if user is None:
        raise QembedError(f"{where}: no user message")
    return system, user


def _document(messages: Any, where: str) -> str:
    system, text = _turns(messages, where)
    return f"{system} {text}" if system else text  # what ms-swift's template encodes


def _to_swift(record: PairRecord) -> list[dict[str, Any]]:
    rows = []
    for index, positive in enumerate(record.pos):
        row: dict[str, Any] = {
            "messages": ([{"role": "system", "content": record.instruction}] if record.instruction else [])
            + [{"role": "user", "content": record.query}],
            "positive_messages": [[{"role": "user", "content": positive}]],
        }  # fmt: skip
        if record.neg:
            row["negative_messages"] = [[{"role": "user", "content": n}] for n in record.neg]
        row.update(_extra(record, index))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- st
def _negative_columns(row: dict[str, Any]) -> list[str]:
    numbered = sorted((k for k in row if k.startswith("negative_") and k[9:].isdigit()), key=lambda k: int(k[9:]))
    return (["negative"] if "negative" in row else []) + numbered


def _from_st(row: dict[str, Any], where: str) -> dict[str, Any]:
    anchor, positive = row.get("anchor"), row.get("positive")
    if not isinstance(anchor, str) or not isinstance(positive, str):
        raise QembedError(f"{where}: 'anchor' and 'positive' must be strings (sentence-transformers columns)")
    negatives = _negative_columns(row)
    neg = [row[k] for k in negatives if row[k] is not None and row[k] != ""]
    if not all(isinstance(n, str) for n in neg):
        raise QembedError(f"{where}: negative columns must hold strings")
    query, instruction = split_query(anchor)
    record: dict[str, Any] = {"query": query, "pos": [positive]}
    if neg:
        record["neg"] = neg
    if instruction:
        record["instruction"] = instruction
    record.update({k: v for k, v in row.items() if k not in ("anchor", "positive", *negatives)})
    return record


def _to_st(record: PairRecord, negatives: int) -> list[dict[str, Any]]:
    anchor = format_query(record.query, record.instruction)
    padded = list(record.neg) + [None] * (negatives - len(record.neg))
    return [{"anchor": anchor, "positive": positive, **{f"negative_{i + 1}": n for i, n in enumerate(padded)}}
            for positive in record.pos]  # fmt: skip


def _extra(record: PairRecord, index: int) -> dict[str, Any]:
    """The record's fields other than the four of the schema; pos-aligned lists cut to the `index`th positive."""
    extra = {}
    for key, value in record.record.items():
        if key in CORE_FIELDS:
            continue
        if key in POS_ALIGNED and isinstance(value, list) and len(value) == len(record.pos):
            value = [value[index]]
        extra[key] = value
    return extra


# ----------------------------------------------------------------------------------------------- convert
def to_rows(records: Iterable[PairRecord], format: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows of `format` for qembed records, and notes on what changed: records split into one row per positive
    (`split`), fields left out (`dropped:<field>`)."""
    records = list(records)
    notes: dict[str, int] = {}
    if format == "qembed":
        return [_qembed_dict(r) for r in records], notes
    if format == "swift":
        rows = [row for r in records for row in _to_swift(r)]
    elif format == "st":
        negatives = max((len(r.neg) for r in records), default=0)
        rows = [row for r in records for row in _to_st(r, negatives)]
        for r in records:
            for key in r.record:
                if key not in CORE_FIELDS:
                    notes[f"dropped:{key}"] = notes.get(f"dropped:{key}", 0) + 1
        uneven = sum(len(r.neg) != negatives for r in records)
        if uneven:
            notes["fewer_negatives"] = uneven
    else:
        raise QembedError(f"unknown format {format!r}: choose {', '.join(FORMATS)}")
    split = sum(len(r.pos) > 1 for r in records)
    if split:
        notes["split"] = split
    return rows, notes


def _qembed_dict(record: PairRecord) -> dict[str, Any]:
    out = dict(record.record)
    out.update(query=record.query, pos=list(record.pos))
    if record.neg:
        out["neg"] = list(record.neg)
    if record.instruction:
        out["instruction"] = record.instruction
    return out


def note_lines(notes: dict[str, int], to_format: str) -> list[str]:
    """What a conversion could not carry, as readable lines."""
    lines = []
    if notes.get("split"):
        lines.append(f"{notes['split']} record(s) with several positives became one {to_format} row per positive")
    dropped = sorted(k.split(":", 1)[1] for k in notes if k.startswith("dropped:"))
    if dropped:
        lines.append(f"left out (sentence-transformers columns are all model inputs): {', '.join(dropped)}")
    if notes.get("fewer_negatives"):
        lines.append(f"{notes['fewer_negatives']} row(s) have fewer negatives than the most: their last negative_N "
                     "columns are empty (sentence-transformers losses need the same number in every row)")  # fmt: skip
    return lines
