"""Every prompt format of the Qwen3 embedding and reranking models, in one place.

Formats follow the published Qwen3-Embedding / Qwen3-Reranker model cards exactly; most user bug reports
about these models are formatting errors, so nothing else in the package builds these strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Default query instruction of Qwen3-Embedding (model card and `config_sentence_transformers.json`).
DEFAULT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

#: Default instruction of Qwen3-Reranker (model card).
DEFAULT_RERANK_INSTRUCTION = DEFAULT_QUERY_INSTRUCTION

#: The end-of-text token every Qwen3-Embedding sequence ends with (id 151643).
END_OF_TEXT = "<|endoftext|>"

RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
RERANK_PREFIX = f"<|im_start|>system\n{RERANK_SYSTEM}<|im_end|>\n<|im_start|>user\n"
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

_INSTRUCT_PROMPT = re.compile(r"^Instruct: (?P<instruction>.*)\nQuery:$", re.DOTALL)
_INSTRUCT_QUERY = re.compile(r"^Instruct: (?P<instruction>.*?)\nQuery:(?P<query>.*)$", re.DOTALL)


def query_prefix(instruction: str | None) -> str:
    """The text placed before a query: `Instruct: {instruction}\\nQuery:` (no space after `Query:`)."""
    return f"Instruct: {instruction}\nQuery:" if instruction else ""


def format_query(query: str, instruction: str | None) -> str:
    """A query as Qwen3-Embedding expects it; without an instruction the query is unchanged."""
    return query_prefix(instruction) + query


def split_query(text: str) -> tuple[str, str | None]:
    """The inverse of `format_query`: `(query, instruction)` of a text in the Qwen3 template, else `(text, None)`."""
    match = _INSTRUCT_QUERY.match(text)
    if match is None or not match.group("instruction"):
        return text, None
    return match.group("query"), match.group("instruction")


@dataclass(frozen=True)
class QueryFormat:
    """How query texts are formatted before encoding: one value for every setting.

    `kind` is "default" (the model's own query instruction or prompt: `MODEL_DEFAULT`), "instruction" (the
    Qwen3 template around `text`), "prompt" (`text` as a raw prefix, e.g. "query: ") or "none" (bare text).
    Resolve "default" against a model with `Embedder.resolve_query_format`; a resolved format's `prefix` is
    what encoding prepends and what the embedding cache keys on.
    """

    kind: str
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("default", "instruction", "prompt", "none"):
            raise ValueError(f"unknown query format kind {self.kind!r}")
        if (self.kind in ("instruction", "prompt")) != bool(self.text):
            raise ValueError(f"query format {self.kind!r} {'needs' if self.text == '' else 'takes no'} text")

    @classmethod
    def of(cls, value: QueryFormat | str | None, prompt: str = "") -> QueryFormat:
        """A format from the public arguments: a `QueryFormat`, an instruction text, or None (then `prompt`,
        a raw prefix, if given; else bare text)."""
        if isinstance(value, QueryFormat):
            if prompt:
                raise ValueError("give either a QueryFormat or a prompt, not both")
            return value
        if value is not None and not isinstance(value, str):
            raise TypeError(f"instruction must be a text, None or a QueryFormat, got {value!r}")
        if value:
            return cls("instruction", value)
        return cls("prompt", prompt) if prompt else cls("none")

    @property
    def prefix(self) -> str:
        """The text placed before each query (a "default" format must be resolved first)."""
        if self.kind == "default":
            raise ValueError("MODEL_DEFAULT must be resolved against a model first")
        return query_prefix(self.text) if self.kind == "instruction" else self.text

    @property
    def label(self) -> str | None:
        """The instruction or prompt text for reports; None for bare queries."""
        return self.text or None

    def __repr__(self) -> str:
        return "MODEL_DEFAULT" if self.kind == "default" else f"QueryFormat({self.kind!r}, {self.text!r})"


#: The model's own query instruction (or prompt; nothing for models without one).
MODEL_DEFAULT = QueryFormat("default")
#: Bare query text.
NO_INSTRUCTION = QueryFormat("none")


def instruction_from_prompt(prompt: str) -> str | None:
    """Recover the instruction from a sentence-transformers query prompt in the Qwen3 template, else None."""
    match = _INSTRUCT_PROMPT.match(prompt)
    return match.group("instruction") if match else None


def rerank_body(query: str, document: str, instruction: str | None) -> tuple[str, str]:
    """The user turn of a Qwen3-Reranker pair, split as (head, document) so truncation can cut the document."""
    instruction = instruction or DEFAULT_RERANK_INSTRUCTION
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: ", document


def format_rerank_pair(query: str, document: str, instruction: str | None) -> str:
    """The full Qwen3-Reranker input string (prefix + body + suffix), untruncated."""
    head, doc = rerank_body(query, document, instruction)
    return RERANK_PREFIX + head + doc + RERANK_SUFFIX
