"""The labels file of `qembed review`: a header line and the sampled items (drawn once, seeded, stratified
by task and question type), then one appended line per event — a label (`relevant`, `not_relevant`,
`skip`) by a named reviewer, or an undo of one. Events carry an id, so a resent event is counted once;
`fold` turns the events into each reviewer's current labels."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qembed.data.jsonl import JsonlAppender, iter_jsonl
from qembed.errors import QembedError
from qembed.files import atomic_open

FORMAT = "qembed-review-v1"
LABELS = ("relevant", "not_relevant", "skip")
STRATA = ("task", "question_type")
LLM_PREFIX = "llm:"  # reviewer names of LLM judges


def pair_key(record: dict[str, Any]) -> str:
    """The identity of a (query, positive) pair across the raw and the filtered file."""
    text = f"{record['query']}\x00{record['pos'][0]}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _valid(record: dict[str, Any]) -> bool:
    pos = record.get("pos")
    return isinstance(record.get("query"), str) and isinstance(pos, list) and bool(pos) and isinstance(pos[0], str)


def stratified_sample(records: list[dict[str, Any]], fraction: float, seed: int) -> list[int]:
    """Indices of a seeded sample: in each (task, question type) stratum `max(1, round(fraction * size))`
    records, then all of them in one seeded shuffle (the order reviewers see)."""
    strata: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        meta = record.get("meta") or {}
        strata[tuple(str(meta.get(name)) for name in STRATA)].append(i)  # type: ignore[index]
    picked: list[int] = []
    for key in sorted(strata):
        members = strata[key]
        count = min(len(members), max(1, round(fraction * len(members))))
        picked += random.Random(f"{seed}|sample|{'|'.join(key)}").sample(members, count)
    picked.sort()
    random.Random(f"{seed}|order").shuffle(picked)
    return picked


def _item(record: dict[str, Any], item_id: str, cosine: float | None, kept: bool | None) -> dict[str, Any]:
    meta = record.get("meta") or {}
    return {"type": "item", "id": item_id, "key": pair_key(record), "query": record["query"],
            "instruction": record.get("instruction"), "passage": record["pos"][0],
            "task": meta.get("task") or "retrieval", "question_type": meta.get("question_type"),
            "difficulty": meta.get("difficulty"), "language": meta.get("language"), "persona": meta.get("character"),
            "cosine": None if cosine is None else round(float(cosine), 4), "kept": kept}  # fmt: skip


def create_labels_file(path: str | Path, raw: str | Path, filtered: str | Path | None = None, *,
                       fraction: float = 0.05, seed: int = 0, embedder: Any = None,
                       batch_tokens: int | None = None) -> Review:  # fmt: skip
    """Draw the sample of `raw` (a synthetic-pairs JSONL file) and write the labels file's header and items
    (atomically). `filtered` (the `qembed filter` output of `raw`) marks which items the filter kept and
    gives their cosine; with an `embedder` every item's cosine is computed as the filter does."""
    path = Path(path)
    if not 0 < fraction <= 1:
        raise QembedError(f"--sample {fraction:g} is not a fraction in (0, 1]")
    records = [r for r in iter_jsonl(raw, allow_truncated_tail=True) if _valid(r)]
    if not records:
        raise QembedError(f"{raw}: no (query, pos) records to sample")
    kept_scores: dict[str, float | None] | None = None
    if filtered is not None:
        kept_scores = {pair_key(r): (r.get("meta") or {}).get("score")
                       for r in iter_jsonl(filtered, allow_truncated_tail=True) if _valid(r)}  # fmt: skip
        if kept_scores and not any(pair_key(r) in kept_scores for r in records):
            raise QembedError(f"{filtered} shares no (query, positive) pair with {raw}: is it its filter output?")
    ids = Counter(str(r.get("query_id")) for r in records if r.get("query_id") is not None)
    picked = stratified_sample(records, fraction, seed)
    chosen = [records[i] for i in picked]
    cosines: list[float | None]
    if embedder is not None:
        from qembed.synth.filter import pair_scores

        cosines = [float(s) for s in pair_scores(chosen, embedder, batch_tokens=batch_tokens)]
    else:
        cosines = []
        for record in chosen:
            score = (kept_scores or {}).get(pair_key(record))
            cosines.append(score if score is not None else (record.get("meta") or {}).get("score"))
    items = []
    for i, record, cosine in zip(picked, chosen, cosines):
        qid = record.get("query_id")
        item_id = str(qid) if qid is not None and ids[str(qid)] == 1 else f"line{i + 1}"
        kept = None if kept_scores is None else pair_key(record) in kept_scores
        items.append(_item(record, item_id, cosine, kept))
    strata = Counter("/".join(str(it[name]) for name in STRATA) for it in items)
    header = {"type": "header", "format": FORMAT, "created": _now(), "raw": str(raw),
              "filtered": None if filtered is None else str(filtered), "sample": fraction, "seed": seed,
              "population": len(records), "filtered_population": None if kept_scores is None else len(kept_scores),
              "model": getattr(embedder, "name_or_path", None), "items": len(items), "strata": dict(strata)}  # fmt: skip
    with atomic_open(path) as f:
        for line in (header, *items):
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return read_review(path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_event_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Review:
    """A labels file as read: its header, items (in review order) and events (in file order)."""

    path: Path
    header: dict[str, Any]
    items: list[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)

    def labels(self) -> dict[str, dict[str, dict[str, Any]]]:
        return fold(self.events)


def read_review(path: str | Path) -> Review:
    """Read a labels file (a torn last line, left by a killed writer, is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise QembedError(f"labels file not found: {path}")
    header: dict[str, Any] | None = None
    items: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for number, line in enumerate(iter_jsonl(path, allow_truncated_tail=True), start=1):
        kind = line.get("type")
        if number == 1:
            if kind != "header" or line.get("format") != FORMAT:
                raise QembedError(f"{path} is not a qembed review labels file (no {FORMAT} header)")
            header = line
        elif kind == "item":
            items.append(line)
        elif kind in ("label", "undo"):
            events.append(line)
    if header is None:
        raise QembedError(f"{path} is empty: not a qembed review labels file")
    return Review(path, header, items, events)


def fold(events: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each reviewer's current label event per item, in the order given: an event id seen before is
    ignored (a resent request), a second label of the same item by the same reviewer is ignored, and an
    undo removes the label it names."""
    seen: set[str] = set()
    current: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for event in events:
        eid = event.get("event")
        if eid in seen:
            continue
        seen.add(eid)
        reviewer, item = event.get("reviewer"), event.get("item")
        if event.get("type") == "label":
            if event.get("label") in LABELS and item not in current[reviewer]:
                current[reviewer][item] = event
        elif event.get("type") == "undo":
            label = current[reviewer].get(item)
            if label is not None and label.get("event") == event.get("target"):
                del current[reviewer][item]
    return dict(current)


def check_reviewer(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > 64:
        raise QembedError("a reviewer name must be 1 to 64 characters")
    name = name.strip()
    if name.startswith(LLM_PREFIX):
        raise QembedError(f"reviewer names starting with {LLM_PREFIX!r} are kept for LLM judges")
    return name


class LabelStore:
    """The labels file behind the review server: every label or undo is appended (flushed and fsynced)
    before it is acknowledged, and its event id makes a resent request harmless. Thread-safe."""

    def __init__(self, path: str | Path) -> None:
        review = read_review(path)
        self.path = review.path
        self.header = review.header
        self.items = review.items
        self._index = {item["id"]: i for i, item in enumerate(self.items)}
        self._seen = {e.get("event") for e in review.events}
        self._labels = defaultdict(dict, fold(review.events))
        self._lock = threading.Lock()
        self._out = JsonlAppender(self.path)

    def close(self) -> None:
        self._out.close()

    def state(self, reviewer: str) -> dict[str, Any]:
        """What the page shows a reviewer: the next item they have not labelled, and their progress."""
        with self._lock:
            return self._state(reviewer)

    def _state(self, reviewer: str) -> dict[str, Any]:
        mine = self._labels.get(reviewer, {})
        position = next((i for i, item in enumerate(self.items) if item["id"] not in mine), None)
        counts = Counter(event["label"] for event in mine.values())
        reviewers = {name: len(done) for name, done in self._labels.items() if done and not name.startswith(LLM_PREFIX)}
        return {"reviewer": reviewer, "total": len(self.items), "done": len(mine), "counts": dict(counts),
                "position": None if position is None else position + 1,
                "item": None if position is None else self._public(self.items[position]),
                "can_undo": bool(mine), "reviewers": reviewers}  # fmt: skip

    @staticmethod
    def _public(item: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in item.items() if k not in ("type", "key")}

    def label(self, reviewer: str, item: str, label: str, event: str) -> dict[str, Any]:
        """Record `label` for `item` (once: a resent event or an item already labelled changes nothing)."""
        reviewer = check_reviewer(reviewer)
        if label not in LABELS:
            raise QembedError(f"label must be one of {', '.join(LABELS)}")
        if item not in self._index:
            raise QembedError(f"no item {item!r} in the sample")
        with self._lock:
            if event not in self._seen and item not in self._labels[reviewer]:
                record = {"type": "label", "event": event, "item": item, "reviewer": reviewer, "label": label,
                          "time": _now()}  # fmt: skip
                self._out.write(record)
                self._labels[reviewer][item] = record
            self._seen.add(event)
            return self._state(reviewer)

    def undo(self, reviewer: str, event: str) -> dict[str, Any]:
        """Take back the reviewer's latest label (a resent undo changes nothing)."""
        reviewer = check_reviewer(reviewer)
        with self._lock:
            mine = self._labels[reviewer]
            if event not in self._seen and mine:
                item, last = next(reversed(mine.items()))
                self._out.write({"type": "undo", "event": event, "item": item, "reviewer": reviewer,
                                 "target": last["event"], "time": _now()})  # fmt: skip
                del mine[item]
            self._seen.add(event)
            return self._state(reviewer)
