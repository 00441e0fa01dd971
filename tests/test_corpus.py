"""The one corpus reader (`qembed.data.corpus`), the training-pair schema (`qembed.data.pairs`) and the
shared text rules, through the paths users take (`qembed embed`, `qembed synth`'s corpus, BEIR folders)."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from qembed.cli import main
from qembed.data.corpus import (
    CorpusFile,
    Document,
    check_corpus,
    iter_corpus,
    open_corpus,
    read_corpus,
    read_texts,
)
from qembed.data.pairs import read_pairs
from qembed.data.text import join_title, normalize_text
from qembed.errors import QembedError


def _jsonl(path, records):
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in records), encoding="utf-8")
    return path


def test_formats_and_the_one_id_convention(tmp_path):
    beir = tmp_path / "beir"
    beir.mkdir()
    _jsonl(beir / "corpus.jsonl", [{"_id": "a", "title": "Rice", "text": "blast "}, {"_id": 7, "title": None, "text": "maize"}])
    assert list(iter_corpus(beir)) == [Document("a", "Rice blast"), Document("7", "maize")]
    # `_id`, else `id`, else the 1-based line number (blank lines counted, as an editor shows them)
    plain = _jsonl(tmp_path / "plain.jsonl", [{"id": "x", "text": "one"}, "", {"text": "three"}, {"text": "  "}])
    assert read_corpus(plain) == {"x": "one", "3": "three"}  # the blank document is skipped
    assert [d.doc_id for d in iter_corpus(plain, keep_blank=True)] == ["x", "3", "4"]
    txt = tmp_path / "docs.txt"
    txt.write_text("first\n\n third \n", encoding="utf-8")
    assert list(iter_corpus(txt)) == [Document("1", "first"), Document("3", "third")]
    assert read_texts(txt) == ["first", "", "third"]  # every line, so row i is line i + 1
    assert read_corpus(txt, limit=1) == {"1": "first"}
    other = _jsonl(tmp_path / "q.jsonl", [{"_id": "q1", "query": "what", "title": "T"}])
    assert list(iter_corpus(other, text_field="query")) == [Document("q1", "T what")]


def test_a_repeated_id_is_an_error_naming_both_lines(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "1"}, {"_id": "b", "text": "2"}, "",
                                         {"_id": "a", "text": "3"}, {"_id": "c", "text": "4"}])  # fmt: skip
    expected = f"{path}:4: duplicate document id 'a', first on line 1"
    for read in (read_corpus, CorpusFile, lambda p: list(iter_corpus(p))):
        with pytest.raises(QembedError, match=expected):
            read(path)
    # an explicit id equal to another record's line-number id is a repeat too
    clash = _jsonl(tmp_path / "clash.jsonl", [{"text": "line one"}, {"_id": "1", "text": "two"}])
    with pytest.raises(QembedError, match=f"{clash}:2: duplicate document id '1', first on line 1"):
        read_corpus(clash)
    assert read_corpus(path, limit=2) == {"a": "1", "b": "2"}  # the repeat lies beyond what was read


def test_parquet_corpus_reads_as_its_jsonl_records(shared_dir, tmp_path):
    """A Parquet corpus is the same records in rows: the same documents and ids (row numbers where a row has
    no id), the same errors naming file:row, and a `CorpusFile` that reads a row back by its row group."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    jsonl = shared_dir / "data" / "nfcorpus" / "corpus.jsonl"
    records = [json.loads(line) for line in jsonl.open(encoding="utf-8")]
    records[5] = {"title": "no id", "text": records[5]["text"]}  # its id: the row number, 6
    records[7] = {"_id": records[7]["_id"], "text": "  "}  # blank: skipped
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet, row_group_size=500)
    mirror = _jsonl(tmp_path / "corpus.jsonl", records)
    assert list(iter_corpus(parquet)) == list(iter_corpus(mirror))
    assert read_corpus(parquet)["6"].startswith("no id ") and check_corpus(parquet) == len(records) == 3633
    disk = CorpusFile(parquet)
    assert list(disk) == list(read_corpus(mirror))
    assert [disk[doc_id] for doc_id in ("MED-10", "6", list(disk)[-1], list(disk)[600])] == [
        read_corpus(mirror)[doc_id] for doc_id in ("MED-10", "6", list(disk)[-1], list(disk)[600])]  # fmt: skip
    records[2000]["_id"] = records[3]["_id"]
    numbers = [{"_id": "a", "text": 1}, {"_id": "b", "text": 2}]  # a column of numbers, not texts
    for bad, message in ((records, r"corpus.parquet:2001: duplicate document id '.+', first on line 4"),
                         (numbers, r"corpus.parquet:1: no field 'text' holding a string")):  # fmt: skip
        pq.write_table(pa.Table.from_pylist(bad), parquet)
        with pytest.raises(QembedError, match=message):
            check_corpus(parquet)


def test_corpus_file_equals_the_in_memory_corpus_on_nfcorpus(shared_dir):
    path = shared_dir / "data" / "nfcorpus" / "corpus.jsonl"
    memory = open_corpus(path)
    tracemalloc.start()
    disk = open_corpus(path, in_memory=False)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert isinstance(memory, dict) and isinstance(disk, CorpusFile)
    assert list(disk) == list(memory) and len(disk) == len(memory) == 3633
    assert list(disk.values()) == list(memory.values())
    assert disk["MED-10"] == memory["MED-10"] and "MED-10" in disk and "nope" not in disk
    text_bytes = sum(len(t.encode()) for t in memory.values())
    assert held < text_bytes / 4  # ids and offsets, not the text (about 5.6 MB here)


@pytest.mark.parametrize(
    "content, name, message",
    [
        ('{"_id": "a", "text": "ok"}\n{oops\n', "c.jsonl", r"c.jsonl:2: invalid JSON line"),
        ('{"_id": "a", "body": "ok"}\n', "c.jsonl", r"c.jsonl:1: no field 'text' holding a string \(fields: \['_id', 'body'\]\)"),
        ('{"_id": "a", "text": "ok", "title": 3}\n', "c.jsonl", r"c.jsonl:1: 'title' must be a string"),
        ('{"_id": ["a"], "text": "ok"}\n', "c.jsonl", r"c.jsonl:1: '_id' must be a non-empty string or number"),
        ("\n\n", "c.jsonl", r"c.jsonl: the corpus is empty"),
        (b"ok\n\xff\n", "c.txt", r"c.txt:2: not valid UTF-8"),
    ],
)
def test_bad_corpora_are_one_clear_error(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for read in (read_corpus, CorpusFile):
        with pytest.raises(QembedError, match=message) as info:
            read(path)
        assert "\n" not in str(info.value)
    with pytest.raises(QembedError, match="file not found"):
        read_corpus(tmp_path / "missing.jsonl")


def test_pair_schema_is_checked_in_one_place(tmp_path):
    good = _jsonl(tmp_path / "p.jsonl", [{"query": "q", "pos": "p", "neg": ["n"], "instruction": "find", "x": 1},
                                         "", {"query": "q2", "pos": ["a", "b"], "pos_ids": [1, "d2"]}])  # fmt: skip
    first, second = read_pairs(good)
    assert (first.pos, first.neg, first.instruction, first.record["x"]) == (["p"], ["n"], "find", 1)
    assert second.pos_ids == ["1", "d2"] and second.neg == []
    for record, message in [
        ({"pos": ["p"]}, "'query' must be a non-empty string"),
        ({"query": "q", "pos": []}, "'pos' must be a non-empty list of strings"),
        ({"query": "q", "pos": ["p"], "neg": [1]}, "'neg' must be a list of strings"),
        ({"query": "q", "pos": ["p"], "instruction": 3}, "'instruction' must be a string"),
        ({"query": "q", "pos": ["p"], "pos_ids": ["a", "b"]}, "'pos_ids' must be a list as long as 'pos'"),
    ]:
        bad = _jsonl(tmp_path / "bad.jsonl", [{"query": "ok", "pos": "p"}, "", record])
        with pytest.raises(QembedError, match=rf"bad.jsonl:3: {message}"):
            read_pairs(bad)
    with pytest.raises(QembedError, match="no training records"):
        read_pairs(_jsonl(tmp_path / "empty.jsonl", []))


def test_text_rules():
    assert join_title("Title", "body ") == "Title body" and join_title(None, " x ") == "x" and join_title("", "y") == "y"
    assert normalize_text("  How to control RICE-blast disease?? ") == "how to control rice blast disease"
    assert normalize_text("水稻，怎么种？") == normalize_text("水稻 怎么种")
    assert normalize_text("ｆｕｌｌ\u3000ｗｉｄｔｈ\u00a0Ｘ") == "full width x"  # NFKC


def test_embed_carries_ids_through(tiny_embedder_path, tmp_path):
    from qembed import Embedder

    source = _jsonl(tmp_path / "docs.jsonl", [{"_id": "d1", "title": "Rice", "text": "blast"}, {"id": 5, "text": "maize"},
                                              {"text": "wheat"}])  # fmt: skip
    out = tmp_path / "o.jsonl"
    assert main(["embed", "--model", str(tiny_embedder_path), "--input", str(source), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["id"], r["text"]) for r in rows] == [(0, "d1", "Rice blast"), (1, "5", "maize"), (2, "3", "wheat")]
    expected = Embedder.from_pretrained(tiny_embedder_path).encode_documents(["Rice blast", "maize", "wheat"])
    np.testing.assert_allclose([r["embedding"] for r in rows], expected, atol=1e-6)
