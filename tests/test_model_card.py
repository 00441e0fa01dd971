"""Model cards of `qembed train` and `qembed merge` outputs (`adapt`'s `best/`: tests/test_adapt.py): YAML front
matter that parses, `model-index` figures equal to the evaluation qembed logged, the base model's hub id and
license, usage with the Qwen3 instruction, and the folder still loaded as is by sentence-transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qembed.cli import main
from qembed.data.beir import write_beir
from qembed.models.card import base_model_info, read_front_matter
from qembed.models.layout import declares_matryoshka
from qembed.models.prompts import DEFAULT_QUERY_INSTRUCTION

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CROPS = ["rice", "maize", "wheat", "soybean", "potato", "tomato", "cotton", "barley"]
SNAPSHOT = "models--Qwen--Qwen3-Embedding-0.6B/snapshots/" + "0" * 40


@pytest.fixture(scope="module")
def hub_base(tiny_embedder_path, tmp_path_factory) -> Path:
    """The tiny model where a hub download lives: `<cache>/models--Qwen--Qwen3-Embedding-0.6B/snapshots/<commit>`."""
    path = tmp_path_factory.mktemp("hub") / SNAPSHOT
    shutil.copytree(tiny_embedder_path, path)
    return path


@pytest.fixture(scope="module")
def trained(hub_base, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("card")
    rows = [{"query": f"how to grow {c}", "pos": [f"{c} growing guide"], "neg": [f"{CROPS[i - 1]} market prices"],
             **({"instruction": "Find the crop guide"} if i % 2 else {})} for i, c in enumerate(CROPS)]  # fmt: skip
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_beir(folder / "beir", {f"d{i}": {"text": f"{c} growing guide"} for i, c in enumerate(CROPS)},
               {f"q{i}": f"how to grow {c}" for i, c in enumerate(CROPS)},
               {"test": {f"q{i}": {f"d{i}": 1} for i in range(len(CROPS))}})  # fmt: skip
    out = folder / "model"
    assert main(["train", "embedder", "--model", str(hub_base), "--data", str(folder / "pairs.jsonl"), "--output",
                 str(out), "--batch-size", "4", "--max-steps", "2", "--full", "--eval-dataset", str(folder / "beir"),
                 "--eval-split", "test", "--eval-steps", "2", "--no-progress"]) == 0  # fmt: skip
    return out


def _st_matches_qembed(folder: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from qembed import Embedder

    texts = ["how to grow rice", "rice growing guide"]
    st = SentenceTransformer(str(folder), device="cpu")
    ours = Embedder.from_pretrained(folder, device="cpu")
    assert np.allclose(st.encode(texts[:1], prompt_name="query"), ours.encode_queries(texts[:1]), atol=1e-4)
    assert np.allclose(st.encode(texts[1:]), ours.encode_documents(texts[1:]), atol=1e-4)


def test_train_card(trained):
    card = (trained / "README.md").read_text()
    meta = read_front_matter(trained / "README.md")
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["base_model"] == "Qwen/Qwen3-Embedding-0.6B" and meta["license"] == "apache-2.0"  # from the base's card
    assert {"sentence-transformers", "qembed", "fine-tuned", "matryoshka"} <= set(meta["tags"])
    [index] = meta["model-index"]
    [result] = index["results"]
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    [logged] = [r["eval"] for r in log if "eval" in r and r["step"] == 2]
    # the dataset named as reports name it: a folder called `beir` by its parent folder (here the test's tmp folder)
    assert result["dataset"]["split"] == "test" and result["dataset"]["name"] == trained.parent.name != "beir"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {k.replace("@", "_at_"): v for k, v in logged.items()}
    assert DEFAULT_QUERY_INSTRUCTION in card and 'prompt_name="query"' in card and "Embedder.from_pretrained" in card
    assert "- records: 8;" in card and "records with their own instruction: 4 (1 distinct)" in card
    assert "| batch_size | 4 |" in card and "| steps | 2 |" in card
    assert declares_matryoshka(trained)  # the base declared Matryoshka support; the card keeps saying so
    _st_matches_qembed(trained)


def test_merge_card(trained, hub_base, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--method", "slerp", "--models", f"{hub_base},{trained}", "--t", "0.5", "--output", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    meta = read_front_matter(out / "README.md")  # the base's copied card is replaced by the merge's
    assert meta["base_model"] == "Qwen/Qwen3-Embedding-0.6B" and "merge" in meta["tags"] and "model-index" not in meta
    card = (out / "README.md").read_text()
    assert "spherical interpolation (slerp) at t = 0.5" in card and f"`{trained}`" in card
    assert declares_matryoshka(out)
    _st_matches_qembed(out)


def test_base_model_of_a_local_chain(trained, tmp_path):
    # a model trained from a local qembed model names the nearest ancestor with a hub id, and its license
    assert base_model_info(str(trained)) == ("Qwen/Qwen3-Embedding-0.6B", "apache-2.0")
    assert base_model_info("Qwen/Qwen3-Embedding-0.6B") == ("Qwen/Qwen3-Embedding-0.6B", None)  # not cached here
    assert base_model_info(str(tmp_path)) == (None, None)


def test_reranker_card(tiny_reranker_path, trained, tmp_path):
    from qembed import Reranker

    out = tmp_path / "reranker"
    data = trained.parent / "pairs.jsonl"
    assert main(["train", "reranker", "--model", str(tiny_reranker_path), "--data", str(data), "--output", str(out),
                 "--batch-size", "4", "--max-steps", "1", "--full", "--no-progress"]) == 0  # fmt: skip
    meta = read_front_matter(out / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-ranking"
    assert "base_model" not in meta and "reranker" in meta["tags"] and "matryoshka" not in meta["tags"]
    assert "Reranker.from_pretrained" in (out / "README.md").read_text()
    assert len(Reranker.from_pretrained(out).score("rice", ["rice growing guide"])) == 1
