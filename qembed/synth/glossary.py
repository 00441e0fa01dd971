"""Domain term lists (`qembed synth --glossary`): for each passage, the glossary terms it contains and,
with an embedder, the nearest few; they are offered to the LLM as vocabulary, and the terms the generated
text uses are recorded in `meta.terms`."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from qembed.errors import QembedError
from qembed.synth.personas import cosine_encode_options, nearest_entries

#: Glossary entries are the "documents" a passage (as the query) looks up.
GLOSSARY_INSTRUCTION = "Given a passage, retrieve the domain terms and definitions that belong to its subject"
MAX_CONTAINED = 8  # contained terms offered per passage (the longest first at each position, in text order)


class Term(NamedTuple):
    term: str
    definition: str | None = None

    def text(self) -> str:
        return f"{self.term}: {self.definition}" if self.definition else self.term


def load_glossary(path: str | Path) -> list[Term]:
    """One term per line, or `term<TAB>definition`; blank lines and `#` comments are skipped; the first
    occurrence of a term wins."""
    path = Path(path)
    if not path.is_file():
        raise QembedError(f"glossary file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise QembedError(f"{path}: not valid UTF-8") from None
    terms: dict[str, Term] = {}
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        term, _, definition = line.partition("\t")
        term = term.strip()
        if term and _fold(term) not in terms:
            terms[_fold(term)] = Term(term, definition.strip() or None)
    if not terms:
        raise QembedError(f"{path}: no terms in the file")
    return list(terms.values())


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _is_word_char(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def terms_in(text: str, terms: list[str]) -> list[str]:
    """Those of `terms` that `text` contains (case- and width-insensitive; a term that starts or ends with
    a Latin letter or digit must do so at a word boundary, so "rice" is not found in "price")."""
    folded = _fold(text)
    return [t for t in terms if _contains(folded, _fold(t))]


def _contains(folded: str, term: str) -> bool:
    start = folded.find(term)
    while start >= 0:
        if _at_boundary(folded, start, start + len(term), term):
            return True
        start = folded.find(term, start + 1)
    return False


def _at_boundary(text: str, start: int, end: int, term: str) -> bool:
    if _is_word_char(term[0]) and start > 0 and _is_word_char(text[start - 1]):
        return False
    return not (_is_word_char(term[-1]) and end < len(text) and _is_word_char(text[end]))


@dataclass
class Glossary:
    """The terms of a glossary, indexed for fast containment search; with an `embedder` and `nearest` > 0
    the glossary is embedded once and each passage also gets its `nearest` closest terms."""

    terms: list[Term]
    embedder: Any = None
    nearest: int = 0
    batch_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.nearest < 0:
            raise QembedError("--glossary-nearest must be 0 or more")
        if self.nearest and self.embedder is None:
            raise QembedError("nearest glossary terms need an embedding model")
        # terms indexed by their first folded character, longest first
        self._index: dict[str, list[tuple[str, int]]] = {}
        for number, term in enumerate(self.terms):
            folded = _fold(term.term)
            self._index.setdefault(folded[0], []).append((folded, number))
        for bucket in self._index.values():
            bucket.sort(key=lambda entry: -len(entry[0]))
        self._vectors = None
        if self.nearest:
            self._vectors = self.embedder.encode_documents([t.text() for t in self.terms], show_progress=False,
                                                           **self._options)  # fmt: skip

    @property
    def _options(self) -> dict[str, Any]:
        return cosine_encode_options(self.batch_tokens)

    @property
    def needs_embedder(self) -> bool:
        return self.nearest > 0

    def contained(self, text: str) -> list[Term]:
        """The terms `text` contains, in order of first occurrence (at most `MAX_CONTAINED`)."""
        folded = _fold(text)
        found: list[int] = []
        seen: set[int] = set()
        i = 0
        while i < len(folded) and len(found) < MAX_CONTAINED:
            step = 1
            for term, number in self._index.get(folded[i], ()):
                if folded.startswith(term, i) and _at_boundary(folded, i, i + len(term), term):
                    if number not in seen:
                        seen.add(number)
                        found.append(number)
                    step = len(term)  # a term inside a longer term found here is not offered separately
                    break
            i += step
        return [self.terms[n] for n in found]

    def for_documents(self, texts: list[str]) -> list[list[Term]]:
        """For each text, its contained terms then its nearest terms not already among them."""
        found = [self.contained(text) for text in texts]
        if self.nearest and texts:
            k = self.nearest + MAX_CONTAINED
            for terms, row in zip(found, nearest_entries(self.embedder, texts, self._vectors, k,
                                                          GLOSSARY_INSTRUCTION, self._options)):  # fmt: skip
                extra = [self.terms[i] for i in row if self.terms[i] not in terms][: self.nearest]
                terms.extend(extra)
        return found
