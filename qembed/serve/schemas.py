"""Request bodies of the HTTP API (they also make the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class EmbeddingRequest(BaseModel):
    """The OpenAI embeddings request, plus `input_type` and `instruction` (qembed extensions)."""

    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="a string, strings, token ids, or lists of token ids"
    )
    model: StrictStr
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    input_type: Literal["query", "document"] | None = Field(
        None, description="query: the model's default query instruction; document: its document prompt"
    )
    instruction: StrictStr | None = Field(None, description="embed as queries with this task instruction")


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: StrictStr


class RerankRequest(BaseModel):
    """The Jina/Cohere rerank request, plus `instruction` (Qwen3-Reranker task)."""

    model_config = ConfigDict(extra="ignore")

    query: StrictStr
    documents: list[StrictStr | RerankDocument]
    model: StrictStr | None = None
    top_n: StrictInt | None = None
    return_documents: StrictBool = False
    instruction: StrictStr | None = None


class SearchRequest(BaseModel):
    """A search of the server's index, optionally reranked."""

    model_config = ConfigDict(extra="ignore")

    query: StrictStr
    top_k: StrictInt = 10
    instruction: StrictStr | None = None
    rerank: StrictBool = False
    rerank_top: StrictInt | None = None
    model: StrictStr | None = None
    nprobe: StrictInt | None = None  # search parameters over the index's own (`qembed.index.SearchParams`)
    ef: StrictInt | None = None
