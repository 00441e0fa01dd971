"""XLM-RoBERTa models (bge-m3, multilingual-e5, bge-reranker): positions start at `padding_idx + 1`, so 514
positions hold 512 tokens. Tiny random models of the published config layouts, checked against
sentence-transformers on inputs longer than the limit (issue 17, item 8)."""

from __future__ import annotations

import numpy as np
import pytest

from qembed import Embedder, Reranker
from qembed.models.loading import position_offset
from qembed.testing import build_xlmr_embedding, build_xlmr_reranker

LONG = "rice blast " * 300  # 600 word pieces, more than 512 tokens
TEXTS = ["What causes rice blast?", LONG, "the soil and water of the field", ""]

LAYOUTS = {
    # a plain transformers folder (no sentence-transformers files): the limit comes from the tokenizer (512)
    # and the positions (514 - 2); before the fix 514 tokens went through and the model crashed
    "plain-xlmr": dict(sentence_transformers=False, max_position_embeddings=514, model_max_length=512),
    "bge-m3": dict(),  # CLS pooling, Normalize, max_seq_length 8192, 8194 positions
    "multilingual-e5": dict(pooling="mean", max_seq_length=512, model_max_length=512, max_position_embeddings=514),
}
LIMITS = {"plain-xlmr": 512, "bge-m3": 8192, "multilingual-e5": 512}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_xlmr_embedders_take_long_inputs_and_match_sentence_transformers(layout, tmp_path, one_torch_thread):
    from sentence_transformers import SentenceTransformer

    folder = build_xlmr_embedding(tmp_path / layout, **LAYOUTS[layout])
    embedder = Embedder.from_pretrained(folder)
    assert position_offset(embedder.model) == 2
    assert embedder.max_length == LIMITS[layout]
    assert len(embedder.prepare([LONG])[0]) == min(LIMITS[layout], len(embedder.tokenizer(LONG)["input_ids"]))
    ours = embedder.encode(TEXTS)
    st = SentenceTransformer(str(folder), device="cpu")
    assert st.max_seq_length == embedder.max_length
    theirs = st.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_xlmr_cross_encoder_takes_long_inputs_and_matches_sentence_transformers(tmp_path, one_torch_thread):
    """bge-reranker-base layout: XLMRobertaForSequenceClassification, 514 positions, tokenizer limit 512."""
    from sentence_transformers import CrossEncoder

    folder = build_xlmr_reranker(tmp_path / "bge-reranker", initializer_range=0.5)  # scores spread out
    reranker = Reranker.from_pretrained(folder)
    assert reranker.kind == "cross-encoder" and reranker.max_length == 512
    pairs = [("rice blast", LONG), (LONG, "rice blast"), ("what causes rice blast", "the rice blast disease"),
             ("water", "soil")]  # fmt: skip
    assert max(len(ids) for ids in reranker.prepare_pair_list(pairs)) == 512
    ours = reranker.score_pairs(pairs)
    theirs = CrossEncoder(str(folder), device="cpu").predict(pairs)
    assert max(ours) - min(ours) > 0.01
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_models_without_a_position_offset(minilm_path, tiny_embedder_path):
    """BERT and Qwen3 count positions from 0: their limits are unchanged."""
    assert position_offset(Embedder.from_pretrained(minilm_path).model) == 0
    assert position_offset(Embedder.from_pretrained(tiny_embedder_path).model) == 0
