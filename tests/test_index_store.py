"""The persistent index folder: incremental rebuilds, streamed documents, fingerprint check, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qembed.cli import main
from qembed.errors import QembedError
from qembed.index import Manifest, build_index, open_search_index, search_index


@pytest.fixture(scope="module")
def embedder(tiny_embedder_path):
    from qembed import Embedder

    return Embedder.from_pretrained(tiny_embedder_path)


def write_corpus(path, docs):
    path.write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in docs), encoding="utf-8")
    return path


DOCS = [(f"d{i}", f"document number {i} about {topic}") for i, topic in
        enumerate(["rice", "maize", "water", "soil", "vitamin D", "cancer", "sugar", "fruit", "sleep", "tea"] * 3)]  # fmt: skip


def test_rebuild_encodes_only_new_and_changed_documents(embedder, tmp_path, one_torch_thread):
    corpus = write_corpus(tmp_path / "corpus.jsonl", DOCS[:20])
    cache = tmp_path / "cache"  # a fresh cache: the counts below do not depend on what other tests encoded
    first = build_index(embedder, corpus, tmp_path / "idx", cache_dir=cache)
    assert (first.encoded, first.cached, first.manifest.count) == (20, 0, 20)
    grown = DOCS[:3] + [("d3", "a changed document")] + DOCS[4:]
    second = build_index(embedder, write_corpus(corpus, grown), tmp_path / "idx", cache_dir=cache)
    assert (second.encoded, second.cached, second.manifest.count) == (11, 19, 30)
    fresh = build_index(embedder, corpus, tmp_path / "fresh", cache_dir=tmp_path / "fresh-cache")
    assert fresh.encoded == 30
    assert build_index(embedder, corpus, tmp_path / "same-cache", cache_dir=cache).encoded == 0
    index = open_search_index(tmp_path / "idx", embedder)
    assert len(index) == 30 and index.document(3) == ("d3", "a changed document")
    hits = index.search("about vitamin D", top_k=5)
    again = search_index(tmp_path / "fresh", embedder, "about vitamin D", top_k=5)
    assert [h.id for h in hits] == [h.id for h in again]
    np.testing.assert_allclose([h.score for h in hits], [h.score for h in again], atol=1e-5)
    expected = embedder.encode_queries(["about vitamin D"]) @ embedder.encode_documents([t for _, t in grown]).T
    assert [h.id for h in hits] == [grown[i][0] for i in np.argsort(-expected[0])[:5]]
    assert hits[0].text == dict(grown)[hits[0].id]
    manifest = Manifest.read(tmp_path / "idx")
    assert manifest.fingerprint == embedder.fingerprint and manifest.dim == embedder.hidden_size
    offsets = np.load(tmp_path / "idx" / "docs.offsets.npy")
    assert len(offsets) == 30 and (tmp_path / "idx" / "docs.jsonl").read_text().count("\n") == 30


def test_matryoshka_index_and_fingerprint_refusal(embedder, tmp_path, tiny_embedder_path, minilm_path, capsys,
                                                  one_torch_thread):  # fmt: skip
    from qembed import Embedder

    corpus = write_corpus(tmp_path / "corpus.jsonl", DOCS[:10])
    assert main(["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus), "--output",
                 str(tmp_path / "idx"), "--dim", "32"]) == 0  # fmt: skip
    index = open_search_index(tmp_path / "idx", embedder)
    assert index.dim == 32 and index.vectors.dim == 32
    query = embedder.encode_queries(["rice"], dim=32)
    docs = embedder.encode_documents([t for _, t in DOCS[:10]], dim=32)
    assert index.search("rice", top_k=1)[0].id == DOCS[int(np.argmax(docs @ query[0]))][0]
    other = Embedder.from_pretrained(minilm_path)
    with pytest.raises(QembedError, match="was built with"):
        open_search_index(tmp_path / "idx", other)
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), "--model", str(minilm_path), "--query", "x"]) == 2
    err = capsys.readouterr().err
    assert "was built with" in err and len(err.strip().splitlines()) == 1
    assert main(["search", "--index", str(tmp_path), "--query", "x"]) == 2
    assert "not a qembed index" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("keep me")
    assert main(["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(corpus), "--output",
                 str(tmp_path / "junk")]) == 2  # fmt: skip
    assert (tmp_path / "junk" / "file.txt").read_text() == "keep me"
