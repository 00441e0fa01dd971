"""Evaluation during training: a dev split (carved from train queries when the dataset has none, disjoint from
test and left out of training), the inference max length, and one evaluation at the end."""

import json
import logging

import pytest

from qembed.data.beir import write_beir
from qembed.errors import QembedError
from qembed.train.data import TrainRecord
from qembed.train.evalsplit import CARVED, held_out, load_eval_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOPICS = ["rice", "maize", "wheat", "soybean", "potato", "tomato", "cotton", "barley", "millet", "sorghum",
          "cassava", "peanut", "sugarcane", "tea", "coffee", "banana", "apple", "grape", "citrus", "mango"]  # fmt: skip
PREFIX = "This guidance note for smallholder growers and extension officers covers"


def _beir(path, splits):
    corpus = {f"d{i}": {"text": f"{PREFIX} {t} disease control"} for i, t in enumerate(TOPICS)}
    queries = {f"q{i}": f"{t} disease" for i, t in enumerate(TOPICS)}
    qrels = {name: {f"q{i}": {f"d{i}": 1} for i in ids} for name, ids in splits.items()}
    write_beir(path, corpus, queries, qrels)
    return path


def test_dev_split_carved_from_train_disjoint_from_test(tmp_path, caplog):
    beir = _beir(tmp_path / "b", {"train": range(0, 18), "test": [0, 1, 18, 19]})
    with caplog.at_level(logging.WARNING, logger="qembed"):
        dev = load_eval_dataset(beir, "dev", seed=0)
    assert dev.split == CARVED and "no dev split" in caplog.text
    assert len(dev.queries) == 2 and not set(dev.queries) & {"q0", "q1", "q18", "q19"}  # 10% of 16 candidates
    assert load_eval_dataset(beir, "dev", seed=0).queries == dev.queries
    assert any(load_eval_dataset(beir, "dev", seed=s).queries != dev.queries for s in (1, 2, 3))
    records = [TrainRecord(query=f"{t} disease", pos=["p"], neg=[]) for t in TOPICS]
    kept = held_out(records, dev)
    assert len(kept) == len(records) - 2 and not {r.query for r in kept} & set(dev.queries.values())

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qembed"):
        test = load_eval_dataset(beir, "test", seed=0)
    assert test.split == "test" and "TEST split" in caplog.text
    assert held_out(records, test) == records

    with_dev = _beir(tmp_path / "c", {"train": range(0, 10), "dev": [10, 11], "test": [12]})
    assert set(load_eval_dataset(with_dev, "dev", seed=0).queries) == {"q10", "q11"}
    with pytest.raises(QembedError, match="no dev split and no train split"):
        load_eval_dataset(_beir(tmp_path / "d", {"test": [0]}), "dev", seed=0)


def test_eval_at_inference_length_once_at_end_on_dev(tiny_embedder_path, tmp_path):
    from qembed import Embedder
    from qembed.train.embedder import evaluate_embedder, train_embedder
    from qembed.train.loop import TrainConfig

    beir = _beir(tmp_path / "beir", {"train": range(20)})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": f"{t} disease", "pos": [f"{t} disease control"]}) + "\n"
                            for t in TOPICS))  # fmt: skip
    out = tmp_path / "out"
    # 8-token training truncation cuts every document to the same prefix; evaluation must not
    cfg = TrainConfig(model=str(tiny_embedder_path), data=[str(data)], output=str(out), batch_size=3, lr=1e-3,
                      max_length=8, eval_dataset=str(beir), save_steps=0, progress=False, seed=1)  # fmt: skip
    result = train_embedder(cfg)
    assert result.steps == 6  # 18 records in batches of 3: the 2 dev queries' records were left out
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval" in r]
    assert len(evals) == 1 and evals[0]["step"] == 6 and evals[0]["split"] == CARVED
    dev = load_eval_dataset(beir, "dev", seed=1)
    want = evaluate_embedder(Embedder.from_pretrained(out, device="cpu"), dev)
    assert evals[0]["eval"] == pytest.approx(want, abs=1e-6)
