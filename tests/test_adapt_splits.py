"""The train / dev / test split of `qembed adapt` (qembed.data.splits): disjoint, leakage-free, seeded."""

from __future__ import annotations

import pytest

from qembed.data.beir import read_qrels, read_queries
from qembed.data.splits import SplitSizes, carve_dev, query_groups, split_queries
from qembed.errors import QembedError


@pytest.fixture(scope="module")
def agri(shared_dir, tmp_path_factory):
    """All agri-zh questions with their answers as qrels (qa_to_beir), and the query texts."""
    from qembed.data.qa_to_beir import qa_to_beir

    out = tmp_path_factory.mktemp("agri-beir")
    data = shared_dir / "data" / "agri-zh"
    qa_to_beir([data / "rice_dqa_zh.json", data / "corn_dqa_zh.json"], out, question_field="instruction",
               answer_field="output")  # fmt: skip
    qrels = {**read_qrels(out / "qrels" / "train.tsv"), **read_qrels(out / "qrels" / "test.tsv")}
    return qrels, read_queries(out / "queries.jsonl")


def _positives(qrels):
    return {d for judged in qrels.values() for d, g in judged.items() if g > 0}


def test_agri_split_is_disjoint_leakage_free_and_seeded(agri):
    qrels, texts = agri
    splits = split_queries(qrels, seed=0)
    names = list(splits)
    assert sum(len(s) for s in splits.values()) == len(qrels)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(splits[a]) & set(splits[b])
            assert not {texts[q] for q in splits[a]} & {texts[q] for q in splits[b]}  # no query text in two splits
            assert not _positives(splits[a]) & _positives(splits[b])  # no shared positive document
    # sizes: 20 % test (capped at 1000), 10 % dev (capped at 500), met to within one group
    assert abs(len(splits["test"]) - round(0.2 * len(qrels))) < 10
    assert abs(len(splits["dev"]) - round(0.1 * len(qrels))) < 10
    assert split_queries(qrels, seed=0) == splits
    assert set(split_queries(qrels, seed=1)["test"]) != set(splits["test"])


def test_queries_sharing_a_positive_stay_together():
    # q1-q2 share d1, q2-q3 share d2 (a chain); q4 alone; d9 has grade 0 and links nothing
    qrels = {"q1": {"d1": 1}, "q2": {"d1": 1, "d2": 1}, "q3": {"d2": 1, "d9": 0}, "q4": {"d4": 1, "d9": 0}}
    assert query_groups(qrels) == [["q1", "q2", "q3"], ["q4"]]
    for seed in range(10):
        splits = split_queries(qrels, SplitSizes(dev_fraction=0.0, test_fraction=0.25), seed=seed)
        sides = {q: name for name, part in splits.items() for q in part}
        assert sides["q1"] == sides["q2"] == sides["q3"]


def test_given_test_split_keeps_train_away_from_its_positives():
    train = {"a": {"d1": 1}, "b": {"d5": 1}, "c": {"d6": 1}, "t1": {"d2": 1}, **{f"x{i}": {f"e{i}": 1} for i in range(20)}}
    test = {"t1": {"d2": 1}, "t2": {"d1": 1}}
    splits = carve_dev(train, test, SplitSizes(dev_fraction=0.2), seed=0)
    assert splits["test"] == test
    assert "a" not in splits["train"] and "a" not in splits["dev"]  # shares d1 with test query t2
    assert "t1" not in splits["train"]  # a test query
    assert len(splits["dev"]) == 4 and not set(splits["dev"]) & set(splits["train"])
    with pytest.raises(QembedError, match="no train query"):
        carve_dev({"a": {"d1": 1}}, test)


def test_train_carves_its_dev_split_the_same_way(tmp_path):
    """`qembed train`'s dev split of a folder without qrels/dev.tsv is `carve_dev`: queries sharing a positive
    stay on one side, and none shares a positive with a test query."""
    from qembed.data.beir import write_beir
    from qembed.train.evalsplit import load_eval_dataset

    # 40 train queries in pairs sharing a document (q2i, q2i+1 -> d_i); t0 is a test query on d0
    train = {f"q{i}": {f"d{i // 2}": 1} for i in range(40)}
    test = {"t0": {"d0": 1}}
    corpus = {f"d{i}": f"document {i}" for i in range(20)}
    write_beir(tmp_path, corpus, {q: f"question {q}" for q in [*train, *test]}, {"train": train, "test": test})
    for seed in range(5):
        dev = load_eval_dataset(tmp_path, "dev", seed=seed)
        assert set(dev.queries) == set(carve_dev(train, test, SplitSizes(dev_fraction=0.1, max_dev=1000), seed=seed)["dev"])
        assert 4 <= len(dev.queries) <= 5 and not {"q0", "q1"} & set(dev.queries)  # q0, q1 share d0 with t0
        for qid in dev.queries:
            partner = f"q{int(qid[1:]) ^ 1}"
            assert partner in dev.queries  # the pair sharing a document is never divided
