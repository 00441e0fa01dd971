"""Reranker semantics: Qwen3 yes/no scoring against the published recipe, truncation, cross-encoders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from qembed import QembedError, Reranker
from qembed.models.prompts import RERANK_PREFIX, RERANK_SUFFIX

QUERY = "How do I stop rice blast?"
DOCS = [
    "Rice blast is controlled with resistant varieties and balanced nitrogen.",
    "The Eiffel Tower is in Paris.",
    "",
    "Fungicides such as tricyclazole protect rice against blast. " * 8,
]


def reference_scores(model_dir, query, docs, instruction, max_length=8192):
    """The published Qwen3-Reranker recipe, written out independently, batched with left padding."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prefix = tokenizer.encode(RERANK_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(RERANK_SUFFIX, add_special_tokens=False)
    instruction = instruction or "Given a web search query, retrieve relevant passages that answer the query"
    pairs = [f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}" for doc in docs]
    inputs = tokenizer(pairs, padding=False, truncation="longest_first", add_special_tokens=False,
                       max_length=max_length - len(prefix) - len(suffix))  # fmt: skip
    inputs["input_ids"] = [prefix + ids + suffix for ids in inputs["input_ids"]]
    scores = []
    for ids in inputs["input_ids"]:  # one at a time: no padding involved at all
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[:, -1, :]
        pair = torch.stack([logits[:, tokenizer.convert_tokens_to_ids("no")],
                            logits[:, tokenizer.convert_tokens_to_ids("yes")]], dim=1)  # fmt: skip
        scores.append(torch.log_softmax(pair, dim=1)[:, 1].exp().item())
    return scores


@pytest.fixture(scope="module")
def reranker(tiny_reranker_path):
    return Reranker.from_pretrained(tiny_reranker_path)


def test_scores_match_published_recipe(reranker, tiny_reranker_path):
    assert reranker.kind == "qwen3" and (reranker.yes_id, reranker.no_id) == (9693, 2152)
    for instruction in (None, "Find agronomy advice"):
        got = reranker.score(QUERY, DOCS, instruction=instruction)
        want = reference_scores(tiny_reranker_path, QUERY, DOCS, instruction)
        assert got == pytest.approx(want, abs=1e-5)
        assert all(0.0 <= s <= 1.0 for s in got)


def test_scores_do_not_depend_on_batching(reranker):
    together = reranker.score(QUERY, DOCS)
    alone = [reranker.score(QUERY, [doc])[0] for doc in DOCS]
    assert together == pytest.approx(alone, abs=1e-5)
    assert reranker.score(QUERY, DOCS, batch_tokens=1) == pytest.approx(together, abs=1e-5)


def test_truncation_cuts_the_body_and_keeps_prefix_and_suffix(tiny_reranker_path):
    reranker = Reranker.from_pretrained(tiny_reranker_path, max_length=120)
    tokenizer = reranker.tokenizer
    prefix = tokenizer.encode(RERANK_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(RERANK_SUFFIX, add_special_tokens=False)
    ids = reranker.prepare_pairs(QUERY, ["very long document " * 200, "short"])
    assert len(ids[0]) == 120
    for row in ids:
        assert row[: len(prefix)] == prefix and row[-len(suffix):] == suffix
    assert "<Query>: How do I stop rice blast?" in tokenizer.decode(ids[0])
    got = reranker.score(QUERY, ["very long document " * 200])
    assert got == pytest.approx(reference_scores(tiny_reranker_path, QUERY, ["very long document " * 200], None, 120), abs=1e-5)


def test_rerank_orders_by_score(reranker):
    scores = reranker.score(QUERY, DOCS)
    ranked = reranker.rerank(QUERY, DOCS)
    assert [i for i, _ in ranked] == sorted(range(len(DOCS)), key=lambda i: -scores[i])
    assert [s for _, s in ranked] == sorted(scores, reverse=True)
    assert len(reranker.rerank(QUERY, DOCS, top_k=2)) == 2
    assert reranker.rerank(QUERY, []) == []


def test_bad_input(reranker):
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        reranker.score(QUERY, ["ok", None])
    with pytest.raises(TypeError, match="query"):
        reranker.score(123, ["ok"])


def test_sequence_classification_cross_encoder(tmp_path, minilm_path):
    """A bge-reranker-style model (tiny random BERT head, real MiniLM tokenizer) scores sigmoid(logit)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(minilm_path, num_labels=1, num_hidden_layers=2)
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    folder = tmp_path / "cross-encoder"
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokenizer.save_pretrained(folder)
    reranker = Reranker.from_pretrained(folder)
    assert reranker.kind == "cross-encoder"
    got = reranker.score(QUERY, DOCS)
    want = []
    for doc in DOCS:
        inputs = tokenizer([QUERY], [doc], return_tensors="pt", truncation=True)  # batched form, as CrossEncoder
        with torch.no_grad():
            want.append(torch.sigmoid(model(**inputs).logits[0, 0]).item())
    assert got == pytest.approx(want, abs=1e-5)


# ---------------------------------------------------------------- what loads as a reranker (issue 13)

ROOT = Path(__file__).resolve().parent.parent


def _weight_names(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_fixtures_have_the_published_layouts(tiny_reranker_path, tiny_embedder_path, tmp_path):
    from qembed.testing import build_qwen3_reranker

    for folder in (tiny_reranker_path, tiny_embedder_path):
        assert json.loads((folder / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    emb = _weight_names(tiny_embedder_path)  # Qwen3-Embedding: Qwen3Model keys, no head
    assert "embed_tokens.weight" in emb and not any(k.startswith(("model.", "lm_head")) for k in emb)
    rr = _weight_names(tiny_reranker_path)  # Qwen3-Reranker-0.6B: tied head, not stored
    assert "model.embed_tokens.weight" in rr and "lm_head.weight" not in rr
    untied = build_qwen3_reranker(tmp_path / "untied", seed=2, tie_word_embeddings=False)  # 4B / 8B
    assert "lm_head.weight" in _weight_names(untied)
    reranker = Reranker.from_pretrained(untied)
    got = reranker.score(QUERY, DOCS[:2])
    assert got == pytest.approx(reference_scores(untied, QUERY, DOCS[:2], None), abs=1e-5)


def test_an_embedder_is_not_a_reranker(minilm_path, tiny_embedder_path, tmp_path):
    with pytest.raises(QembedError, match=r"BertModel.*expected"):
        Reranker.from_pretrained(minilm_path)
    with pytest.raises(QembedError, match=r"embedding model.*expected"):
        Reranker.from_pretrained(tiny_embedder_path)
    docs = tmp_path / "docs.txt"
    docs.write_text("Rice blast is a fungal disease.\nThe Eiffel Tower is in Paris.\n")
    proc = subprocess.run([sys.executable, "-m", "qembed", "rerank", "--model", str(minilm_path), "--query",
                           "rice blast control", "--input", str(docs)], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "expected" in proc.stderr


def test_heads_that_would_be_randomly_initialised_are_refused(minilm_path, tiny_embedder_path, tmp_path):
    # the Qwen3-Embedding-8B layout (untied, no lm_head) without its sentence-transformers files
    headless = tmp_path / "headless"
    shutil.copytree(tiny_embedder_path, headless)
    (headless / "modules.json").unlink()
    config = json.loads((headless / "config.json").read_text())
    (headless / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(QembedError, match=r"lm_head\.weight.*randomly initiali[sz]ed"):
        Reranker.from_pretrained(headless)
    # a cross-encoder config over weights without a classification head
    no_head = tmp_path / "no-head"
    shutil.copytree(minilm_path, no_head)
    (no_head / "modules.json").unlink()
    config = json.loads((no_head / "config.json").read_text())
    (no_head / "config.json").write_text(json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    with pytest.raises(QembedError, match=r"classifier.*randomly initiali[sz]ed"):
        Reranker.from_pretrained(no_head)


def test_causal_lm_without_yes_no_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

    from qembed.testing import qwen3_config

    folder = tmp_path / "no-yes"
    Qwen3ForCausalLM(qwen3_config(vocab_size=64, bos_token_id=None, eos_token_id=None)).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({"<unk>": 0, "rice": 1, "blast": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<unk>").save_pretrained(folder)
    with pytest.raises(QembedError, match=r"'yes'.*'no'"):
        Reranker.from_pretrained(folder)


def test_score_pairs_across_queries_is_one_stream(reranker, monkeypatch):
    others = ["Which crops suffer from aphids?", "When is maize harvested?", "How much rain does rice need?"]
    per_query = reranker.score(QUERY, DOCS) + [reranker.score(q, [d])[0] for q, d in zip(others, DOCS)]
    forwards = []
    real = reranker.forward_logits
    monkeypatch.setattr(reranker, "forward_logits", lambda batch: forwards.append(len(batch["input_ids"])) or real(batch))
    pairs = [(QUERY, d) for d in DOCS] + list(zip(others, DOCS))
    assert reranker.score_pairs(pairs) == pytest.approx(per_query, abs=1e-5)
    # one query's pairs reuse their shared prefix; lone pairs of different queries share plain batches
    assert sum(forwards) == len(others) and len(forwards) < len(others)
    assert reranker.score_pairs([]) == []
    with pytest.raises(TypeError, match=r"pairs\[1\] document is int"):
        reranker.score_pairs([(QUERY, "ok"), (QUERY, 3)])


def test_yes_no_logits_in_float32_under_bf16(tiny_reranker_path):
    rr = Reranker.from_pretrained(tiny_reranker_path, dtype=torch.bfloat16)
    batch = rr.collate(rr.prepare_pairs(QUERY, DOCS))
    with torch.inference_mode():
        hidden = rr.model.get_decoder()(**batch).last_hidden_state[:, -1]
        weight = rr.model.get_output_embeddings().weight[[rr.no_id, rr.yes_id]]
        want = hidden.float() @ weight.float().T
        got = rr.forward_logits(batch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want[:, 1] - want[:, 0], rtol=0, atol=1e-6)
