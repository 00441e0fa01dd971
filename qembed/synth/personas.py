"""Persona library and per-document candidate retrieval (top-k personas by embedding similarity)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from qembed.data.jsonl import parse_jsonl_line
from qembed.errors import QembedError

PERSONA_FIELDS = ("persona", "input persona", "description", "text")
DEFAULT_LIBRARY = "personas.jsonl"
# Documents play the query role (we look up who would read them); personas are the "documents".
PERSONA_INSTRUCTION = "Given a passage, retrieve descriptions of people who would search for the information in it"
DOC_CHARS_FOR_MATCHING = 600  # the opening of a document is enough to place it among personas


def _from_lines(lines: list[str], source: str) -> list[str]:
    personas: list[str] = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            record = parse_jsonl_line(line, source, number)
            value = next((record[f] for f in PERSONA_FIELDS if isinstance(record.get(f), str)), None)
            if value is None:
                raise QembedError(f"{source}:{number}: no persona field (expected one of {', '.join(PERSONA_FIELDS)})")
            line = value.strip()
        if line:
            personas.append(line)
    # keep the first occurrence of each persona, in file order
    return list(dict.fromkeys(personas))


def load_personas(path: str | Path | None = None) -> list[str]:
    """Personas from a user file — JSONL with a `persona` field (Persona Hub's format; `input persona`
    is accepted too) or plain text, one per line — or, with no path, the library shipped with qembed."""
    if path is None:
        text = resources.files("qembed.synth").joinpath("resources", DEFAULT_LIBRARY).read_text(encoding="utf-8")
        return _from_lines(text.splitlines(), DEFAULT_LIBRARY)
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise QembedError(f"persona file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QembedError(f"{path}: not valid UTF-8") from None
    personas = _from_lines(text.splitlines(), str(path))
    if not personas:
        raise QembedError(f"{path}: no personas in the file")
    return personas


def cosine_encode_options(batch_tokens: int | None) -> dict:
    """`encode` options of synth's similarity steps (personas, glossary, filter): unit vectors, because their
    scores and thresholds are cosines whatever similarity the model declares; `batch_tokens` None: the model's
    own budget."""
    return {"normalize": True} | ({} if batch_tokens is None else {"batch_tokens": batch_tokens})


@dataclass
class PersonaMatcher:
    """Finds the `k` personas closest to each document. The persona library is embedded once, at
    construction; with `k` or fewer personas no embedder is needed and all are candidates."""

    personas: list[str]
    embedder: Any = None
    k: int = 5
    vectors: Any = None
    batch_tokens: int | None = None  # padded tokens per encoding batch (None: the embedder's default)

    def __post_init__(self) -> None:
        if not self.personas:
            raise QembedError("the persona library is empty")
        if len(self.personas) > self.k:
            if self.embedder is None:
                raise QembedError(f"{len(self.personas)} personas need an embedding model to pick {self.k} per document")
            if self.vectors is None:
                self.vectors = self.embedder.encode_documents(self.personas, show_progress=False, **self._options)

    @property
    def _options(self) -> dict:
        return cosine_encode_options(self.batch_tokens)

    @property
    def needs_embedder(self) -> bool:
        return len(self.personas) > self.k

    def candidates(self, documents: list[str]) -> list[list[str]]:
        """For each document, its top-`k` personas, most similar first."""
        if not self.needs_embedder:
            return [list(self.personas) for _ in documents]
        top = nearest_entries(self.embedder, documents, self.vectors, self.k, PERSONA_INSTRUCTION, self._options)
        return [[self.personas[i] for i in row] for row in top]


def nearest_entries(embedder: Any, documents: list[str], vectors: Any, k: int, instruction: str,
                    options: dict[str, int]) -> list[list[int]]:  # fmt: skip
    """For each document (its first `DOC_CHARS_FOR_MATCHING` characters, asking as a query with
    `instruction` on an instruction-aware model), the indices of its `k` nearest rows of `vectors` (entries
    of a library embedded as documents), most similar first."""
    import numpy as np

    heads = [d[:DOC_CHARS_FOR_MATCHING] for d in documents]
    if embedder.default_instruction is not None:  # instruction-aware model: documents ask the question
        doc_vecs = embedder.encode_queries(heads, instruction=instruction, show_progress=False, **options)
    else:
        doc_vecs = embedder.encode(heads, show_progress=False, **options)
    scores = np.asarray(doc_vecs, dtype=np.float32) @ np.asarray(vectors, dtype=np.float32).T
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return [[int(i) for i in idx[np.argsort(-row[idx], kind="stable")]] for row, idx in zip(scores, top)]
