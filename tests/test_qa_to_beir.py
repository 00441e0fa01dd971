"""QA pairs -> BEIR folder: the real agri-zh files, the split, dedup counts, formats and bad input."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest

from qembed.cli import main
from qembed.data.beir import RetrievalDataset
from qembed.data.jsonl import read_jsonl
from qembed.data.qa_to_beir import qa_to_beir
from qembed.errors import QembedError


@pytest.fixture(scope="module")
def agri_files(shared_dir):
    folder = shared_dir / "data" / "agri-zh"
    return [folder / "rice_dqa_zh.json", folder / "corn_dqa_zh.json"]


def test_agri_zh_conversion(agri_files, tmp_path, capsys):
    out = tmp_path / "agri"
    code = main(["data", "qa-to-beir", "--input", str(agri_files[0]), "--input", str(agri_files[1]),
                 "--question-field", "instruction", "--answer-field", "output", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out

    # Expected figures computed straight from the raw rows.
    rows = [r for f in agri_files for r in json.loads(f.read_text(encoding="utf-8"))]
    usable = [(r["instruction"].strip(), r["output"].strip()) for r in rows
              if r["instruction"].strip() and r["output"].strip()]
    answers_of = defaultdict(set)
    for question, answer in usable:
        answers_of[question].add(answer)
    distinct_answers = {a for _, a in usable}
    assert f"rows read: {len(rows)}" in printed
    assert f"rows skipped (empty instruction): {len(rows) - len(usable)}" in printed
    assert f"duplicate answers merged: {len(usable) - len(distinct_answers)}" in printed
    assert f"repeated questions merged: {len(usable) - len(answers_of)}" in printed

    corpus = {d["_id"]: d["text"] for d in read_jsonl(out / "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in read_jsonl(out / "queries.jsonl")}
    assert sorted(corpus.values()) == sorted(distinct_answers)
    assert sorted(queries.values()) == sorted(answers_of)

    test = RetrievalDataset.load(out, split="test")
    train = RetrievalDataset.load(out, split="train")
    dev = RetrievalDataset.load(out, split="dev")
    assert not set(test.queries) & set(train.queries) and not set(dev.queries) & (set(train.queries) | set(test.queries))
    assert len(test.queries) + len(dev.queries) + len(train.queries) == len(answers_of)
    # 20 % test, 10 % dev: whole groups (questions sharing an answer) overshoot a little
    n = len(answers_of)
    assert round(0.2 * n) <= len(test.queries) < round(0.2 * n) + 10
    assert round(0.1 * n) <= len(dev.queries) < round(0.1 * n) + 10
    for split in (test, dev, train):
        for qid, judged in split.qrels.items():
            assert {corpus[d] for d in judged} == answers_of[queries[qid]]
            assert set(judged.values()) == {1}


def test_split_is_seeded_and_capped(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i % 40}"} for i in range(100)]
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for name, seed, num in [("a", 0, 1000), ("b", 0, 1000), ("c", 1, 1000), ("d", 0, 7)]:
        summary = qa_to_beir(src, tmp_path / name, question_field="q", answer_field="a",
                             seed=seed, num_queries=num, test_fraction=0.3, dev_fraction=0.0)
        runs[name] = set(RetrievalDataset.load(tmp_path / name).queries)
        # questions sharing an answer form groups of 2-3, kept whole: the test size overshoots by < one group
        assert min(num, 30) <= summary.num_test < min(num, 30) + 3 and summary.num_train == 100 - summary.num_test
        assert summary.duplicate_answers == 60 and summary.num_docs == 40
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    assert 7 <= len(runs["d"]) < 10


def test_csv_in_gb18030_and_skipped_rows(tmp_path, capsys):
    src = tmp_path / "qa.csv"
    src.write_bytes("问题,答案\n玉米怎么种？,春季播种\n玉米怎么种？,施肥\n水稻何时收？,秋季\n空答案？,\n".encode("gb18030"))
    code = main(["data", "qa-to-beir", "--input", str(src), "--encoding", "gb18030", "--question-field", "问题",
                 "--answer-field", "答案", "--test-fraction", "0.5", "--output", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "rows read: 4" in printed and "rows skipped (empty 答案): 1" in printed
    assert "repeated questions merged: 1" in printed
    ds = RetrievalDataset.load(tmp_path / "out", split="test")
    train = RetrievalDataset.load(tmp_path / "out", split="train")
    merged = {**ds.qrels, **train.qrels}
    assert sorted(len(j) for j in merged.values()) == [1, 2]  # the repeated question has both answers


@pytest.mark.parametrize(
    "content, args, message",
    [
        (b'[{"q": "a", "a": "b"}]', ["--encoding", "klingon-8"], "unknown encoding 'klingon-8'"),
        ("[{\"q\": \"问\", \"a\": \"答\"}]".encode("gb18030"), [], "not valid utf-8"),
        (b'{"q": "a", "a": "b"}\n{"q": broken\n', ["--format", "jsonl"], r"qa.json:2: invalid JSON line"),
        (b'[{"question": "a", "a": "b"}]', [], r"no row has the question field 'q' \(fields: \['a', 'question'\]\)"),
        (b'[{"q": "a", "a": "b"}]', ["--test-fraction", "0.1"], "no test queries"),
        (b'{"q": "a"}', [], "expected a JSON array of objects"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, capsys, content, args, message):
    src = tmp_path / "qa.json"
    src.write_bytes(content)
    code = main(["data", "qa-to-beir", "--input", str(src), "--question-field", "q", "--answer-field", "a",
                 "--output", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_missing_input_and_unknown_extension(tmp_path):
    with pytest.raises(QembedError, match="file not found"):
        qa_to_beir(tmp_path / "none.json", tmp_path / "out", question_field="q", answer_field="a")
    (tmp_path / "qa.txt").write_text("x")
    with pytest.raises(QembedError, match="pass --format"):
        qa_to_beir(tmp_path / "qa.txt", tmp_path / "out", question_field="q", answer_field="a")
