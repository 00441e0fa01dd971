"""`Reranker`: relevance of (query, document) pairs in [0, 1].

Qwen3-Reranker-style causal LMs: the published chat prompt, score = softmax over the last position's
`no`/`yes` logits, taking `yes`; truncation cuts the body only, never the prefix or the suffix.
Cross-encoders with a sequence-classification head (bge-reranker style): sigmoid of the logit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qembed.errors import QembedError
from qembed.models import prompts
from qembed.models.batching import BatchDefaults, default_batching, pad_batch, token_budget_batches
from qembed.models.embedder import check_texts
from qembed.models.loading import load_pretrained, pick_device, pick_dtype, resolve_model_dir

_AUTO_PROGRESS_FROM = 256  # pairs
PAIRS_PER_WINDOW = 4096  # pairs tokenised and batched together by `score_pairs`


class Reranker:
    """Scores (query, document) pairs; load with `Reranker.from_pretrained(name_or_path)`."""

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
            self._prefix = tokenizer(prompts.RERANK_PREFIX, add_special_tokens=False)["input_ids"]
            self._suffix = tokenizer(prompts.RERANK_SUFFIX, add_special_tokens=False)["input_ids"]
            if self.max_length <= len(self._prefix) + len(self._suffix):
                raise QembedError(f"max_length {self.max_length} leaves no room for the reranker prompt")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, max_length: int = 8192,
                        trust_remote_code: bool = False) -> Reranker:  # fmt: skip
        """Load a Qwen3-Reranker-style causal LM or a sequence-classification cross-encoder."""
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        model_dir = resolve_model_dir(name_or_path)
        device = pick_device(device)
        config = load_pretrained(AutoConfig, model_dir, trust_remote_code=trust_remote_code)
        archs = getattr(config, "architectures", None) or []
        kind = "cross-encoder" if any(a.endswith("ForSequenceClassification") for a in archs) else "qwen3"
        auto = AutoModelForSequenceClassification if kind == "cross-encoder" else AutoModelForCausalLM
        tokenizer = load_pretrained(AutoTokenizer, model_dir, trust_remote_code=trust_remote_code)
        model = load_pretrained(auto, model_dir, dtype=pick_dtype(dtype, device), trust_remote_code=trust_remote_code)
        model.to(device).eval()
        return cls(model, tokenizer, kind=kind, model_dir=model_dir, name_or_path=str(name_or_path),
                   max_length=max_length, device=device)  # fmt: skip

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

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

        Pairs of many queries form one token-budget stream, so batches fill however few candidates each
        query has (`batch_tokens=None`: the model family's `batching`). Pairs are tokenised a window
        of `PAIRS_PER_WINDOW` at a time, so memory stays bounded however many there are.
        """
        pairs = _check_pairs(pairs)
        batching = self.batching
        budget = batch_tokens or batching.batch_tokens
        scores: list[float] = []
        show = len(pairs) >= _AUTO_PROGRESS_FROM if show_progress is None else show_progress
        with torch.inference_mode(), tqdm(total=len(pairs), disable=not show, desc="rerank", unit="pair") as bar:
            for begin in range(0, len(pairs), PAIRS_PER_WINDOW):
                token_ids = self.prepare_pair_list(pairs[begin : begin + PAIRS_PER_WINDOW], instruction=instruction)
                window = [0.0] * len(token_ids)
                for indices in token_budget_batches([len(ids) for ids in token_ids], budget,
                                                    min_batch_tokens=batching.min_batch_tokens):  # fmt: skip
                    probs = torch.sigmoid(self.forward_logits(self.collate([token_ids[i] for i in indices])))
                    for index, value in zip(indices, probs.tolist()):
                        window[index] = value
                    bar.update(len(indices))
                scores += window
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
