"""Shared-prefix key/value reuse in `Reranker.score`: the same scores as the plain path (every pair computed
in full), for queries and documents of mixed lengths, truncated documents included; plain fallback."""

from __future__ import annotations

import pytest
import torch

from qembed import Reranker
from qembed.models.prompts import RERANK_SUFFIX

QUERIES = ["rice blast?", "How do I stop rice blast in a wet season when resistant varieties are not available? " * 3]
DOCS = [
    "Rice blast is controlled with resistant varieties and balanced nitrogen.",
    "x",
    "",
    "稻瘟病的防治：选用抗病品种，合理施用氮肥。",
    "Fungicides such as tricyclazole protect rice against blast. " * 30,  # needs truncation at max_length 256
    "The Eiffel Tower is in Paris. " * 6,
]


def plain_scores(reranker, token_ids):
    """Every pair computed in full: left-padded batch through the model, as the plain path does."""
    with torch.inference_mode():
        return torch.sigmoid(reranker.forward_logits(reranker.collate(token_ids)).float()).tolist()


@pytest.fixture(scope="module")
def reranker(tiny_reranker_path):
    return Reranker.from_pretrained(tiny_reranker_path, max_length=256)


@pytest.mark.parametrize("instruction", [None, "Judge agronomy advice"])
def test_prefix_reuse_equals_plain_path(reranker, instruction, one_torch_thread):
    suffix = reranker.tokenizer(RERANK_SUFFIX, add_special_tokens=False)["input_ids"]
    for query in QUERIES:
        token_ids = reranker.prepare_pairs(query, DOCS, instruction=instruction)
        assert max(len(ids) for ids in token_ids) == 256  # one document was truncated ...
        assert all(ids[-len(suffix) :] == suffix for ids in token_ids)  # ... and kept its suffix
        want = plain_scores(reranker, token_ids)
        for batch_tokens in (16384, 300):  # one batch; several batches of different widths
            reused = reranker._score_shared_prefix(token_ids, batch_tokens=batch_tokens)
            assert reused is not None, "the prefix path was not taken"
            assert reused == pytest.approx(want, abs=1e-4)
        assert reranker.score(query, DOCS, instruction=instruction) == pytest.approx(want, abs=1e-4)
        assert [i for i, _ in reranker.rerank(query, DOCS, instruction=instruction)] == sorted(
            range(len(DOCS)), key=lambda i: -want[i]
        )


def test_plain_fallback(reranker, minilm_path, tmp_path, one_torch_thread):
    token_ids = reranker.prepare_pairs(QUERIES[0], DOCS[:1])
    assert reranker._score_shared_prefix(token_ids) is None  # one pair: nothing to share
    assert reranker.score(QUERIES[0], DOCS[:1]) == pytest.approx(plain_scores(reranker, token_ids), abs=1e-6)
    # a cross-encoder has no prefix cache to reuse: the plain path scores it
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(minilm_path, num_labels=1, num_hidden_layers=1)
    config.architectures = ["BertForSequenceClassification"]
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path)
    cross = Reranker.from_pretrained(tmp_path)
    pairs = cross.prepare_pairs(QUERIES[0], DOCS)
    assert cross._score_shared_prefix(pairs) is None
    assert cross.score(QUERIES[0], DOCS) == pytest.approx(plain_scores(cross, pairs), abs=1e-6)
