"""The Qwen3 task mix against the scripted server: classification (given and proposed labels), the seeded task
draw, glossary terms in the prompts, LLM hard negatives, and a SIGKILLed CLI run of the whole mix resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from llm_server import PROPOSED_LABELS, ScriptedLLMServer

from qembed.data.corpus import Document
from qembed.data.jsonl import read_jsonl
from qembed.errors import QembedError
from qembed.synth.categories import categories_path, load_categories
from qembed.synth.generate import SynthConfig, rejects_path, synthesize
from qembed.synth.glossary import Glossary, Term, load_glossary, terms_in
from qembed.synth.llm import OpenAIChat, RetryPolicy
from qembed.synth.mix import QWEN3_TASK_MIX, assign_task, parse_task_mix
from qembed.synth.personas import PersonaMatcher
from qembed.synth.prompts import CLASSIFICATION_INSTRUCTION

ROOT = Path(__file__).resolve().parent.parent
PERSONAS = ["A rice farmer in Hunan.", "A plant pathologist."]
TEXT = ("Rice blast is a fungal disease of rice that spreads in warm and humid weather. Farmers apply base "
        "fertiliser before planting and spray tricyclazole at the tillering stage to control it.")  # fmt: skip


def _llm(server):
    return OpenAIChat(server.base_url, "scripted-llm", concurrency=4, timeout=2.0,
                      retry=RetryPolicy(max_retries=2, backoff_base=0.02, backoff_max=0.1))  # fmt: skip


def _prompts(server, marker):
    return [r["body"]["messages"][1]["content"] for r in server.requests if marker in r["body"]["messages"][1]["content"]]


@pytest.fixture
def server():
    with ScriptedLLMServer() as s:
        yield s


def test_task_mix_draw_is_seeded_per_document_and_matches_the_shares():
    mix = parse_task_mix("retrieval=0.45,sts=0.25,classification=0.2,bitext=0.1")
    assert mix == QWEN3_TASK_MIX
    ids = [f"doc{i}" for i in range(1000)]
    tasks = [assign_task(d, mix, seed=0) for d in ids]
    shares = {t: c / 1000 for t, c in Counter(tasks).items()}
    for task, share in mix.items():
        assert abs(shares[task] - share) < 0.04, (task, shares)  # binomial sd at n=1000 is at most 0.016
    # a document's task depends only on (seed, its id): not on the other documents or their order
    assert [assign_task(d, mix, seed=0) for d in reversed(ids[:50])] == list(reversed(tasks[:50]))
    other_seed = [assign_task(d, mix, seed=1) for d in ids]
    assert other_seed != tasks and abs(Counter(other_seed)["retrieval"] / 1000 - 0.45) < 0.04
    assert {assign_task(d, {"sts": 1.0}) for d in ids[:20]} == {"sts"}
    for bad, message in [("retrieval=0.5,sts=0.4", "sum to 0.9"), ("search=1", "TASK=SHARE"),
                         ("retrieval=x", "not a number"), ("retrieval=0.5,retrieval=0.5", "twice")]:  # fmt: skip
        with pytest.raises(QembedError, match=message):
            parse_task_mix(bad)


def test_classification_with_a_label_file(server, tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(x) + "\n" for x in [
        {"label": "Crop diseases", "description": "diseases of crops"}, {"label": "Irrigation"},
        {"label": "Fertiliser", "description": "nutrients and soil fertility"}]))  # fmt: skip
    categories = load_categories(labels)
    docs = [Document("d0", "Crop losses from rice blast are worst in warm and humid summers."),
            Document("d1", f"[case=badlabel] {TEXT}"),
            Document("d2", "Irrigation schedules decide how often paddy fields are flooded and drained in summer.")]
    out = tmp_path / "cls.jsonl"
    stats = synthesize(docs, out, _llm(server), config=SynthConfig(task="classification", languages=["zh", "en"]),
                       categories=categories, show_progress=False)  # fmt: skip
    assert (stats.done, stats.failed) == (3, 0)
    records = {r["query_id"]: r for r in read_jsonl(out)}
    assert set(records) == {"d0-cls0", "d1-cls0", "d2-cls0"}
    for r in records.values():
        assert r["instruction"] == CLASSIFICATION_INSTRUCTION and r["meta"]["task"] == "classification"
        assert r["pos"] == [next(c.text() for c in categories if c.name == r["meta"]["label"])]
        assert sorted(r["neg"]) == sorted(c.text() for c in categories if c.name != r["meta"]["label"])
        assert r["pos_ids"] == [f"label:{r['meta']['label']}"] and r["meta"]["neg_source"] == "labels"
        expected = "稻田里的叶片出现了褐色斑点" if r["meta"]["language"] == "zh" else "brown spots appeared on the leaves after rain"
        assert r["query"] == expected
    assert records["d0-cls0"]["meta"]["label"] == "Crop diseases"  # the scripted model reads the passage
    assert records["d2-cls0"]["meta"]["label"] == "Irrigation"
    assert records["d2-cls0"]["pos"] == ["Irrigation"]  # no description: the name alone
    # the unknown label was sent back in a repair turn, then a listed one came
    assert records["d1-cls0"]["meta"]["label"] == "Fertiliser"
    assert any("not one of the listed names" in m["content"] for r in server.requests for m in r["body"]["messages"][2:])
    assert not categories_path(out).exists()  # given labels are not copied
    prompt = _prompts(server, "list of categories")[0]
    assert "- Crop diseases: diseases of crops" in prompt and "- Irrigation\n" in prompt


def test_classification_labels_are_proposed_once_and_kept(server, tmp_path):
    docs = [Document(f"d{i}", f"{TEXT} Field {i}.") for i in range(30)]
    out = tmp_path / "cls.jsonl"
    first = synthesize(docs[:20], out, _llm(server), config=SynthConfig(task="classification"), show_progress=False)
    assert first.done == 20
    kept = json.loads(categories_path(out).read_text())
    assert [x["label"] for x in kept["labels"]] == [x["label"] for x in PROPOSED_LABELS]
    assert kept["llm_model"] == "scripted-llm" and len(kept["sample_doc_ids"]) == 20
    (proposal,) = _prompts(server, "Propose a set of")
    assert proposal.count("<passage>") == 20  # the whole (small) corpus was shown
    # a resumed run with more documents reuses the kept set: no second proposal
    second = synthesize(docs, out, _llm(server), config=SynthConfig(task="classification"), show_progress=False)
    assert (second.done, second.skipped) == (10, 20)
    assert len(_prompts(server, "Propose a set of")) == 1
    names = {x["label"] for x in PROPOSED_LABELS}
    assert {r["meta"]["label"] for r in read_jsonl(out)} <= names and len(read_jsonl(out)) == 30


def test_proposal_that_never_parses_is_one_clear_error(tmp_path):
    from llm_server import Reply, default_reply

    def reply(body, attempt):
        if "Propose a set of" in body["messages"][1]["content"]:
            return Reply(content="Categories: maybe farming?")
        return default_reply(body, attempt)

    with ScriptedLLMServer(reply) as server:
        with pytest.raises(QembedError, match="pass --labels FILE"):
            synthesize([Document("d0", TEXT)], tmp_path / "o.jsonl", _llm(server),
                       config=SynthConfig(task="classification"), show_progress=False)  # fmt: skip


def test_glossary_terms_reach_the_prompts_and_the_used_ones_are_recorded(server, tmp_path, tiny_embedder_path):
    from qembed import Embedder

    path = tmp_path / "glossary.tsv"
    path.write_text("# agriculture terms\nrice blast\ta fungal disease caused by Magnaporthe oryzae\n分蘗期\ttillering stage\n"
                    "基肥\tbase fertiliser\nrice\nmaize rust\npanicle\n", encoding="utf-8")  # fmt: skip
    terms = load_glossary(path)
    assert terms[0] == Term("rice blast", "a fungal disease caused by Magnaporthe oryzae") and len(terms) == 6
    docs = [Document("en", "Rice blast hurts yields; farmers check the crop at tillering."),
            Document("zh", "水稻分蘗期要施足基肥，防止稻瘟病。"), Document("none", "The price of maize went up.")]
    out = tmp_path / "g.jsonl"
    stats = synthesize(docs, out, _llm(server), matcher=PersonaMatcher(PERSONAS), glossary=Glossary(terms),
                       config=SynthConfig(languages=["en"]), show_progress=False)  # fmt: skip
    assert stats.done == 3
    records = {r["pos_ids"][0]: r for r in read_jsonl(out)}
    # contained terms, longest first at a position ("rice blast", not "rice"), never inside a word ("price")
    assert records["en"]["meta"]["terms_offered"] == ["rice blast"]
    assert records["zh"]["meta"]["terms_offered"] == ["分蘗期", "基肥"]
    assert records["none"]["meta"]["terms_offered"] == []
    # the scripted query "how do farmers control rice blast disease" uses the offered term
    assert records["en"]["meta"]["terms"] == ["rice blast"] and records["zh"]["meta"]["terms"] == []
    queries = {p.split("<passage>\n", 1)[1].split("\n", 1)[0]: p for p in _prompts(server, "You are this person:")}
    assert "Domain vocabulary" in queries[docs[0].text] and "- rice blast: a fungal disease caused by" in queries[docs[0].text]
    assert "- 分蘗期: tillering stage\n- 基肥: base fertiliser" in queries[docs[1].text]
    assert "Domain vocabulary" not in queries[docs[2].text]

    # with an embedder, the nearest terms are offered too (after the contained ones)
    embedder = Embedder.from_pretrained(str(tiny_embedder_path), device="cpu")
    nearest = Glossary(terms, embedder, nearest=2)
    found = nearest.for_documents([docs[0].text, docs[2].text])
    assert found[0][0] == terms[0] and len(found[0]) == 3 and len(set(found[0])) == 3
    assert len(found[1]) == 2
    assert terms_in("Price of RICE BLAST control", ["rice blast", "rice", "ice"]) == ["rice blast", "rice"]


def test_llm_negatives_follow_the_query(server, tmp_path):
    docs = [Document("d0", TEXT), Document("d1", f"[case=fewnegs] {TEXT}")]
    out = tmp_path / "n.jsonl"
    stats = synthesize(docs, out, _llm(server), matcher=PersonaMatcher(PERSONAS),
                       config=SynthConfig(llm_negatives=3, max_repairs=1), show_progress=False)  # fmt: skip
    assert (stats.done, stats.failed) == (1, 1)
    (record,) = read_jsonl(out)
    assert record["meta"]["neg_source"] == "llm" and record["meta"]["llm_negatives"] == 3
    assert len(record["neg"]) == 3 and all(n.startswith("Negative ") for n in record["neg"])
    assert all(record["query"] in n for n in record["neg"])  # written for this query
    (prompt,) = [p for p in _prompts(server, "do NOT answer the query") if "[case=fewnegs]" not in p]
    assert f"Query: {record['query']}" in prompt and "Write 3 different passages in English" in prompt
    (reject,) = read_jsonl(rejects_path(out))
    assert reject["stage"] == "negatives" and "give 3 different passages" in reject["reason"]


def _cli(*args):
    return [sys.executable, "-m", "qembed", *args]


def test_cli_task_mix_with_classification_negatives_and_glossary_resumes_after_sigkill(server, tmp_path):
    n = 36
    sentences = ["Rice blast is a fungal disease that spreads quickly in warm and humid weather.",
                 "Farmers apply base fertiliser before planting and again at the tillering stage.",
                 "Drainage of the paddy field in midsummer limits ineffective tillers."]  # fmt: skip
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"doc{i}", "text": f"{' '.join(sentences)} Field {i}."}) + "\n"
                              for i in range(n)))  # fmt: skip
    personas = tmp_path / "personas.txt"
    personas.write_text("\n".join(PERSONAS) + "\n")
    glossary = tmp_path / "glossary.txt"
    glossary.write_text("rice blast\nbase fertiliser\n")
    out = tmp_path / "mix.jsonl"
    command = _cli("synth", "--corpus", str(corpus), "--personas", str(personas), "--llm-base-url", server.base_url,
                   "--llm-model", "scripted-llm", "--task-mix", "retrieval=0.45,sts=0.25,classification=0.2,bitext=0.1",
                   "--languages", "zh,en", "--llm-negatives", "1", "--glossary", str(glossary), "--concurrency", "2",
                   "--output", str(out), "--no-progress")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    server.latency = 0.1
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 8):
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup, possibly a torn last line
    proc.wait()
    partial = len(read_jsonl(out, allow_truncated_tail=True))
    assert 8 <= partial < n
    server.latency = 0.0
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{partial} already done" in result.stdout and "by task: " in result.stdout
    records = read_jsonl(out)
    mix = QWEN3_TASK_MIX
    tags = {"retrieval": "q", "sts": "sts", "classification": "cls", "bitext": "bitext"}
    expected = sorted(f"doc{i}-{tags[assign_task(f'doc{i}', mix)]}0" for i in range(n))
    assert sorted(r["query_id"] for r in records) == expected  # every document once, with its drawn task
    assert len({assign_task(f"doc{i}", mix) for i in range(n)}) == 4  # all four kinds in this corpus
    for r in records:
        task = r["meta"]["task"]
        assert r["query_id"].endswith(f"-{tags[task]}0")
        if task == "retrieval":
            assert len(r["neg"]) == 1 and r["meta"]["neg_source"] == "llm"
            assert r["meta"]["terms_offered"] == ["rice blast", "base fertiliser"]
        elif task == "classification":
            assert r["meta"]["label"] in {x["label"] for x in PROPOSED_LABELS}
        elif task == "sts":
            assert "terms" not in r["meta"]  # a paraphrase is not offered vocabulary
    assert len(_prompts(server, "Propose a set of")) == 1  # labels proposed once, reused by the resumed run
    assert categories_path(out).exists()
