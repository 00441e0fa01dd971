"""The two-stage pipeline end to end against the scripted server: records, retries, rejects, resumption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llm_server import CASES, ScriptedLLMServer

from qembed.data.corpus import Document
from qembed.data.jsonl import read_jsonl
from qembed.errors import QembedError
from qembed.synth.generate import SynthConfig, rejects_path, split_sentences, synthesize
from qembed.synth.llm import OpenAIChat, RetryPolicy
from qembed.synth.personas import PersonaMatcher
from qembed.synth.prompts import PROMPT_VERSION

ROOT = Path(__file__).resolve().parent.parent
PERSONAS = ["A rice farmer in Hunan who grows two crops a year.", "A plant pathologist studying fungal diseases."]
TEXT = "Rice blast is a fungal disease of rice. Farmers spray tricyclazole at booting to control it."


def _llm(server, **kwargs):
    options = {"concurrency": 8, "timeout": 0.5, "retry": RetryPolicy(max_retries=3, backoff_base=0.02, backoff_max=0.1)}
    return OpenAIChat(server.base_url, "scripted-llm", **{**options, **kwargs})


@pytest.fixture
def server():
    with ScriptedLLMServer() as s:
        yield s


def test_every_scripted_case(server, tmp_path):
    docs = [Document(f"doc-{case}", f"[case={case}] {TEXT}") for case in CASES]
    out = tmp_path / "synth.jsonl"
    stats = synthesize(docs, out, _llm(server), matcher=PersonaMatcher(PERSONAS),
                       config=SynthConfig(languages=["zh", "en"]), show_progress=False)  # fmt: skip
    records = {r["query_id"]: r for r in read_jsonl(out)}
    rejects = {r["query_id"]: r for r in read_jsonl(rejects_path(out))}
    failing = {"invalid", "garbage", "down"}
    assert set(records) == {f"doc-{c}-q0" for c in CASES if c not in failing}
    assert set(rejects) == {f"doc-{c}-q0" for c in failing}
    assert (stats.done, stats.failed) == (len(CASES) - 3, 3)

    for case in set(CASES) - failing:
        r = records[f"doc-{case}-q0"]
        assert r["pos"] == [docs[list(CASES).index(case)].text] and r["neg"] == [] and r["pos_ids"] == [f"doc-{case}"]
        meta = r["meta"]
        assert meta["character"] in PERSONAS
        assert meta["llm_model"] == "scripted-llm" and meta["prompt_version"] == PROMPT_VERSION
        assert meta["language"] in {"zh", "en"}
        # the query the scripted model wrote in the requested language
        expected = "水稻稻瘟病应该如何防治" if meta["language"] == "zh" else "how do farmers control rice blast disease"
        assert r["query"] == expected
        assert 6 <= meta["length"] <= 40 if meta["language"] == "zh" else 4 <= meta["length"] <= 30
    assert records["doc-normalise-q0"]["meta"]["question_type"] == "yes_or_no"
    assert records["doc-normalise-q0"]["meta"]["difficulty"] == "phd"
    assert records["doc-good-q0"]["meta"]["difficulty"] == "university"

    assert rejects["doc-garbage-q0"]["stage"] == "config" and not rejects["doc-garbage-q0"]["transient"]
    assert len(rejects["doc-garbage-q0"]["raw"]) == 3  # the answer plus two repair attempts
    assert "not one of" in rejects["doc-invalid-q0"]["reason"]
    assert rejects["doc-down-q0"]["transient"] and "503" in rejects["doc-down-q0"]["reason"]

    # retries really happened at the server: per request, 429 once, 500 twice, one hang
    def statuses(case):
        return [r["status"] for r in server.requests if f"[case={case}]" in r["body"]["messages"][1]["content"]]

    assert statuses("r429") == [429, 200, 429, 200]
    assert statuses("r500") == [500, 500, 200, 500, 500, 200]
    assert statuses("down") == [503] * 4
    assert len(statuses("hang")) == 4  # two stages, each timed out once
    # the repair turn carried the bad answer back to the model
    repair = [r["body"]["messages"] for r in server.requests if "[case=repair]" in r["body"]["messages"][1]["content"]]
    assert any(len(m) == 4 and m[2]["role"] == "assistant" and "could not be used" in m[3]["content"] for m in repair)


def test_resume_skips_done_retries_transient_and_ignores_truncated_tail(server, tmp_path):
    docs = [Document(f"d{i}", f"{TEXT} ({i})") for i in range(6)] + [Document("dx", f"[case=down] {TEXT}")]
    out = tmp_path / "synth.jsonl"
    config = SynthConfig(queries_per_doc=2)
    first = synthesize(docs, out, _llm(server), matcher=PersonaMatcher(PERSONAS), config=config, show_progress=False)
    assert (first.done, first.failed) == (12, 2)
    # simulate a kill mid-write: drop the last record and leave half of it on the last line
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])
    lost = json.loads(lines[-1])["query_id"]
    requests_before = len(server.requests)
    second = synthesize(docs, out, _llm(server), matcher=PersonaMatcher(PERSONAS), config=config, show_progress=False)
    assert second.skipped == 11  # the transient failures (dx) and the torn record are redone
    assert second.done == 1 and second.failed == 2
    records = read_jsonl(out)
    ids = [r["query_id"] for r in records]
    assert sorted(ids) == sorted(f"d{i}-q{j}" for i in range(6) for j in range(2))
    assert lost in ids
    assert len(server.requests) - requests_before == 2 + 2 * 4  # one job redone, two down jobs retried


def test_persona_candidates_come_from_the_embedder_per_document(server, tmp_path, tiny_embedder_path):
    from qembed import Embedder

    personas = [f"Persona {i}: works with {topic}." for i, topic in enumerate(
        ["rice", "maize", "law", "databases", "marathons", "bread", "bridges", "vaccines"])]  # fmt: skip
    matcher = PersonaMatcher(personas, Embedder.from_pretrained(str(tiny_embedder_path), device="cpu"))
    docs = [Document(f"d{i}", f"{TEXT} Variant {i} " + "word " * i) for i in range(7)]
    expected = {d.doc_id: c for d, c in zip(docs, matcher.candidates([d.text for d in docs]))}
    out = tmp_path / "p.jsonl"
    config = SynthConfig(chunk_size=3, concurrency=2)
    stats = synthesize(docs, out, _llm(server), matcher=matcher, config=config, show_progress=False)
    assert stats.done == 7
    for r in read_jsonl(out):
        assert r["meta"]["character"] == expected[r["pos_ids"][0]][0]  # the scripted model picks candidate 1
    prompts = [r["body"]["messages"][1]["content"] for r in server.requests if "Characters:" in r["body"]["messages"][1]["content"]]
    assert all(sum(p in prompt for p in personas) == 5 for prompt in prompts)  # five candidates shown


def test_sts_and_bitext_tasks_share_one_output(server, tmp_path):
    docs = [
        Document("en1", "Rice blast is caused by a fungus. It spreads quickly in warm and humid weather conditions."),
        Document("zh1", "稻瘟病是由真菌引起的水稻病害。高温高湿的天气条件下传播很快。"),
    ]
    out = tmp_path / "pairs.jsonl"
    sts = synthesize(docs, out, _llm(server), config=SynthConfig(task="sts"), show_progress=False)
    bitext = synthesize(docs, out, _llm(server), config=SynthConfig(task="bitext", languages=["zh", "en"]),
                        show_progress=False)  # fmt: skip
    assert sts.done == 2 and bitext.done == 2 and bitext.skipped == 0
    records = {r["query_id"]: r for r in read_jsonl(out)}
    assert set(records) == {"en1-sts0", "zh1-sts0", "en1-bitext0", "zh1-bitext0"}
    for doc in docs:
        r = records[f"{doc.doc_id}-sts0"]
        assert r["pos"][0] in split_sentences(doc.text) and r["pos_ids"] == [doc.doc_id]
        assert r["query"].startswith("Put differently, ") and r["meta"]["task"] == "sts"
    en, zh = records["en1-bitext0"], records["zh1-bitext0"]
    assert en["meta"]["language"] == "zh" and en["query"] == "这是一段忠实的译文。" and en["pos"][0] in docs[0].text
    assert zh["meta"]["language"] == "en" and zh["meta"]["source_language"] == "zh"
    again = synthesize(docs, out, _llm(server), config=SynthConfig(task="sts"), show_progress=False)
    assert (again.done, again.skipped) == (0, 2)


def test_synthesize_corpus_with_the_default_library(server, tmp_path, tiny_embedder_path):
    from qembed.synth.generate import synthesize_corpus
    from qembed.synth.personas import load_personas

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"c{i}", "title": "Rice", "text": f"{TEXT} {i}"}) + "\n" for i in range(4)))
    stats = synthesize_corpus(corpus, tmp_path / "o.jsonl", lambda: _llm(server), embed_model=str(tiny_embedder_path),
                              limit=3, config=SynthConfig(languages=["zh"]), show_progress=False)  # fmt: skip
    assert stats.done == 3
    library = set(load_personas())
    records = read_jsonl(tmp_path / "o.jsonl")
    assert sorted(r["pos_ids"][0] for r in records) == ["c0", "c1", "c2"]
    assert all(r["meta"]["character"] in library and r["pos"][0].startswith("Rice ") for r in records)


def test_rejected_api_key_stops_the_run(server, tmp_path):
    from llm_server import Reply

    server.reply = lambda body, attempt: Reply(401, "invalid api key")
    docs = [Document(f"d{i}", TEXT) for i in range(20)]
    with pytest.raises(QembedError, match="401"):
        synthesize(docs, tmp_path / "o.jsonl", _llm(server, concurrency=2), matcher=PersonaMatcher(PERSONAS),
                   config=SynthConfig(concurrency=2), show_progress=False)  # fmt: skip
    assert len(server.requests) <= 2  # stopped at once, not one failure per document
    assert read_jsonl(tmp_path / "o.jsonl") == []


def _cli(*args):
    return [sys.executable, "-m", "qembed", *args]


def test_cli_resumes_after_kill_with_each_document_once(server, tmp_path):
    n = 24
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"doc{i}", "text": f"{TEXT} Field {i}."}) + "\n" for i in range(n)))
    personas = tmp_path / "personas.jsonl"
    personas.write_text("".join(json.dumps({"persona": p}) + "\n" for p in PERSONAS))
    out = tmp_path / "out.jsonl"
    command = _cli("synth", "--corpus", str(corpus), "--personas", str(personas), "--llm-base-url", server.base_url,
                   "--llm-model", "scripted-llm", "--concurrency", "2", "--output", str(out), "--no-progress")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server.latency = 0.15  # slow enough to kill the run part-way
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 5):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    partial = len(read_jsonl(out, allow_truncated_tail=True))
    assert 5 <= partial < n
    server.latency = 0.0
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{partial} already done" in result.stdout
    ids = [r["pos_ids"][0] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(f"doc{i}" for i in range(n))  # each document exactly once


def test_cli_errors_are_one_line(tmp_path):
    result = subprocess.run(_cli("synth", "--corpus", str(tmp_path / "missing.jsonl"), "--llm-base-url", "http://x",
                                 "--llm-model", "m", "--output", str(tmp_path / "o.jsonl")),
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"qembed synth: error: corpus file not found: {tmp_path / 'missing.jsonl'}"]
