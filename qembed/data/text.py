"""The two text rules every part shares: how a title joins its text, and how texts are compared."""

from __future__ import annotations

import re
import unicodedata

_PUNCTUATION = re.compile(r"[\W_]+")


def join_title(title: str | None, text: str) -> str:
    """The text a document is encoded as: `title + " " + text`, stripped (as BEIR and MTEB do)."""
    return f"{title or ''} {text}".strip()


def normalize_text(text: str) -> str:
    """Text as compared for identity or near-duplicates: Unicode NFKC, case-folded, punctuation and
    whitespace collapsed to single spaces."""
    return " ".join(_PUNCTUATION.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())
