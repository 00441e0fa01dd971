"""Persona library loading and per-document top-5 persona retrieval with a real embedder."""

from __future__ import annotations

import re

import pytest

from qembed.errors import QembedError
from qembed.synth.personas import PersonaMatcher, load_personas


def test_default_library_is_large_bilingual_and_unique():
    personas = load_personas()
    assert len(personas) >= 300
    assert len(set(personas)) == len(personas)
    chinese = [p for p in personas if re.search(r"[\u4e00-\u9fff]", p)]
    assert 100 <= len(chinese) <= len(personas) - 100  # both languages well represented
    # several domains, not just agriculture
    text = " ".join(personas).lower()
    for word in ("farmer", "lawyer", "nurse", "engineer", "teacher", "律师", "医生", "工程师", "农"):
        assert word in text


def test_user_files_in_three_formats(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"persona": "A beekeeper."}\n\n{"persona": "A chef."}\n{"persona": "A beekeeper."}\n')
    assert load_personas(jsonl) == ["A beekeeper.", "A chef."]
    hub = tmp_path / "hub.jsonl"
    hub.write_text('{"input persona": "A tax accountant.", "synthesized text": "..."}\n')
    assert load_personas(hub) == ["A tax accountant."]
    txt = tmp_path / "p.txt"
    txt.write_text("A pilot.\n  A nurse.  \n\n")
    assert load_personas(txt) == ["A pilot.", "A nurse."]


def test_bad_persona_files(tmp_path):
    with pytest.raises(QembedError, match="not found"):
        load_personas(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "x"}\n')
    with pytest.raises(QembedError, match="bad.jsonl:1: no persona field"):
        load_personas(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(QembedError, match="no personas"):
        load_personas(empty)


def test_five_or_fewer_personas_are_all_candidates_without_a_model():
    matcher = PersonaMatcher(["a", "b", "c"])
    assert not matcher.needs_embedder
    assert matcher.candidates(["doc one", "doc two"]) == [["a", "b", "c"], ["a", "b", "c"]]
    with pytest.raises(QembedError, match="embedding model"):
        PersonaMatcher([str(i) for i in range(6)])


class _CountingEmbedder:
    """Wraps an Embedder and counts how often each texts are encoded."""

    def __init__(self, inner):
        self.inner = inner
        self.default_instruction = inner.default_instruction
        self.encoded: list[int] = []

    def encode_documents(self, texts, **kw):
        self.encoded.append(len(texts))
        return self.inner.encode_documents(texts, **kw)

    def encode_queries(self, texts, **kw):
        return self.inner.encode_queries(texts, **kw)

    def encode(self, texts, **kw):
        return self.inner.encode(texts, **kw)


@pytest.fixture(scope="module")
def minilm(minilm_path):
    from qembed import Embedder

    return Embedder.from_pretrained(str(minilm_path), device="cpu")


@pytest.mark.slow
def test_top5_personas_by_similarity_with_minilm(minilm):
    library = load_personas()
    english = [p for p in library if not re.search(r"[\u4e00-\u9fff]", p)]
    embedder = _CountingEmbedder(minilm)
    matcher = PersonaMatcher(english, embedder)
    docs = [
        "Rice blast, caused by the fungus Magnaporthe oryzae, is the most destructive disease of rice. "
        "Fungicide sprays at booting and resistant varieties reduce yield losses in paddy fields.",
        "The query planner chose a sequential scan because the table had no index on customer_id; "
        "adding a B-tree index cut the database query time from 4 seconds to 20 milliseconds.",
    ]
    rice, sql = matcher.candidates(docs)
    matcher.candidates(docs)
    assert embedder.encoded == [len(english)]  # the library is embedded once, not per call
    assert len(rice) == 5 and len(set(rice)) == 5 and len(sql) == 5
    assert any("rice" in p.lower() or "pathologist" in p.lower() for p in rice[:2])
    assert any("database" in p.lower() or "software" in p.lower() for p in sql[:2])
    assert not set(rice) & set(sql)


def test_instruction_aware_model_path(tiny_embedder_path):
    from qembed import Embedder

    tiny = Embedder.from_pretrained(str(tiny_embedder_path), device="cpu")
    assert tiny.default_instruction is not None
    personas = [f"Persona number {i} who works in field {i}." for i in range(12)]
    cands = PersonaMatcher(personas, tiny).candidates(["a document about rice", "文档"])
    assert all(len(c) == 5 and set(c) <= set(personas) for c in cands)
