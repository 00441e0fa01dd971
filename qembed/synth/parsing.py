"""Turning raw LLM output into validated values. Model output is data: it is never `eval`-ed, only
parsed as JSON and checked against the allowed values."""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from qembed.data.text import normalize_text
from qembed.synth.prompts import DIFFICULTIES, QUESTION_TYPES


class ParseError(ValueError):
    """The output cannot be used; the message says why (it is shown to the model in a repair turn)."""


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```(?:[a-zA-Z0-9_-]*)\s*\n?(.*?)```", re.DOTALL)


def strip_think(text: str) -> str:
    """Remove `<think>…</think>` reasoning. A dangling `</think>` (the opening tag was in the prompt)
    drops everything before it; a dangling `<think>` (cut off while thinking) drops everything after it."""
    text = _THINK_BLOCK.sub("", text)
    low = text.lower()
    if "</think>" in low:
        text = text[low.rindex("</think>") + len("</think>") :]
        low = text.lower()
    if "<think>" in low:
        text = text[: low.index("<think>")]
    return text.strip()


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in `text`: the whole text, a fenced code block, or an object inside prose."""
    text = strip_think(text)
    candidates = [text, *(m.group(1) for m in _FENCE.finditer(text))]
    for candidate in candidates:
        try:
            value = json.loads(candidate.strip())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise ParseError("no JSON object found in the reply")


def _key(s: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", unicodedata.normalize("NFKC", s).casefold()).strip("_")


_TYPE_ALIASES = {
    "keyword": "keywords", "key_words": "keywords", "yes_no": "yes_or_no", "yesno": "yes_or_no",
    "yes_or_no_question": "yes_or_no", "acquire": "acquire_knowledge", "knowledge": "acquire_knowledge",
    "knowledge_acquisition": "acquire_knowledge", "summarize": "summary", "summarization": "summary",
    "summarise": "summary", "summarisation": "summary",
}  # fmt: skip
_DIFFICULTY_ALIASES = {
    "ph_d": "phd", "doctoral": "phd", "doctorate": "phd", "expert": "phd", "highschool": "high_school",
    "high": "high_school", "college": "university", "undergraduate": "university", "bachelor": "university",
}  # fmt: skip


def normalise_choice(value: Any, allowed: tuple[str, ...], aliases: dict[str, str], field: str) -> str:
    """Map e.g. `"PhD"`, `"Yes_Or_No"`, `"high school"` onto one of `allowed`, or raise `ParseError`."""
    if not isinstance(value, str) or not value.strip():
        raise ParseError(f"{field} must be one of {', '.join(allowed)}")
    key = _key(value)
    key = aliases.get(key, key)
    if key in allowed:
        return key
    raise ParseError(f"{field} {value!r} is not one of {', '.join(allowed)}")


def match_character(value: Any, candidates: list[str], what: str = "Character") -> str:
    """The candidate the model meant: exact or normalised match, its list number, a unique containment,
    or a close fuzzy match. Raises `ParseError` (naming `what`) otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ParseError(f"{what} must be one of the listed {'descriptions' if what == 'Character' else 'names'}")
    if value in candidates:
        return value
    norm = normalize_text(value)
    normed = [normalize_text(c) for c in candidates]
    for cand, n in zip(candidates, normed):
        if n == norm:
            return cand
    number = re.fullmatch(r"(?:character|person|no)?\s*#?\s*(\d+)\.?", value.strip(), re.IGNORECASE)
    if number and 1 <= int(number.group(1)) <= len(candidates):
        return candidates[int(number.group(1)) - 1]
    if norm:
        hits = [c for c, n in zip(candidates, normed) if n and (n in norm or (len(norm) >= 8 and norm in n))]
        if len(hits) == 1:
            return hits[0]
        close = difflib.get_close_matches(norm, normed, n=1, cutoff=0.8)
        if close:
            return candidates[normed.index(close[0])]
    listed = "descriptions" if what == "Character" else "names"
    raise ParseError(f"{what} {value[:80]!r} is not one of the listed {listed}")


@dataclass(frozen=True)
class QueryConfig:
    character: str
    question_type: str
    difficulty: str


def _field(obj: dict[str, Any], name: str) -> Any:
    want = _key(name)
    for key, value in obj.items():
        if isinstance(key, str) and _key(key).replace("_", "") == want.replace("_", ""):
            return value
    return None


def parse_config(text: str, candidates: list[str]) -> QueryConfig:
    """Stage-1 output → validated `QueryConfig` (keys matched case/spacing-insensitively)."""
    obj = extract_json(text)
    missing = [k for k in ("Character", "Question_Type", "Difficulty") if _field(obj, k) is None]
    if missing:
        raise ParseError(f"the JSON object lacks {', '.join(missing)}")
    return QueryConfig(
        character=match_character(_field(obj, "Character"), candidates),
        question_type=normalise_choice(_field(obj, "Question_Type"), QUESTION_TYPES, _TYPE_ALIASES, "Question_Type"),
        difficulty=normalise_choice(_field(obj, "Difficulty"), DIFFICULTIES, _DIFFICULTY_ALIASES, "Difficulty"),
    )


_LABEL = re.compile(r"^\s*(?:query|question|paraphrase|translation|查询|问题|翻译)\s*[:：]\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’「」『』"


def parse_text(text: str, key: str) -> str:
    """Stage-2 output → the generated text: `{"<key>": ...}` JSON, or a plain one-paragraph answer."""
    clean = strip_think(text)
    try:
        obj = extract_json(clean)
    except ParseError:
        obj = None
    if obj is not None:
        value = _field(obj, key)
        if not isinstance(value, str):
            raise ParseError(f'the JSON object has no string field "{key}"')
        result = value
    else:
        if "{" in clean or "```" in clean or not clean:
            raise ParseError(f'expected {{"{key}": "..."}}')
        lines = [ln for ln in clean.splitlines() if ln.strip()]
        if len(lines) != 1:
            raise ParseError(f'expected {{"{key}": "..."}}, got several lines of prose')
        result = _LABEL.sub("", lines[0])
    result = " ".join(result.split()).strip(_QUOTES + " ")
    if not result:
        raise ParseError(f"the {key} is empty")
    return result


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_LATIN = re.compile(r"[A-Za-z]")
CHAR_LANGUAGES = {"zh", "zh-tw", "ja", "ko", "th"}  # length counted in characters, not words


def length_unit(language: str) -> str:
    return "chars" if language.lower() in CHAR_LANGUAGES else "words"


def text_length(text: str, unit: str) -> int:
    return len(re.sub(r"\s+", "", text)) if unit == "chars" else len(text.split())


def detect_language(text: str) -> str:
    """A coarse guess, enough to pick a source language: `zh`/`ja`/`ko` by script, else `en`."""
    cjk = len(_CJK.findall(text))
    if cjk and cjk >= len(_LATIN.findall(text)) / 4:
        if re.search(r"[\u3040-\u30ff]", text):
            return "ja"
        if re.search(r"[\uac00-\ud7af]", text):
            return "ko"
        return "zh"
    return "en"


def check_language(text: str, language: str) -> None:
    """Reject text clearly not in `language` (only the script is checked: CJK vs Latin)."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    code = language.lower()
    if code in {"zh", "zh-tw", "ja", "ko"} and cjk == 0:
        raise ParseError(f"the text is not written in {code}")
    if code in {"en", "fr", "de", "es", "pt", "it", "nl", "id", "vi", "pl", "tr"} and cjk > latin:
        raise ParseError(f"the text is not written in {code}")


def check_length(text: str, target: int, unit: str) -> None:
    """Reject text far longer than asked (runaway output such as a copied passage)."""
    n = text_length(text, unit)
    if n > max(3 * target, target + 20):
        raise ParseError(f"it is {n} {unit} long, far more than the {target} asked for")
