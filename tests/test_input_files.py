"""Input files on the paths users take (`qembed <verb>` through the CLI's main function): one duplicate-id rule
for every verb, unencodable text reported as `file:line`, evaluation linear in queries + documents, `search`
with several queries, a resumed `mine`'s whole-output summary, and `eval --output` / `data` error rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qembed.cli import main
from qembed.data.beir import RetrievalDataset, dataset_name

TOPICS = ["rice blast", "wheat rust", "maize borer", "soybean cyst", "potato blight", "tea mites"]


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _beir(folder: Path, corpus: list | None = None, queries: list | None = None) -> Path:
    """A small BEIR folder: 3 documents per topic, one query per topic judging its first two documents."""
    docs = [{"_id": f"d{i}{x}", "title": t if x == "a" else "", "text": s}
            for i, t in enumerate(TOPICS)
            for x, s in (("a", f"Spray early to control {t}."), ("b", f"{t} spreads in wet weather."),
                         ("c", f"Prices of crops hit by {t} rose."))]  # fmt: skip
    _jsonl(folder / "corpus.jsonl", corpus if corpus is not None else docs)
    _jsonl(folder / "queries.jsonl", queries if queries is not None else
           [{"_id": f"q{i}", "text": f"how to control {t}?"} for i, t in enumerate(TOPICS)])  # fmt: skip
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    rows = [f"q{i}\td{i}a\t2\nq{i}\td{i}b\t1\n" for i in range(len(TOPICS))]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(rows), encoding="utf-8")
    return folder


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(capsys, *argv) -> str:
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


# ------------------------------------------------------------------------------------------ duplicate ids
def test_a_duplicate_id_is_refused_by_every_verb_before_any_model_work(tmp_path, capsys):
    """The model does not exist: a verb that loaded it (or encoded anything) before reading its input would
    fail on the model instead. Every verb names the file and both lines."""
    docs = [{"_id": "a", "text": "one"}, {"_id": "b", "text": "two"}, {"_id": "a", "text": "three"}]
    beir = _beir(tmp_path / "dup" / "beir", corpus=docs, queries=[{"_id": "q", "text": "x"}])
    (beir / "qrels" / "test.tsv").write_text("q\ta\t1\n", encoding="utf-8")
    (beir / "qrels" / "train.tsv").write_text("q\ta\t1\n", encoding="utf-8")
    corpus = beir / "corpus.jsonl"
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"query": "x", "pos": ["one"]}])
    missing = tmp_path / "no-such-model"
    expected = f"{corpus}:3: duplicate document id 'a', first on line 1"
    for argv in (
        ["index", "build", "--model", missing, "--corpus", beir, "--output", tmp_path / "idx"],
        ["eval", "--model", missing, "--dataset", beir, "--output", tmp_path / "eval"],
        ["mine", "--model", missing, "--input", pairs, "--corpus", corpus, "--output", tmp_path / "m.jsonl"],
        ["mine", "--model", missing, "--input", beir, "--output", tmp_path / "m2.jsonl"],
        ["embed", "--model", missing, "--input", corpus, "--output", tmp_path / "e.npy"],
    ):
        err = _one_line_error(capsys, *argv)
        assert expected in err, (argv[0], err)
    assert not (tmp_path / "idx").exists() and not (tmp_path / "e.npy").exists()

    queries = _beir(tmp_path / "dupq", queries=[{"_id": "q0", "text": "a"}, {"_id": "q1", "text": "b"},
                                                {"_id": "q0", "text": "c"}])  # fmt: skip
    err = _one_line_error(capsys, "eval", "--model", missing, "--dataset", queries, "--output", tmp_path / "e2")
    assert f"{queries / 'queries.jsonl'}:3: duplicate query id 'q0', first on line 1" in err


# ---------------------------------------------------------------------------------- unencodable text
def test_a_lone_surrogate_is_a_file_line_error_in_every_file_verb(tmp_path, capsys):
    """JSON's "\\ud800" parses to a string no tokenizer or UTF-8 writer takes: each verb stops on it before
    loading the (missing) model, naming the file and line."""
    missing = tmp_path / "no-such-model"
    beir = _beir(tmp_path / "s" / "beir")
    corpus = beir / "corpus.jsonl"
    lines = corpus.read_text(encoding="utf-8").splitlines()
    lines[4] = '{"_id": "bad", "text": "blight \\ud800 here"}'
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "ok", "pos": ["fine \\ud83d\\ude00"]}\n{"query": "bad \\udc00", "pos": ["p"]}\n',
                     encoding="utf-8")  # fmt: skip
    qa_json = tmp_path / "qa.json"
    qa_json.write_text('[\n{"q": "ok", "a": "x"},\n{"q": "bad \\ud800", "a": "y"}\n]\n', encoding="utf-8")
    qa_jsonl = _jsonl(tmp_path / "qa.jsonl", ['{"q": "ok", "a": "x"}', '{"q": "b", "a": "\\udfff"}'])
    qa = ["--question-field", "q", "--answer-field", "a", "--output", tmp_path / "qa-out"]
    cases = [
        (["embed", "--model", missing, "--input", corpus, "--output", tmp_path / "e.npy"], f"{corpus}:5:"),
        (["eval", "--model", missing, "--dataset", beir, "--output", tmp_path / "ev"], f"{corpus}:5:"),
        (["index", "build", "--model", missing, "--corpus", beir, "--output", tmp_path / "ix"], f"{corpus}:5:"),
        (["mine", "--model", missing, "--input", pairs, "--output", tmp_path / "m.jsonl"], f"{pairs}:2:"),
        (["filter", "--model", missing, "--input", pairs, "--output", tmp_path / "f.jsonl"], f"{pairs}:2:"),
        (["train", "embedder", "--model", missing, "--data", pairs, "--output", tmp_path / "t"], f"{pairs}:2:"),
        (["data", "convert", "--input", pairs, "--to", "swift", "--output", tmp_path / "c.jsonl"], f"{pairs}:2:"),
        (["data", "qa-to-beir", "--input", qa_json, *qa], f"{qa_json}:3:"),
        (["data", "qa-to-beir", "--input", qa_jsonl, *qa], f"{qa_jsonl}:2:"),
    ]
    for argv, where in cases:
        err = _one_line_error(capsys, *argv)
        assert where in err and "lone UTF-16 surrogate" in err, (argv[:2], err)
    assert not (tmp_path / "c.jsonl").exists() and not (tmp_path / "qa-out").exists()
    # invalid UTF-8 in a qrels file is a file:line error too
    good = _beir(tmp_path / "q" / "beir")
    (good / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\nq0\td0a\t1\nq1\td1\xff\t1\n")
    err = _one_line_error(capsys, "eval", "--model", missing, "--dataset", good, "--output", tmp_path / "ev2")
    assert f"{good / 'qrels' / 'test.tsv'}:3: not valid UTF-8" in err


# --------------------------------------------------------------------------------------- evaluation cost
def test_doc_ids_is_built_once_not_per_query(tmp_path, tiny_embedder_path, one_torch_thread):
    from qembed import Embedder
    from qembed.eval.evaluate import evaluate

    ds = RetrievalDataset.load(_beir(tmp_path / "beir"))
    assert ds.doc_ids is ds.doc_ids and ds.doc_ids == list(ds.corpus)

    class CountingCorpus(dict):
        listed = 0

        def __iter__(self):
            CountingCorpus.listed += 1
            return super().__iter__()

    ds.corpus = CountingCorpus(ds.corpus)
    assert ds.doc_ids == list(dict.keys(ds.corpus))  # a replaced corpus is listed again, once
    CountingCorpus.listed = 0
    result = evaluate(Embedder.from_pretrained(tiny_embedder_path), ds, k=(1, 5), cache=False)[0]
    assert result["num_queries"] == len(TOPICS) == 6
    assert CountingCorpus.listed == 0  # not once per query (it was 1 + queries before)


# ------------------------------------------------------------------------------------ search, many queries
def test_search_takes_several_queries_and_loads_the_model_once(tmp_path, tiny_embedder_path, capsys,
                                                               monkeypatch, one_torch_thread):  # fmt: skip
    from qembed.models.embedder import Embedder

    beir = _beir(tmp_path / "beir")
    assert main(["index", "build", "--model", str(tiny_embedder_path), "--corpus", str(beir),
                 "--output", str(tmp_path / "idx")]) == 0  # fmt: skip
    capsys.readouterr()
    loads = []
    original = Embedder.from_pretrained.__func__
    monkeypatch.setattr(Embedder, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))  # fmt: skip
    search = ["search", "--index", tmp_path / "idx", "--top-k", "3"]
    queries = ["how to control rice blast?", "wheat rust in wet weather", "crop prices"]

    def single(query: str) -> list[str]:
        code, out, _ = _run(capsys, *search, "--query", query, "--json")
        assert code == 0
        return [h["id"] for h in json.loads(out)["results"]]

    alone = [single(q) for q in queries]
    assert len(loads) == 3
    file = tmp_path / "queries.txt"
    file.write_text(f"{queries[1]}\n\n{queries[2]}\n", encoding="utf-8")
    code, out, _ = _run(capsys, *search, "--query", queries[0], "--query-file", file, "--json")
    assert code == 0 and len(loads) == 4  # three queries, one model load
    objects = [json.loads(line) for line in out.strip().splitlines()]
    assert [o["query"] for o in objects] == queries
    assert [[h["id"] for h in o["results"]] for o in objects] == alone  # each list is that query's own

    code, out, _ = _run(capsys, *search, *(x for q in queries for x in ("--query", q)), "--json")
    assert code == 0 and [json.loads(line)["query"] for line in out.strip().splitlines()] == queries

    jsonl = _jsonl(tmp_path / "queries.jsonl", [{"text": queries[0]}, {"query": queries[1]}, {"text": queries[2]}])
    code, out, _ = _run(capsys, *search, "--query-file", jsonl)
    assert code == 0
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 3
    for number, (block, query, ids) in enumerate(zip(blocks, queries, alone), start=1):
        header, *hits = block.splitlines()
        assert header == f"# query {number}: {query}"
        assert [h.split("\t")[2] for h in hits] == ids
    code, out, _ = _run(capsys, *search, "--query", queries[0])  # one query: the plain list, as before
    assert code == 0 and [line.split("\t")[2] for line in out.strip().splitlines()] == alone[0]
    assert "give a query" in _one_line_error(capsys, *search)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "x"}, {"other": 1}])
    assert f"{bad}:2: no 'text' or 'query' field" in _one_line_error(capsys, *search, "--query-file", bad)


# --------------------------------------------------------------------------------- resumed mine summary
def test_a_resumed_mine_summarises_the_whole_output(tmp_path, tiny_embedder_path, capsys, one_torch_thread):
    beir = _beir(tmp_path / "beir")
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"query": f"about {t}", "pos": [f"{t} Spray early to control {t}."]}
                                              for t in TOPICS])  # fmt: skip
    out = tmp_path / "mined.jsonl"
    argv = ["mine", "--model", tiny_embedder_path, "--input", pairs, "--corpus", beir / "corpus.jsonl",
            "--output", out, "--range-min", "0", "--range-max", "10", "--num-negatives", "3", "--no-max-score",
            "--margin", "-0.2", "--chunk-size", "1", "--cache-dir", tmp_path / "cache"]  # fmt: skip
    code, printed, _ = _run(capsys, *argv)
    assert code == 0 and "queries mined: 6" in printed
    whole = json.loads((tmp_path / "mined.summary.json").read_text())
    full = out.read_text(encoding="utf-8")
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:25], encoding="utf-8")  # what a kill mid-line leaves
    code, printed, _ = _run(capsys, *argv)
    assert code == 0 and out.read_text(encoding="utf-8") == full
    assert "queries mined: 6 (resumed: 3 already written, 3 in this run)" in printed
    resumed = json.loads((tmp_path / "mined.summary.json").read_text())
    assert resumed["skipped_already_written"] == 3 and resumed["queries_this_run"] == 3
    for key in ("queries", "negatives", "negatives_per_query", "queries_with_fewer_negatives",
                "candidates_in_window", "removed"):  # fmt: skip
        assert resumed[key] == whole[key], key
    assert "rule_counts_cover_queries" not in resumed
    assert whole["negatives"] > 0 and whole["removed"]["positive"] > 0 and whole["removed"]["margin"] > 0
    for name in ("pos_score", "neg_score"):
        assert resumed[name]["count"] == whole[name]["count"]
        assert resumed[name]["mean"] == pytest.approx(whole[name]["mean"], abs=1e-5)


# ---------------------------------------------------------------------------------- eval output, data errors
def test_eval_output_refuses_a_users_folder_and_names_the_dataset(tmp_path, tiny_embedder_path, capsys,
                                                                  one_torch_thread):  # fmt: skip
    beir = _beir(tmp_path / "cmrc" / "beir")
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "report.md").write_text("my own notes", encoding="utf-8")
    argv = ["eval", "--model", tiny_embedder_path, "--dataset", beir, "--k", "1,5", "--cache-dir", tmp_path / "c"]
    err = _one_line_error(capsys, *argv, "--output", mine)
    assert err.startswith(f"qembed eval: error: --output {mine} is not empty")
    assert (mine / "report.md").read_text(encoding="utf-8") == "my own notes" and len(list(mine.iterdir())) == 1
    out = tmp_path / "eval-out"
    for _ in range(2):  # a folder qembed eval wrote is its own: a rerun replaces its report
        code, printed, err = _run(capsys, *argv, "--output", out)
        assert code == 0, err
    assert printed.startswith("cmrc (test): 6 queries")
    assert json.loads((out / "metrics.json").read_text())[0]["dataset"] == "cmrc"
    assert (out / "report.md").read_text(encoding="utf-8").startswith("# Retrieval evaluation: cmrc (test)")


def test_dataset_name_skips_generic_folder_names_and_reads_metadata(tmp_path):
    assert dataset_name(tmp_path / "cmrc" / "beir") == "cmrc"
    assert dataset_name(tmp_path / "run1" / "data" / "beir") == "run1"  # adapt's OUT/data/beir
    assert dataset_name(tmp_path / "nfcorpus") == "nfcorpus"
    (tmp_path / "x" / "beir").mkdir(parents=True)
    (tmp_path / "x" / "beir" / "dataset.json").write_text('{"name": "CMRC2018 (zh)"}', encoding="utf-8")
    assert dataset_name(tmp_path / "x" / "beir") == "CMRC2018 (zh)"


def test_data_errors_name_the_sub_verb(tmp_path, capsys):
    err = _one_line_error(capsys, "data", "qa-to-beir", "--input", tmp_path / "missing.json", "--question-field",
                          "q", "--answer-field", "a", "--output", tmp_path / "o")  # fmt: skip
    assert err.startswith("qembed data qa-to-beir: error: ")
    err = _one_line_error(capsys, "data", "convert", "--input", tmp_path / "missing.jsonl", "--to", "st",
                          "--output", tmp_path / "o.jsonl")  # fmt: skip
    assert err.startswith("qembed data convert: error: ")
