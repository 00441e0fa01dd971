"""`qembed review` without a browser: the seeded stratified sample in the labels file, the label store (undo,
resent events, restart), the report's figures against hand-computed values on planted labels, the LLM judge
against the scripted server (resumed after SIGKILL), and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from llm_server import Reply, ScriptedLLMServer, default_reply, judge_relevant

from qembed.cli import main
from qembed.data.jsonl import read_jsonl, write_jsonl
from qembed.errors import QembedError
from qembed.review.labels import FORMAT, LabelStore, create_labels_file, fold, pair_key, read_review
from qembed.review.report import build_report, cohen_kappa, format_report, threshold_plot, wilson_interval
from qembed.synth.prompts import JUDGE_PROMPT_VERSION

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ planted labels
def _planted(path: Path) -> Path:
    """10 items with known attributes and labels by alice, bob, carol and an LLM judge (see the test)."""
    cosines = [0.9, 0.85, 0.8, 0.75, 0.72, 0.71, 0.6, 0.5, 0.4, 0.3]
    items = [{"type": "item", "id": f"i{n}", "key": f"k{n}", "query": f"q{n}", "instruction": None, "passage": f"p{n}",
              "task": "retrieval" if n < 5 else "sts", "question_type": "keywords" if n < 5 else "paraphrase",
              "difficulty": "phd" if n % 2 else "university", "language": "en" if n < 8 else "zh", "persona": None,
              "cosine": cosines[n], "kept": n < 6} for n in range(10)]  # fmt: skip
    header = {"type": "header", "format": FORMAT, "raw": "raw.jsonl", "filtered": "filtered.jsonl", "sample": 0.05,
              "seed": 0, "population": 200, "filtered_population": 120, "items": 10}  # fmt: skip
    events = []

    def label(reviewer, labels, prefix=""):
        for n, value in labels.items():
            events.append({"type": "label", "event": f"{prefix}{reviewer}-{n}", "item": f"i{n}", "reviewer": reviewer,
                           "label": {"R": "relevant", "N": "not_relevant", "S": "skip"}[value]})  # fmt: skip

    label("alice", {0: "R", 1: "R", 2: "R", 3: "R", 4: "N", 5: "R", 6: "N", 7: "R", 8: "N"})
    # alice first called i9 relevant, took it back (undo), then skipped it
    events.append({"type": "label", "event": "alice-9a", "item": "i9", "reviewer": "alice", "label": "relevant"})
    events.append({"type": "undo", "event": "alice-undo", "item": "i9", "reviewer": "alice", "target": "alice-9a"})
    label("alice", {9: "S"})
    events.append(dict(events[0]))  # a resent event (same id): counted once
    events.append({**events[1], "event": "alice-1-again", "label": "not_relevant"})  # a second label of i1: ignored
    label("bob", {0: "R", 1: "R", 2: "N", 3: "R", 4: "N", 5: "R", 6: "N", 7: "N"})
    label("carol", {8: "N", 9: "N"})
    label("llm:judge", dict(enumerate("RRRRRRNNNN")))
    path.write_text("".join(json.dumps(x) + "\n" for x in [header, *items, *events]))
    return path


def test_wilson_and_kappa_against_hand_computed_values():
    # Wilson 95 %: 4/8 -> [0.2152, 0.7848]; 4/5 -> [0.3755, 0.9638]; 0/10 -> [0, 0.2775]
    assert wilson_interval(4, 8) == pytest.approx((0.2152, 0.7848), abs=5e-5)
    assert wilson_interval(4, 5) == pytest.approx((0.3755, 0.9638), abs=5e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # kappa: po 0.75, pe 0.5 -> 0.5; perfect agreement -> 1; one rater constant and the other not -> 0
    pairs = [(True, True)] * 4 + [(True, False)] * 2 + [(False, False)] * 2
    assert cohen_kappa(pairs) == pytest.approx(0.5)
    assert cohen_kappa([(True, True), (False, False)]) == pytest.approx(1.0)
    assert cohen_kappa([(True, True), (True, False)]) == pytest.approx(0.0)
    assert cohen_kappa([(True, True)] * 3) is None and cohen_kappa([]) is None


def test_report_figures_on_planted_labels(tmp_path):
    review = read_review(_planted(tmp_path / "labels.jsonl"))
    labels = review.labels()
    assert labels["alice"]["i9"]["label"] == "skip" and labels["alice"]["i1"]["label"] == "relevant"
    report = build_report(review)
    # verdicts: i0 R, i1 R, i3 R, i4 N, i5 R, i6 N, i8 N, i9 N; ties at i2 and i7
    assert (report["with_verdict"], report["ties"]) == (8, 2)
    overall = report["accuracy"]["overall"]
    assert (overall["raw"]["relevant"], overall["raw"]["n"]) == (4, 8)
    assert overall["raw"]["ci95"] == pytest.approx([0.2152, 0.7848], abs=5e-5)
    assert (overall["filtered"]["relevant"], overall["filtered"]["n"]) == (4, 5)  # kept: i0..i5
    assert overall["filtered"]["ci95"] == pytest.approx([0.3755, 0.9638], abs=5e-5)
    task = report["accuracy"]["task"]
    assert (task["retrieval"]["raw"]["relevant"], task["retrieval"]["raw"]["n"]) == (3, 4)
    assert (task["sts"]["raw"]["relevant"], task["sts"]["raw"]["n"]) == (1, 4)
    assert (task["sts"]["filtered"]["relevant"], task["sts"]["filtered"]["n"]) == (1, 1)
    language = report["accuracy"]["language"]
    assert (language["zh"]["raw"]["relevant"], language["zh"]["raw"]["n"]) == (0, 2)
    difficulty = report["accuracy"]["difficulty"]  # phd: i1 R, i3 R, i5 R, i9 N
    assert (difficulty["phd"]["raw"]["relevant"], difficulty["phd"]["raw"]["n"]) == (3, 4)
    # threshold 0.7 keeps i0..i5 (6 of 10; 4 of the 5 with a verdict relevant); 0.8 keeps i0, i1
    at = {p["threshold"]: p for p in report["threshold"]}
    assert (at[0.7]["kept_share"], at[0.7]["relevant"], at[0.7]["n"]) == (0.6, 4, 5)
    assert (at[0.8]["kept_share"], at[0.8]["relevant"], at[0.8]["n"]) == (0.2, 2, 2)
    assert at[0.29]["kept_share"] == 1.0 and at[0.9]["kept_share"] == 0.0
    assert (at[0.5]["judges"]["llm:judge"]["relevant"], at[0.5]["judges"]["llm:judge"]["n"]) == (6, 7)  # i0..i6
    # alice/bob: 8 shared items, 6 agree; alice says yes 6/8, bob 4/8 -> pe 0.5, kappa 0.5
    pair = next(a for a in report["agreement"] if (a["a"], a["b"]) == ("alice", "bob"))
    assert (pair["n"], pair["agreement"]) == (8, 0.75) and pair["kappa"] == pytest.approx(0.5)
    # the judge against the human verdict: 7 of 8 agree; yes-rates 5/8 and 4/8 -> pe 0.5, kappa 0.75
    judge = report["llm_judges"]["llm:judge"]
    assert (judge["vs_humans"]["n"], judge["vs_humans"]["agreement"]) == (8, 0.875)
    assert judge["vs_humans"]["kappa"] == pytest.approx(0.75)
    assert (judge["raw"]["relevant"], judge["raw"]["n"]) == (6, 10)
    assert report["reviewers"]["alice"] == {"labelled": 10, "skipped": 1, "relevant": 6}
    text = format_report(report)
    assert "  overall                       50.0% [21.5, 78.5] (4/8)            80.0% [37.6, 96.4] (4/5)\n" in text
    assert "alice / bob: n=8, agreement 75.0%, kappa 0.500" in text
    assert "LLM judge llm:judge: vs the human verdict n=8, agreement 87.5%, kappa 0.750" in text
    assert "       0.70   60.0%  80.0% [37.6, 96.4] (4/5)" in text
    assert threshold_plot(report)[:8] == b"\x89PNG\r\n\x1a\n"


def test_fold_ignores_resent_events_and_applies_undo_only_to_its_target():
    events = [{"type": "label", "event": "a", "item": "x", "reviewer": "r", "label": "relevant"},
              {"type": "undo", "event": "u1", "item": "x", "reviewer": "r", "target": "other"},
              {"type": "label", "event": "a", "item": "x", "reviewer": "r", "label": "not_relevant"}]  # fmt: skip
    assert fold(events)["r"]["x"]["label"] == "relevant"
    events.append({"type": "undo", "event": "u2", "item": "x", "reviewer": "r", "target": "a"})
    assert fold(events)["r"] == {}


# ---------------------------------------------------------------------------------------------- sample
def _raw(path: Path, n_keywords=30, n_summary=20, n_sts=10) -> Path:
    records = []
    for kind, count in (("keywords", n_keywords), ("summary", n_summary), ("paraphrase", n_sts)):
        for i in range(count):
            task = "sts" if kind == "paraphrase" else "retrieval"
            records.append({"query": f"rice blast {kind} question {i}", "pos": [f"Rice blast passage {kind} {i}."],
                            "query_id": f"{kind}{i}-q0", "meta": {"task": task, "question_type": kind,
                            "difficulty": "university", "language": "en", "character": "A farmer."}})  # fmt: skip
    write_jsonl(path, records)
    return path


def test_sample_is_seeded_stratified_and_kept_in_the_header(tmp_path, tiny_embedder_path):
    from qembed import Embedder

    raw = _raw(tmp_path / "raw.jsonl")
    records = read_jsonl(raw)
    filtered = tmp_path / "filtered.jsonl"
    write_jsonl(filtered, [{**r, "meta": {**r["meta"], "score": 0.8}} for r in records[::2]])
    review = create_labels_file(tmp_path / "a.jsonl", raw, filtered, fraction=0.1, seed=7)
    strata = Counter((it["task"], it["question_type"]) for it in review.items)
    assert strata == {("retrieval", "keywords"): 3, ("retrieval", "summary"): 2, ("sts", "paraphrase"): 1}
    assert review.header["format"] == FORMAT and review.header["items"] == 6 and review.header["population"] == 60
    kept_keys = {pair_key(r) for r in records[::2]}
    for item in review.items:
        assert item["kept"] == (item["key"] in kept_keys)
        assert item["cosine"] == (0.8 if item["kept"] else None)
        assert item["persona"] == "A farmer." and item["id"].endswith("-q0")
    again = create_labels_file(tmp_path / "b.jsonl", raw, filtered, fraction=0.1, seed=7)
    assert [it["id"] for it in again.items] == [it["id"] for it in review.items]  # same seed, same items and order
    other = create_labels_file(tmp_path / "c.jsonl", raw, filtered, fraction=0.1, seed=8)
    assert [it["id"] for it in other.items] != [it["id"] for it in review.items]
    # a rare stratum still gets one item
    tiny = create_labels_file(tmp_path / "d.jsonl", raw, fraction=0.01)
    assert Counter(it["question_type"] for it in tiny.items) == {"keywords": 1, "summary": 1, "paraphrase": 1}
    assert all(it["kept"] is None for it in tiny.items) and tiny.header["filtered"] is None
    # with an embedder, every item gets the filter's cosine
    embedder = Embedder.from_pretrained(str(tiny_embedder_path), device="cpu")
    scored = create_labels_file(tmp_path / "e.jsonl", raw, filtered, fraction=0.1, seed=7, embedder=embedder)
    item = scored.items[0]
    q = embedder.encode_queries([item["query"]])[0]
    assert item["cosine"] == pytest.approx(float(q @ embedder.encode_documents([item["passage"]])[0]), abs=1e-4)
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"query": "maize rust", "pos": ["Maize rust passage."], "meta": {"score": 0.9}}])
    with pytest.raises(QembedError, match="shares no"):
        create_labels_file(tmp_path / "f.jsonl", raw, other)


def test_label_store_appends_each_label_once_and_survives_a_restart(tmp_path):
    raw = _raw(tmp_path / "raw.jsonl", 5, 5, 0)
    path = tmp_path / "labels.jsonl"
    review = create_labels_file(path, raw, fraction=1.0)
    first, second = review.items[0]["id"], review.items[1]["id"]
    store = LabelStore(path)
    state = store.state("ann")
    assert (state["done"], state["total"], state["item"]["id"], state["can_undo"]) == (0, 10, first, False)
    state = store.label("ann", first, "relevant", "e1")
    assert (state["done"], state["item"]["id"]) == (1, second)
    assert store.label("ann", first, "relevant", "e1")["done"] == 1  # resent: nothing new
    assert store.label("ann", first, "not_relevant", "e2")["done"] == 1  # already labelled: ignored
    store.label("ann", second, "skip", "e3")
    state = store.undo("ann", "u1")
    assert (state["done"], state["item"]["id"]) == (1, second)
    store.undo("ann", "u1")  # resent undo: nothing more is undone
    store.label("ann", second, "not_relevant", "e4")
    store.label("ben", first, "not_relevant", "b1")
    with pytest.raises(QembedError, match="llm:"):
        store.label("llm:x", first, "relevant", "x1")
    with pytest.raises(QembedError, match="label must be"):
        store.label("ann", first, "maybe", "x2")
    with pytest.raises(QembedError, match="no item"):
        store.label("ann", "nope", "relevant", "x3")
    store.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    events = [x for x in lines if x["type"] in ("label", "undo")]
    assert [(e["type"], e["event"]) for e in events] == [("label", "e1"), ("label", "e3"), ("undo", "u1"),
                                                         ("label", "e4"), ("label", "b1")]  # fmt: skip
    with path.open("a") as f:
        f.write('{"type": "label", "event": "torn')  # a writer killed mid-line
    restarted = LabelStore(path)  # a restarted server: same state, the torn line dropped
    assert restarted.state("ann")["done"] == 2 and restarted.state("ann")["counts"] == {"relevant": 1, "not_relevant": 1}
    assert restarted.label("ann", second, "relevant", "e4")["done"] == 2  # resent after the restart: once
    assert restarted.state("ben")["reviewers"] == {"ann": 2, "ben": 1}
    restarted.close()
    assert "torn" not in path.read_text()


# ----------------------------------------------------------------------------------------- CLI and judge
def test_cli_creates_reports_and_refuses_a_different_sample(tmp_path, capsys):
    raw = _raw(tmp_path / "raw.jsonl")
    labels = tmp_path / "labels.jsonl"
    assert main(["review", "--labels", str(labels), "--input", str(raw), "--sample", "0.1", "--report"]) == 0
    out = capsys.readouterr().out
    assert "drew 6 of 60 pairs" in out and "sample: 6 items of 60 raw pairs" in out
    assert "no threshold curve: 0 of 6 sampled items have a cosine" in out
    assert main(["review", "--labels", str(labels), "--sample", "0.2", "--report"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"qembed review: error: {labels} holds a sample drawn with --sample 0.1: use a new --labels file for another sample"
    ]
    assert main(["review", "--labels", str(tmp_path / "new.jsonl"), "--report"]) == 2
    assert "give --input" in capsys.readouterr().err
    assert main(["review", "--labels", str(labels), "--judge-llm-model", "m"]) == 2
    assert "needs both" in capsys.readouterr().err
    assert main(["review", "--labels", str(raw), "--report"]) == 2
    assert "not a qembed review labels file" in capsys.readouterr().err


def _judge_raw(path: Path, n: int = 20) -> Path:
    records = []
    for i in range(n):
        relevant = i % 3 != 0
        passage = f"Rice blast control with tricyclazole, note {i}." if relevant else f"Marathon training, week {i}."
        records.append({"query": f"how to control rice blast ({i})", "pos": [passage], "query_id": f"d{i}-q0",
                        "meta": {"task": "retrieval", "question_type": "keywords"}})  # fmt: skip
    write_jsonl(path, records)
    return path


def test_llm_judge_labels_as_llm_reviewer_and_resumes(tmp_path, capsys):
    labels = tmp_path / "labels.jsonl"
    create_labels_file(labels, _judge_raw(tmp_path / "raw.jsonl"), fraction=1.0)
    review = read_review(labels)

    def flaky(body, attempt):  # the server fails for a third of the items
        if any(f"({i})" in body["messages"][1]["content"] for i in (1, 4, 7, 10, 13, 16, 19)):
            return Reply(503, content="overloaded")
        return default_reply(body, attempt)

    args = ["review", "--labels", str(labels), "--judge-llm-model", "scripted-judge", "--max-retries", "0"]
    with ScriptedLLMServer(flaky) as server:
        assert main([*args, "--judge-llm-base-url", server.base_url]) == 0
    assert "llm:scripted-judge: labelled 13 item(s), 0 already done, 7 failed" in capsys.readouterr().out
    with ScriptedLLMServer() as server:
        assert main([*args, "--judge-llm-base-url", server.base_url, "--report"]) == 0
        prompts = [r["body"]["messages"][1]["content"] for r in server.requests]
    out = capsys.readouterr().out
    assert "labelled 7 item(s), 13 already done, 0 failed" in out
    assert len(prompts) == 7 and all("Does the passage answer the query" in p for p in prompts)
    events = [e for e in read_review(labels).events if e["reviewer"] == "llm:scripted-judge"]
    assert Counter(e["item"] for e in events) == {it["id"]: 1 for it in review.items}  # each item once
    for event in events:
        item = next(it for it in review.items if it["id"] == event["item"])
        assert event["label"] == ("relevant" if judge_relevant(item["query"], item["passage"]) else "not_relevant")
        assert event["prompt_version"] == JUDGE_PROMPT_VERSION
    assert "its accuracy: raw 65.0% [43.3, 81.9] (13/20)" in out  # 13 relevant of 20, Wilson hand-computed


def test_llm_judge_resumes_after_sigkill(tmp_path):
    labels = tmp_path / "labels.jsonl"
    create_labels_file(labels, _judge_raw(tmp_path / "raw.jsonl", 24), fraction=1.0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with ScriptedLLMServer(latency=0.15) as server:
        command = [sys.executable, "-m", "qembed", "review", "--labels", str(labels), "--judge-llm-base-url",
                   server.base_url, "--judge-llm-model", "judge", "--concurrency", "1", "--no-progress"]  # fmt: skip
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(read_review(labels).events) < 4:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        partial = len(read_review(labels).events)
        assert 4 <= partial < 24
        server.latency = 0.0
        result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"labelled {24 - partial} item(s), {partial} already done" in result.stdout
    events = read_review(labels).events
    assert sorted(e["item"] for e in events) == sorted(f"d{i}-q0" for i in range(24))  # each exactly once
