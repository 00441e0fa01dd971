"""Embedder semantics on tiny random Qwen3 models (real tokenizer) and on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from qembed import Embedder, ModelNotFoundError, QembedError
from qembed.models.prompts import DEFAULT_QUERY_INSTRUCTION

EOT = 151643
TEXTS = [
    "What causes rice blast?",
    "",
    "Maize needs 500 to 800 mm of water over the season, most of it around tasselling and silking. " * 6,
    "水稻稻瘟病的症状是什么？",
    "short",
]


@pytest.fixture(scope="module")
def embedder(tiny_embedder_path):
    return Embedder.from_pretrained(tiny_embedder_path)


def reference_embeddings(model_dir, texts, instruction=None):
    """Independent reference: the published recipe, one text at a time, plain transformers forward pass."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    rows = []
    for text in texts:
        formatted = f"Instruct: {instruction}\nQuery:{text}" if instruction else text
        inputs = tokenizer([formatted], return_tensors="pt")
        assert inputs["input_ids"][0, -1].item() == EOT
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state[:, -1]
        rows.append(torch.nn.functional.normalize(hidden, dim=-1)[0].numpy())
    return np.stack(rows)


def test_documents_match_reference(embedder, tiny_embedder_path):
    got = embedder.encode_documents(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, reference_embeddings(tiny_embedder_path, TEXTS), atol=1e-5)


def test_queries_get_default_instruction(embedder, tiny_embedder_path):
    assert embedder.default_instruction == DEFAULT_QUERY_INSTRUCTION
    got = embedder.encode_queries(TEXTS)
    want = reference_embeddings(tiny_embedder_path, TEXTS, DEFAULT_QUERY_INSTRUCTION)
    np.testing.assert_allclose(got, want, atol=1e-5)
    custom = embedder.encode_queries(TEXTS[:2], instruction="Find agricultural answers")
    np.testing.assert_allclose(
        custom, reference_embeddings(tiny_embedder_path, TEXTS[:2], "Find agricultural answers"), atol=1e-5
    )
    bare = embedder.encode_queries(TEXTS, instruction=None)
    np.testing.assert_allclose(bare, embedder.encode(TEXTS), atol=1e-6)
    assert not np.allclose(bare, got, atol=1e-3)


def test_batch_composition_does_not_change_vectors(embedder):
    alone = embedder.encode(["short"])[0]
    longer = ["a much longer text about irrigation and fertiliser " * k for k in range(1, 12)]
    mixed = embedder.encode(longer + ["short"], batch_tokens=100_000)[-1]
    np.testing.assert_allclose(alone, mixed, atol=1e-5)
    tiny_batches = embedder.encode(longer + ["short"], batch_tokens=1)[-1]
    np.testing.assert_allclose(alone, tiny_batches, atol=1e-5)


def test_end_of_text_exactly_once_and_kept_by_truncation(tiny_embedder_path):
    embedder = Embedder.from_pretrained(tiny_embedder_path, max_length=16)
    ids = embedder.prepare(["hello", "word " * 100, "", "ends with it<|endoftext|>"])
    for row in ids:
        assert row[-1] == EOT and row.count(EOT) == 1
        assert len(row) <= 16
    assert len(ids[1]) == 16
    query_ids = embedder.prepare(["word " * 100], instruction="x")[0]
    assert query_ids[-1] == EOT and len(query_ids) == 16


def test_tokenizer_without_post_processor_still_gets_one_eot(tiny_embedder_path, tmp_path):
    """A Qwen3 embedding folder whose tokenizer does not append <|endoftext|> (e.g. a reranker tokenizer)."""
    from qembed.testing import build_qwen_tokenizer

    folder = tmp_path / "no-eot"
    shutil.copytree(tiny_embedder_path, folder)
    build_qwen_tokenizer(append_eot=False).save_pretrained(folder)
    plain = Embedder.from_pretrained(folder)
    assert all(row[-1] == EOT and row.count(EOT) == 1 for row in plain.prepare(TEXTS))
    np.testing.assert_allclose(plain.encode(TEXTS), Embedder.from_pretrained(tiny_embedder_path).encode(TEXTS), atol=1e-6)


def test_matryoshka_dims(embedder):
    full = embedder.encode(TEXTS, normalize=False)
    cut = embedder.encode(TEXTS, dim=32)
    assert cut.shape == (len(TEXTS), 32)
    want = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    assert embedder.encode(TEXTS, dim=64).shape == (len(TEXTS), 64)
    for bad in (31, 65, 0, -1, 32.0):
        with pytest.raises(ValueError, match="between 32 and 64"):
            embedder.encode(TEXTS, dim=bad)


def test_edge_inputs(embedder):
    assert embedder.encode([]).shape == (0, 64)
    assert embedder.encode([], dim=32).shape == (0, 32)
    assert np.isfinite(embedder.encode([""])).all()
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        embedder.encode(["a", "b", 3])
    with pytest.raises(TypeError, match="single string"):
        embedder.encode("a text")


def test_save_and_reload_round_trip(embedder, tmp_path):
    embedder.save_pretrained(tmp_path / "saved")
    again = Embedder.from_pretrained(tmp_path / "saved")
    assert again.pooling == "lasttoken" and again.default_instruction == DEFAULT_QUERY_INSTRUCTION
    np.testing.assert_allclose(again.encode_queries(TEXTS), embedder.encode_queries(TEXTS), atol=1e-6)


def test_saved_folder_records_itself_and_keeps_the_base_names(tiny_reranker_path, tmp_path):
    """An embedder started from a causal LM (`model.*` keys, tied head) saves headless `Qwen3Model` weights once,
    with the base's `architectures` and a `qembed.json` naming the real class."""
    from qembed.models.layout import read_record, weight_names

    emb = Embedder.from_pretrained(tiny_reranker_path)
    emb.save_pretrained(tmp_path / "saved")
    names = weight_names(tmp_path / "saved")
    assert "embed_tokens.weight" in names and not any(n.startswith(("model.", "lm_head")) for n in names)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    record = read_record(tmp_path / "saved")
    assert (record.kind, record.backbone, record.pooling, record.dtype) == ("embedder", "Qwen3Model", "lasttoken", "float32")
    again = Embedder.from_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(again.encode(TEXTS[:2]), emb.encode(TEXTS[:2]), atol=1e-6)


def test_sentence_transformers_agrees_on_tiny_qwen3(embedder, tiny_embedder_path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_embedder_path), device="cpu")
    want = st.encode(TEXTS, prompt_name="query", convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(embedder.encode_queries(TEXTS), want, atol=1e-5)


def test_loading_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="not found"):
        Embedder.from_pretrained(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        Embedder.from_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="qembed-test/nonexistent-model.*local path"):
        Embedder.from_pretrained("qembed-test/nonexistent-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(QembedError, match="cannot load"):
        Embedder.from_pretrained(tmp_path)


def test_missing_weights_are_an_error_not_random_init(tiny_embedder_path, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "incomplete"
    shutil.copytree(tiny_embedder_path, folder)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["layers.1.mlp.down_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QembedError, match=r"layers\.1\.mlp\.down_proj\.weight.*randomly initiali[sz]ed"):
        Embedder.from_pretrained(folder)


def test_dim_warns_once_without_declared_matryoshka_support(embedder, tiny_embedder_path, tmp_path, caplog):
    """The published Qwen3-Embedding card declares MRL support; a model whose files do not gets one warning."""
    with caplog.at_level("WARNING", logger="qembed"):
        embedder.encode(TEXTS, dim=32)
    assert not [r for r in caplog.records if "Matryoshka" in r.getMessage()]
    folder = tmp_path / "no-card"
    shutil.copytree(tiny_embedder_path, folder)
    (folder / "README.md").unlink()
    plain = Embedder.from_pretrained(folder)
    with caplog.at_level("WARNING", logger="qembed"):
        plain.encode(TEXTS, dim=32)
        plain.encode(TEXTS, dim=48)
        plain.encode(TEXTS)
    warned = [r.getMessage() for r in caplog.records if "Matryoshka" in r.getMessage()]
    assert len(warned) == 1 and "dim" in warned[0]


# ---------------------------------------------------------------- the real all-MiniLM-L6-v2

SENTENCES = [
    "A man is playing a guitar on stage.",
    "How do I bake sourdough bread at home?",
    "Stock markets fell sharply after the announcement.",
    "The cat sleeps on the warm windowsill.",
]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return Embedder.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def st_minilm(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


def test_minilm_matches_sentence_transformers(minilm, st_minilm):
    assert minilm.pooling == "mean" and minilm.default_instruction is None and minilm.max_length == 256
    texts = SENTENCES + ["word " * 400, ""]
    ours = minilm.encode_documents(texts)
    theirs = st_minilm.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    cosines = (ours * theirs).sum(axis=1)
    assert cosines.min() >= 0.99999
    np.testing.assert_allclose(minilm.encode_queries(texts), ours, atol=1e-6)  # no default instruction


def test_minilm_ranks_related_sentence_first(minilm):
    query = minilm.encode_queries(["Someone performs music with a guitar."])[0]
    scores = minilm.encode_documents(SENTENCES) @ query
    assert int(np.argmax(scores)) == 0
    assert scores[0] > scores[1:].max() + 0.2


def test_st_prompts_and_cls_pooling_follow_the_model_files(minilm_path, tmp_path, st_minilm):
    """A copy of MiniLM configured like e5 (raw `query: ` prompt) and with CLS pooling, checked against ST."""
    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "minilm-cls"
    shutil.copytree(minilm_path, folder)
    pooling = json.loads((folder / "1_Pooling/config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (folder / "1_Pooling/config.json").write_text(json.dumps(pooling))
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    st_config["prompts"] = {"query": "query: ", "document": "passage: "}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    ours = Embedder.from_pretrained(folder)
    assert ours.pooling == "cls" and ours.query_prompt == "query: " and ours.default_instruction is None
    st = SentenceTransformer(str(folder), device="cpu")
    want_q = st.encode(SENTENCES, prompt_name="query", normalize_embeddings=True)
    want_d = st.encode(SENTENCES, prompt_name="document", normalize_embeddings=True)
    assert (ours.encode_queries(SENTENCES) * want_q).sum(axis=1).min() >= 0.99999
    assert (ours.encode_documents(SENTENCES) * want_d).sum(axis=1).min() >= 0.99999


def test_query_format_values(embedder):
    from qembed.models.prompts import MODEL_DEFAULT, QueryFormat

    default = embedder.encode_queries(TEXTS[:3])
    np.testing.assert_array_equal(embedder.encode_queries(TEXTS[:3], instruction=MODEL_DEFAULT), default)
    np.testing.assert_array_equal(embedder.encode(TEXTS[:3], instruction=MODEL_DEFAULT), default)
    assert embedder.resolve_query_format(MODEL_DEFAULT) == QueryFormat("instruction", DEFAULT_QUERY_INSTRUCTION)
    raw = QueryFormat("prompt", f"Instruct: {DEFAULT_QUERY_INSTRUCTION}\nQuery:")
    np.testing.assert_array_equal(embedder.encode_queries(TEXTS[:3], instruction=raw), default)
    np.testing.assert_array_equal(embedder.encode_queries(TEXTS[:3], instruction=QueryFormat("none")),
                                  embedder.encode(TEXTS[:3]))  # fmt: skip


def test_last_token_models_truncate_while_tokenising(tiny_embedder_path):
    embedder = Embedder.from_pretrained(tiny_embedder_path, max_length=16)
    produced = []
    tokenizer = embedder.tokenizer

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            out = tokenizer(*args, **kwargs)
            produced.extend(len(ids) for ids in out["input_ids"])
            return out

    embedder.tokenizer = Spy()
    ids = embedder.prepare(["word " * 5000, "short"])
    assert [len(row) for row in ids] == [16, 2] and ids[0][-1] == EOT
    assert max(produced) <= 16  # the tokenizer never hands back the 5,000-token text


def test_batch_budget_defaults_to_the_model_family(embedder, minilm, monkeypatch):
    import qembed.models.embedder as module

    budgets = []
    real = module.token_budget_batches
    monkeypatch.setattr(module, "token_budget_batches",
                        lambda lengths, budget, **kw: budgets.append(budget) or real(lengths, budget, **kw))
    for model in (embedder, minilm):
        model.encode(["a text"])
        model.encode(["a text"], batch_tokens=300)
    assert budgets == [embedder.batching.batch_tokens, 300, minilm.batching.batch_tokens, 300]
    assert minilm.batching.batch_tokens < embedder.batching.batch_tokens  # small encoder on CPU: small batches
