"""The model's declared normalisation and similarity (issue 17, item 9): a sentence-transformers model without a
`Normalize` module gives sentence-transformers' raw vectors, and eval and index rank by its
`similarity_fn_name` (dot product, or cosine when it declares none). Real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qembed import Embedder, QembedError
from qembed.data.beir import write_beir

DOCS = [
    "A man is playing a guitar on stage.", "Rice blast is a fungal disease of rice plants.",
    "Maize needs 500 to 800 mm of water over the season.", "The cat sleeps on the warm windowsill.",
    "Wheat rust spreads with wind-borne spores.", "A woman is slicing an onion in the kitchen.",
    "Farmers plant seeds in spring.", "Irrigation schedules depend on soil moisture.",
    "The stock market fell sharply today.", "Guitar", "Music", "Fungus", "Water", "Seeds", "Kitchen",
]  # fmt: skip  (short texts have the longest raw vectors: dot product favours them, cosine does not)
QUERIES = [
    "What causes rice blast?", "How much water does maize need?", "guitar music", "plant disease", "rice",
    "soil water", "irrigation water", "rainfall and crops", "a sleeping pet", "cooking",
]  # fmt: skip


def _without_normalize(minilm_path, folder, similarity: str | None):
    """MiniLM's weights as a sentence-transformers folder with no `Normalize` module (and `similarity_fn_name`)."""
    shutil.copytree(minilm_path, folder)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    shutil.rmtree(folder / "2_Normalize", ignore_errors=True)
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    st_config.pop("similarity_fn_name", None)
    if similarity is not None:
        st_config["similarity_fn_name"] = similarity
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    return folder


@pytest.fixture(scope="module")
def dot_path(minilm_path, tmp_path_factory):
    """A dot-product model (like msmarco-*-dot, TAS-B): no Normalize, `similarity_fn_name: "dot"`."""
    return _without_normalize(minilm_path, tmp_path_factory.mktemp("st") / "minilm-dot", "dot")


@pytest.fixture(scope="module")
def unnormalised_cosine_path(minilm_path, tmp_path_factory):
    """No Normalize and no `similarity_fn_name`: sentence-transformers' default, cosine."""
    return _without_normalize(minilm_path, tmp_path_factory.mktemp("st") / "minilm-raw-cosine", None)


@pytest.fixture(scope="module")
def raw_vectors(dot_path):
    """sentence-transformers' own vectors of the folder without Normalize (the reference)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(dot_path), device="cpu")
    assert st.similarity_fn_name == "dot"
    return st.encode(DOCS, convert_to_numpy=True), st.encode(QUERIES, convert_to_numpy=True)


def test_declared_normalisation_and_similarity(minilm_path, dot_path, unnormalised_cosine_path, raw_vectors,
                                               tmp_path, one_torch_thread):  # fmt: skip
    minilm = Embedder.from_pretrained(minilm_path)
    assert (minilm.normalize, minilm.similarity_fn_name, minilm.search_normalize) == (True, "cosine", True)

    dot = Embedder.from_pretrained(dot_path)
    assert (dot.normalize, dot.similarity_fn_name, dot.search_normalize) == (False, "dot", False)
    docs, _ = raw_vectors
    ours = dot.encode_documents(DOCS)
    assert np.linalg.norm(ours, axis=1).min() > 2  # not normalised: MiniLM's raw norms are about 5 to 8
    np.testing.assert_allclose(ours, docs, atol=1e-5)
    np.testing.assert_allclose(dot.encode_documents(DOCS, normalize=True), minilm.encode_documents(DOCS), atol=1e-6)

    cosine = Embedder.from_pretrained(unnormalised_cosine_path)
    assert (cosine.normalize, cosine.similarity_fn_name, cosine.search_normalize) == (False, "cosine", True)
    np.testing.assert_allclose(cosine.encode_documents(DOCS), docs, atol=1e-5)

    dot.save_pretrained(tmp_path / "saved")  # a saved copy declares the same
    again = Embedder.from_pretrained(tmp_path / "saved")
    assert (again.normalize, again.similarity_fn_name) == (False, "dot")


def test_unsupported_similarity_is_a_one_line_error(minilm_path, tmp_path):
    folder = _without_normalize(minilm_path, tmp_path / "euclidean", "euclidean")
    with pytest.raises(QembedError, match="similarity_fn_name 'euclidean' is not supported"):
        Embedder.from_pretrained(folder)


def test_eval_and_index_rank_by_the_declared_similarity(dot_path, unnormalised_cosine_path, raw_vectors,
                                                        tmp_path, one_torch_thread):  # fmt: skip
    """Qrels mark each query's best document by dot product of sentence-transformers' vectors. The dot model
    must find all of them first; the same weights declaring cosine rank some other document first."""
    docs, queries = raw_vectors
    dot_scores = queries @ docs.T
    cosine_scores = dot_scores / np.outer(np.linalg.norm(queries, axis=1), np.linalg.norm(docs, axis=1))
    best_by_dot, best_by_cosine = dot_scores.argmax(axis=1), cosine_scores.argmax(axis=1)
    cosine_recall_at_1 = float(np.mean(best_by_dot == best_by_cosine))
    assert cosine_recall_at_1 <= 0.8  # the two rankings differ on at least two queries
    dataset = tmp_path / "beir"
    write_beir(dataset, {f"d{i}": text for i, text in enumerate(DOCS)}, {f"q{i}": text for i, text in enumerate(QUERIES)},
               {"test": {f"q{i}": {f"d{best}": 1} for i, best in enumerate(best_by_dot)}})  # fmt: skip

    out = tmp_path / "eval"
    subprocess.run([sys.executable, "-m", "qembed", "eval", "--model", f"{dot_path},{unnormalised_cosine_path}",
                    "--dataset", str(dataset), "--k", "1,5", "--cache-dir", str(tmp_path / "cache"),
                    "--output", str(out), "--no-progress"], check=True, timeout=300)  # fmt: skip
    dot_entry, cosine_entry = json.loads((out / "metrics.json").read_text())
    assert dot_entry["metrics"]["recall@1"] == 1.0
    assert cosine_entry["metrics"]["recall@1"] == pytest.approx(cosine_recall_at_1)

    from qembed.cli import main
    from qembed.index.store import search_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(DOCS)))
    assert main(["index", "build", "--model", str(dot_path), "--corpus", str(corpus), "--output",
                 str(tmp_path / "index"), "--no-progress"]) == 0  # fmt: skip
    embedder = Embedder.from_pretrained(dot_path)
    for i in np.flatnonzero(best_by_dot != best_by_cosine):  # the queries where dot product and cosine differ
        hits = search_index(tmp_path / "index", embedder, QUERIES[i], top_k=3)
        order = np.argsort(-dot_scores[i])[:3]
        assert [hit.id for hit in hits] == [f"d{j}" for j in order]
        np.testing.assert_allclose([hit.score for hit in hits], dot_scores[i, order], rtol=1e-5)
