"""Category sets of the classification task: read from `--labels FILE`, or proposed by the LLM once per
corpus from a sample of its passages and kept in `OUTPUT.labels.json` (reused by a resumed run)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qembed.data.jsonl import parse_jsonl_line
from qembed.errors import QembedError
from qembed.files import atomic_write_json
from qembed.synth.parsing import ParseError, extract_json

NAME_FIELDS = ("label", "name", "category")
PROPOSAL_SAMPLE = 24  # passages shown to the LLM when it proposes the categories
PROPOSAL_CHARS = 400  # characters of each
MAX_PROPOSED = 20


@dataclass(frozen=True)
class Category:
    name: str
    description: str | None = None

    def text(self) -> str:
        """The category as a positive (or negative) document: `name: description`."""
        return f"{self.name}: {self.description}" if self.description else self.name

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.name, "description": self.description}


def categories_path(output: str | Path) -> Path:
    """`OUT.jsonl` → `OUT.labels.json`, where a proposed category set is kept."""
    output = Path(output)
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".labels.json")


def _unique(categories: list[Category], source: str) -> list[Category]:
    seen: dict[str, Category] = {}
    for category in categories:
        seen.setdefault(category.name.casefold(), category)
    if len(seen) < 2:
        raise QembedError(f"{source}: a classification task needs at least two labels")
    return list(seen.values())


def _from_dict(obj: dict[str, Any], where: str) -> Category:
    name = next((obj[f] for f in NAME_FIELDS if isinstance(obj.get(f), str) and obj[f].strip()), None)
    if name is None:
        raise QembedError(f"{where}: no label name (expected one of {', '.join(NAME_FIELDS)})")
    description = obj.get("description")
    return Category(name.strip(), description.strip() if isinstance(description, str) and description.strip() else None)


def load_categories(path: str | Path) -> list[Category]:
    """Labels from a text file (one per line), JSONL (`{"label": ..., "description": ...}` per line) or an
    `OUTPUT.labels.json` written by an earlier run."""
    import json

    path = Path(path)
    if not path.is_file():
        raise QembedError(f"label file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QembedError(f"{path}: not valid UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("{") and path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise QembedError(f"{path}: invalid JSON ({exc})") from None
        items = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise QembedError(f"{path}: expected {{\"labels\": [{{\"label\": ..., \"description\": ...}}, ...]}}")
        return _unique([_from_dict(item, str(path)) for item in items], str(path))
    categories = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            categories.append(_from_dict(parse_jsonl_line(line, path, number), f"{path}:{number}"))
        else:
            categories.append(Category(line.strip()))
    return _unique(categories, str(path))


def parse_categories(raw: str) -> list[Category]:
    """The LLM's proposal → categories (`ParseError` when unusable)."""
    obj = extract_json(raw)
    items = obj.get("labels") or obj.get("categories")
    if not isinstance(items, list) or not items:
        raise ParseError('expected {"labels": [{"label": "...", "description": "..."}, ...]}')
    categories: dict[str, Category] = {}
    for item in items:
        if isinstance(item, str) and item.strip():
            item = {"label": item}
        if not isinstance(item, dict):
            raise ParseError("each label must be an object with a label and a description")
        try:
            category = _from_dict(item, "label")
        except QembedError as exc:
            raise ParseError(str(exc)) from None
        categories.setdefault(category.name.casefold(), category)
    if len(categories) < 2:
        raise ParseError("give at least two different labels")
    return list(categories.values())[:MAX_PROPOSED]


def proposal_sample(texts: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """The (doc_id, text) pairs shown when proposing categories: a seeded sample, in corpus order."""
    if len(texts) <= PROPOSAL_SAMPLE:
        return list(texts)
    picked = sorted(random.Random(f"{seed}|labels").sample(range(len(texts)), PROPOSAL_SAMPLE))
    return [texts[i] for i in picked]


def save_proposed(path: Path, categories: list[Category], *, llm_model: str, prompt_version: str,
                  sample_ids: list[str]) -> None:  # fmt: skip
    atomic_write_json(path, {"labels": [c.as_dict() for c in categories], "llm_model": llm_model,
                             "prompt_version": prompt_version, "sample_doc_ids": sample_ids},
                      ensure_ascii=False)  # fmt: skip
