"""`Reranker`: relevance of (query, document) pairs in [0, 1].

Qwen3-Reranker-style causal LMs: the published chat prompt, score = softmax over the last position's
`no`/`yes` logits, taking `yes`; truncation cuts the body only, never the prefix or the suffix.
Cross-encoders with a sequence-classification head (bge-reranker style): sigmoid of the logit.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from qembed.errors import QembedError
from qembed.models import prompts
from qembed.models.batching import BatchDefaults, default_batching, pad_batch, token_budget_batches
from qembed.models.embedder import check_texts
from qembed.models.layout import (
    ModelRecord,
    dtype_name,
    keep_base_layout,
    read_record,
    sentence_transformers_pooling,
    write_record,
)
from qembed.models.loading import (
    load_pretrained,
    load_weights,
    model_class,
    pick_device,
    pick_dtype,
    resolve_model_dir,
)
from qembed.models.quantize import check_quantize, quantize_linear_layers
from qembed.progress import progress_bar

_AUTO_PROGRESS_FROM = 256  # pairs
PAIRS_PER_WINDOW = 4096  # pairs tokenised and batched together by `score_pairs`
_MIN_SHARED_PREFIX = 8  # tokens: below this, reusing a cache saves less than it costs
_EXPECTED = ("a reranker: a Qwen3-Reranker-style causal LM (...ForCausalLM with its output layer) or a "
             "cross-encoder (...ForSequenceClassification with its classification head)")  # fmt: skip


def _reranker_class(model_dir: Path, config) -> tuple[str, type]:
    """(kind, transformers class) of a reranker folder: from its `qembed.json`, else from what it declares;
    embedding models and other classes are refused."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    record = read_record(model_dir)
    if record is not None:
        if record.kind != "reranker":
            raise QembedError(f"{model_dir} is a qembed {record.kind} ({record.backbone}); expected {_EXPECTED}")
        return record.reranker or "qwen3", model_class(record.backbone)
    archs = getattr(config, "architectures", None) or [getattr(config, "model_type", "unknown")]
    pooling = sentence_transformers_pooling(model_dir)
    if pooling is not None:
        raise QembedError(f"{model_dir} is a sentence-transformers embedding model ({', '.join(archs)}, {pooling} "
                          f"pooling); expected {_EXPECTED}")  # fmt: skip
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "cross-encoder", AutoModelForSequenceClassification
    if any(a.endswith("ForCausalLM") for a in archs):
        return "qwen3", AutoModelForCausalLM
    raise QembedError(f"{model_dir} holds {', '.join(archs)}; expected {_EXPECTED}")


@functools.cache
def _shared_prefix_cache_class():
    """`DynamicCache` subclass (transformers is imported on first use): the key/value cache of one shared
    prefix, read by every row of a batch and never grown. Each layer sees the prefix's keys/values followed
    by the batch's own, and nothing is kept across layers or batches (a growing cache would hold every
    layer's keys/values of the whole batch at once)."""
    from transformers import DynamicCache

    class SharedPrefixCache(DynamicCache):
        @classmethod
        def from_cache(cls, cache: DynamicCache) -> SharedPrefixCache:
            return cls([(layer.keys, layer.values) for layer in cache.layers])

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None, **kwargs):  # newer transformers pass kwargs=
            layer, rows = self.layers[layer_idx], key_states.shape[0]
            return (torch.cat([layer.keys.expand(rows, -1, -1, -1), key_states], dim=-2),
                    torch.cat([layer.values.expand(rows, -1, -1, -1), value_states], dim=-2))  # fmt: skip

    return SharedPrefixCache


class Reranker:
    """Scores (query, document) pairs; load with `Reranker.from_pretrained(name_or_path)`."""

    quantize: str | None = None  # "int8" when the body's Linear layers run quantised

    def __init__(self, model, tokenizer, *, kind: str, model_dir: Path, name_or_path: str, max_length: int,
                 device: torch.device) -> None:  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind  # "qwen3" | "cross-encoder"
        self.model_dir = model_dir
        self.name_or_path = name_or_path
        self.device = device
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, limit) if limit else max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.yes_id = self.no_id = None
        if kind == "qwen3":
            self.yes_id = tokenizer.convert_tokens_to_ids("yes")
            self.no_id = tokenizer.convert_tokens_to_ids("no")
            vocab = model.get_output_embeddings().weight.shape[0]
            if not all(isinstance(i, int) and i != tokenizer.unk_token_id and 0 <= i < vocab
                       for i in (self.yes_id, self.no_id)):  # fmt: skip
                raise QembedError(f"{model_dir}: the vocabulary has no 'yes' and 'no' tokens; expected a "
                                  f"Qwen3-Reranker-style causal LM that answers yes/no")  # fmt: skip
            self._prefix = tokenizer(prompts.RERANK_PREFIX, add_special_tokens=False)["input_ids"]
            self._suffix = tokenizer(prompts.RERANK_SUFFIX, add_special_tokens=False)["input_ids"]
            if self.max_length <= len(self._prefix) + len(self._suffix):
                raise QembedError(f"max_length {self.max_length} leaves no room for the reranker prompt")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, max_length: int = 8192,
                        trust_remote_code: bool = False, quantize: str | None = None) -> Reranker:  # fmt: skip
        """Load a Qwen3-Reranker-style causal LM (its output layer loaded, `yes`/`no` in its vocabulary) or a
        cross-encoder (its classification head loaded); anything else is a one-line `QembedError`.
        `quantize="int8"` runs the body's Linear layers in int8 on the CPU (the yes/no head stays fp32)."""
        from transformers import AutoConfig, AutoTokenizer

        model_dir = resolve_model_dir(name_or_path)
        device = pick_device(check_quantize(quantize, device, dtype))
        config = load_pretrained(AutoConfig, model_dir, trust_remote_code=trust_remote_code)
        kind, backbone = _reranker_class(model_dir, config)
        tokenizer = load_pretrained(AutoTokenizer, model_dir, trust_remote_code=trust_remote_code)
        model = load_weights(backbone, model_dir, expected=_EXPECTED, dtype=pick_dtype(dtype, device),
                             trust_remote_code=trust_remote_code)  # fmt: skip
        model.to(device).eval()
        quantize_linear_layers(model.base_model, quantize, getattr(config, "intermediate_size", None))
        reranker = cls(model, tokenizer, kind=kind, model_dir=model_dir, name_or_path=str(name_or_path),
                       max_length=max_length, device=device)  # fmt: skip
        reranker.quantize = quantize
        return reranker

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save model, tokenizer and `qembed.json`, keeping the tensor names of the folder it was loaded from."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        keep_base_layout(directory, self.model_dir, self.model)
        self.tokenizer.save_pretrained(directory)
        write_record(directory, self.record())

    def record(self) -> ModelRecord:
        """What this model is, as `qembed.json` records it."""
        return ModelRecord(kind="reranker", backbone=type(self.model).__name__, reranker=self.kind,
                           dtype=dtype_name(self.model.dtype), base_model=self.name_or_path)  # fmt: skip

    # ------------------------------------------------------------------ formatting
    @property
    def batching(self) -> BatchDefaults:
        """The batching measured best for this model family on its device (see `default_batching`)."""
        return default_batching(self.kind == "qwen3", torch.device(self.device).type)

    def prepare_pairs(self, query: str, documents: Sequence[str], *, instruction: str | None = None) -> list[list[int]]:
        """Token ids for each (query, document) pair, truncated to `max_length`."""
        if not isinstance(query, str):
            raise TypeError(f"query is {type(query).__name__}, expected str")
        return self.prepare_pair_list([(query, doc) for doc in check_texts(documents)], instruction=instruction)

    def prepare_pair_list(self, pairs: Sequence[tuple[str, str]], *, instruction: str | None = None) -> list[list[int]]:
        """Token ids for (query, document) pairs of any queries, truncated to `max_length` while tokenising."""
        pairs = _check_pairs(pairs)
        if not pairs:
            return []
        queries, documents = [q for q, _ in pairs], [d for _, d in pairs]
        if self.kind == "cross-encoder":
            encoded = self.tokenizer(queries, documents, truncation=True, max_length=self.max_length)
            return [list(ids) for ids in encoded["input_ids"]]
        budget = self.max_length - len(self._prefix) - len(self._suffix)
        bodies = ["".join(prompts.rerank_body(q, d, instruction)) for q, d in pairs]
        encoded = self.tokenizer(bodies, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
        return [self._prefix + list(ids) + self._suffix for ids in encoded]

    def collate(self, token_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """A padded batch: left padding (with position ids) for causal LMs, right padding for cross-encoders."""
        batch = pad_batch(token_ids, self.pad_id, left=self.kind == "qwen3", device=self.device)
        if self.kind == "cross-encoder" and getattr(self.model.config, "type_vocab_size", 1) > 1:
            # BERT-style segment ids: 1 after the first separator
            is_sep = batch["input_ids"] == self.tokenizer.sep_token_id
            batch["token_type_ids"] = ((is_sep.cumsum(dim=1) - is_sep.long()) > 0).long() * batch["attention_mask"]
        return batch

    def forward_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Relevance logits `(batch,)` in float32: `yes - no` at the last position, or the classifier logit.

        The yes/no projection runs in float32 whatever the model's dtype (a bf16 logit difference loses
        most of its digits)."""
        if self.kind == "cross-encoder":
            logits = self.model(**batch).logits.float()
            return logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
        hidden = self.model.get_decoder()(**batch).last_hidden_state[:, -1]
        return self.yes_no_logits(hidden)

    def yes_no_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`yes - no` logits (float32) from last-position hidden states `(batch, hidden)` of a Qwen3 reranker."""
        weight = self.model.get_output_embeddings().weight[[self.no_id, self.yes_id]]
        no_yes = hidden.float() @ weight.float().T
        return no_yes[:, 1] - no_yes[:, 0]  # softmax over (no, yes) taking yes == sigmoid(yes - no)

    # ------------------------------------------------------------------ scoring
    def score(self, query: str, documents: Sequence[str], *, instruction: str | None = None,
              batch_tokens: int | None = None, show_progress: bool | None = None) -> list[float]:  # fmt: skip
        """Relevance of each document to `query`, in [0, 1], in input order."""
        if not isinstance(query, str):
            raise TypeError(f"query is {type(query).__name__}, expected str")
        pairs = [(query, doc) for doc in check_texts(documents)]
        return self.score_pairs(pairs, instruction=instruction, batch_tokens=batch_tokens, show_progress=show_progress)

    def score_pairs(self, pairs: Sequence[tuple[str, str]], *, instruction: str | None = None,
                    batch_tokens: int | None = None, show_progress: bool | None = None) -> list[float]:  # fmt: skip
        """Relevance of each `(query, document)` pair, in [0, 1], in input order.

        A Qwen3 reranker computes the prompt prefix a query's pairs share (system prompt, instruction, query)
        once and reuses its key/value cache for all of them (`_score_shared_prefix`). Other pairs form one
        token-budget stream across queries, so batches fill however few candidates each query has
        (`batch_tokens=None`: the model family's `batching`), tokenised a window of `PAIRS_PER_WINDOW` at a
        time so memory stays bounded however many there are.
        """
        pairs = _check_pairs(pairs)
        batching = self.batching
        budget = batch_tokens or batching.batch_tokens
        scores: list[float | None] = [None] * len(pairs)
        show = (None if len(pairs) >= _AUTO_PROGRESS_FROM else False) if show_progress is None else show_progress
        with torch.inference_mode(), progress_bar(total=len(pairs), enabled=show, desc="rerank", unit="pair") as bar:
            if self.kind == "qwen3":
                by_query: dict[str, list[int]] = {}
                for index, (query, _) in enumerate(pairs):
                    by_query.setdefault(query, []).append(index)
                for query, indices in by_query.items():
                    if len(indices) < 2:
                        continue
                    token_ids = self.prepare_pairs(query, [pairs[i][1] for i in indices], instruction=instruction)
                    reused = self._score_shared_prefix(token_ids, batch_tokens=budget, bar=bar)
                    for index, value in zip(indices, reused or []):
                        scores[index] = value
            rest = [index for index, value in enumerate(scores) if value is None]
            for begin in range(0, len(rest), PAIRS_PER_WINDOW):
                window = rest[begin : begin + PAIRS_PER_WINDOW]
                token_ids = self.prepare_pair_list([pairs[i] for i in window], instruction=instruction)
                for indices in token_budget_batches([len(ids) for ids in token_ids], budget,
                                                    min_batch_tokens=batching.min_batch_tokens):  # fmt: skip
                    probs = torch.sigmoid(self.forward_logits(self.collate([token_ids[i] for i in indices])))
                    for index, value in zip(indices, probs.tolist()):
                        scores[window[index]] = value
                    bar.update(len(indices))
        return scores

    def _score_shared_prefix(self, token_ids: Sequence[Sequence[int]], *, batch_tokens: int | None = None,
                             bar=None) -> list[float] | None:  # fmt: skip
        """Scores of pairs that share a token prefix (one query's pairs: system prompt, instruction, query),
        computing the prefix once and reusing its key/value cache for every pair; exact, same ids and positions.

        None where this does not apply, and the caller takes the plain path: cross-encoders, fewer than two
        pairs, a shared prefix under `_MIN_SHARED_PREFIX` tokens, or a model whose cache cannot be reused.
        """
        if self.kind != "qwen3" or len(token_ids) < 2:
            return None
        shared = min(len(ids) for ids in token_ids) - 1  # every pair keeps at least its last token
        first = token_ids[0]
        for ids in token_ids[1:]:
            shared = next((i for i in range(shared) if ids[i] != first[i]), shared)
        if shared < _MIN_SHARED_PREFIX:
            return None
        decoder = self.model.get_decoder()
        weight = self.model.get_output_embeddings().weight[[self.no_id, self.yes_id]].float()
        scores = [0.0] * len(token_ids)
        rests = [ids[shared:] for ids in token_ids]
        with torch.inference_mode():
            prefix = torch.tensor([first[:shared]], device=self.device)
            try:
                cache = _shared_prefix_cache_class().from_cache(decoder(input_ids=prefix, use_cache=True).past_key_values)
            except (AttributeError, TypeError, NotImplementedError):  # no reusable cache: plain path
                return None
            for indices in token_budget_batches([len(ids) for ids in rests], batch_tokens or self.batching.batch_tokens):
                batch = pad_batch([rests[i] for i in indices], self.pad_id, left=False, device=self.device)
                lengths = batch["attention_mask"].sum(dim=1)
                rows, width = batch["input_ids"].shape
                mask = torch.cat([torch.ones(rows, shared, dtype=torch.long, device=self.device),
                                  batch["attention_mask"]], dim=1)  # fmt: skip
                positions = torch.arange(shared, shared + width, device=self.device).expand(rows, -1)
                hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True).last_hidden_state  # fmt: skip
                last = hidden[torch.arange(rows, device=self.device), lengths - 1].float()  # right padding
                no_yes = last @ weight.T
                for index, value in zip(indices, torch.sigmoid(no_yes[:, 1] - no_yes[:, 0]).tolist()):
                    scores[index] = value
                if bar is not None:
                    bar.update(len(indices))
        return scores

    def rerank(self, query: str, documents: Sequence[str], *, instruction: str | None = None,
               top_k: int | None = None, **kwargs) -> list[tuple[int, float]]:  # fmt: skip
        """`(index, score)` of the documents, best first (ties keep input order), cut to `top_k`."""
        scores = self.score(query, documents, instruction=instruction, **kwargs)
        ranked = sorted(enumerate(scores), key=lambda item: -item[1])
        return ranked if top_k is None else ranked[:top_k]

    def __repr__(self) -> str:
        return f"Reranker({self.name_or_path!r}, kind={self.kind}, max_length={self.max_length}, device={self.device})"


def _check_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Validate (query, document) pairs: a `TypeError` names the first bad item."""
    pairs = list(pairs)
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"pairs[{index}] is not a (query, document) pair")
        for part, name in zip(pair, ("query", "document")):
            if not isinstance(part, str):
                raise TypeError(f"pairs[{index}] {name} is {type(part).__name__}, expected str")
    return [tuple(pair) for pair in pairs]
