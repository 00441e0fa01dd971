"""BEIR folder loading and writing: real NFCorpus, round trip, and bad input."""

from __future__ import annotations

import json
import logging

import pytest

from qembed.data.beir import RetrievalDataset, write_beir
from qembed.data.corpus import CorpusFile
from qembed.errors import QembedError


def _write(path, corpus_lines, query_lines, qrels_text, split="test"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "corpus.jsonl").write_text("".join(line + "\n" for line in corpus_lines), encoding="utf-8")
    (path / "queries.jsonl").write_text("".join(line + "\n" for line in query_lines), encoding="utf-8")
    (path / "qrels").mkdir(exist_ok=True)
    (path / "qrels" / f"{split}.tsv").write_text(qrels_text, encoding="utf-8")
    return path


def _doc(i, title="", text="t"):
    return json.dumps({"_id": i, "title": title, "text": text})


def _query(i, text="q"):
    return json.dumps({"_id": i, "text": text})


def test_nfcorpus_test_split(shared_dir):
    ds = RetrievalDataset.load(shared_dir / "data" / "nfcorpus", split="test")
    assert len(ds.corpus) == 3633
    assert len(ds.queries) == 323 and set(ds.queries) == set(ds.qrels)
    assert sum(len(j) for j in ds.qrels.values()) == 12334
    assert {g for j in ds.qrels.values() for g in j.values()} == {1, 2}
    raw = next(json.loads(line) for line in (shared_dir / "data/nfcorpus/corpus.jsonl").open() if '"MED-10"' in line)
    assert ds.doc_text("MED-10") == ds.corpus["MED-10"] == f"{raw['title']} {raw['text']}".strip()
    assert ds.doc_texts()[ds.doc_ids.index("MED-10")] == ds.doc_text("MED-10")


def test_round_trip_and_text_joining(tmp_path):
    corpus = {"d1": {"title": "Title", "text": "body"}, "d2": {"title": "", "text": " only text "}}
    queries = {"q1": "first", "q2": "second", "q3": "unjudged"}
    write_beir(tmp_path / "ds", corpus, queries, {"test": {"q1": {"d1": 2, "d2": 0}}, "train": {"q2": {"d2": 1}}})
    test = RetrievalDataset.load(tmp_path / "ds")
    assert test.qrels == {"q1": {"d1": 2, "d2": 0}}
    assert test.queries == {"q1": "first"}  # only queries judged in the split
    assert test.doc_texts() == ["Title body", "only text"] and test.corpus == {"d1": "Title body", "d2": "only text"}
    train = RetrievalDataset.load(tmp_path / "ds", split="train")
    assert train.queries == {"q2": "second"}
    train.save(tmp_path / "copy")
    again = RetrievalDataset.load(tmp_path / "copy", split="train")
    assert (again.corpus, again.queries, again.qrels) == (train.corpus, train.queries, train.qrels)


def test_unknown_ids_are_warned_and_skipped(tmp_path, caplog):
    path = _write(tmp_path / "ds", [_doc("d1"), _doc("d2")], [_query("q1"), _query("q2")],
                  "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tmissing\t1\nq1\tgone\t2\nq2\tgone\t1\nq9\td1\t1\n")
    with caplog.at_level(logging.WARNING):
        ds = RetrievalDataset.load(path)
    assert ds.qrels == {"q1": {"d1": 1}}  # q2 has no judged doc left, q9 is not a query
    assert ds.skipped == {"unknown_docs": 3, "unknown_queries": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped 3 judgment(s) naming a document absent" in m for m in messages)
    assert any("skipped 1 judgment(s) naming a query absent" in m for m in messages)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.joinpath("corpus.jsonl").unlink(), "file not found: .*corpus.jsonl"),
        (lambda p: p.joinpath("queries.jsonl").unlink(), "file not found: .*queries.jsonl"),
        (lambda p: p.joinpath("qrels", "test.tsv").unlink(), r"no qrels for split 'test'.*available: \['train'\]"),
        (lambda p: p.joinpath("corpus.jsonl").write_text(""), "the corpus is empty"),
        (lambda p: p.joinpath("corpus.jsonl").write_text(_doc("d1") + "\n{oops\n"), r"corpus.jsonl:2: invalid JSON"),
        (lambda p: p.joinpath("queries.jsonl").write_text('{"text": "no id"}\n'), r"queries.jsonl:1: no '_id'"),
        (lambda p: p.joinpath("qrels", "test.tsv").write_text("query-id\tcorpus-id\tscore\n"), "no query of split"),
        (lambda p: p.joinpath("qrels", "test.tsv").write_text("h\th\th\nq1\td1\thigh\n"), r"test.tsv:2: score 'high'"),
        (lambda p: p.joinpath("qrels", "test.tsv").write_text("q1 d1 1\n"), "test.tsv:1: expected 3 tab-separated"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, setup, message):
    path = _write(tmp_path / "ds", [_doc("d1")], [_query("q1")], "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    (path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    setup(path)
    with pytest.raises(QembedError, match=message) as info:
        RetrievalDataset.load(path)
    assert "\n" not in str(info.value)


def test_missing_folder(tmp_path):
    with pytest.raises(QembedError, match="dataset folder not found"):
        RetrievalDataset.load(tmp_path / "nope")


def test_disk_corpus_matches_in_memory(shared_dir, tmp_path):
    nf = shared_dir / "data" / "nfcorpus"
    memory = RetrievalDataset.load(nf, in_memory=True)
    disk = RetrievalDataset.load(nf, in_memory=False)
    assert disk.doc_ids == memory.doc_ids and disk.qrels == memory.qrels
    assert list(disk.iter_doc_texts()) == memory.doc_texts()
    assert disk.doc_text("MED-10") == memory.doc_text("MED-10") and "MED-10" in disk.corpus
    assert isinstance(disk.corpus, CorpusFile) and isinstance(memory.corpus, dict)
    # A repeated id is the same error in both readers, naming both lines.
    path = _write(tmp_path / "dup", [_doc("a", text="1"), _doc("b", text="2"), _doc("a", text="3"), _doc("c")],
                  [_query("q")], "q\ta\t1\n")
    for in_memory in (True, False):
        with pytest.raises(QembedError, match=r"corpus.jsonl:3: duplicate document id 'a', first on line 1"):
            RetrievalDataset.load(path, in_memory=in_memory)
    (path / "corpus.jsonl").write_text(_doc("a") + "\n\n[1]\n")
    with pytest.raises(QembedError, match=r"corpus.jsonl:3: expected a JSON object"):
        RetrievalDataset.load(path, in_memory=False)
