"""`qembed adapt` end to end through the CLI on a slice of agri-zh with the real all-MiniLM-L6-v2: every stage,
the report and best/, resume after SIGKILL during training, reruns after a changed option, the documents +
LLM path against the scripted OpenAI-compatible server, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qembed.cli import main

ROOT = Path(__file__).resolve().parent.parent
# Small and fast: one epoch, 16 queries a step, 64 tokens, a checkpoint every 3 steps, one dev evaluation, two merge weights.
OPTIONS = {"train": {"epochs": 1, "batch_size": 16, "max_length": 64, "save_steps": 3, "evaluations": 1},
           "merge": {"t": [0.5, 1.0]}}  # fmt: skip


def adapt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "qembed", "adapt", *args, "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def slice_args(shared_dir, minilm_path, tmp_path_factory):
    """150 agri-zh QA pairs, the config file of the small run, and the common arguments."""
    folder = tmp_path_factory.mktemp("adapt-inputs")
    rows = json.loads((shared_dir / "data" / "agri-zh" / "rice_dqa_zh.json").read_text(encoding="utf-8"))[:150]
    (folder / "qa.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "adapt.yaml").write_text(yaml.safe_dump({**OPTIONS, "model": "overridden-by-the-flag"}))
    return ["--config", str(folder / "adapt.yaml"), "--model", str(minilm_path), "--qa", str(folder / "qa.json"),
            "--question-field", "instruction", "--answer-field", "output"]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(slice_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt") / "run"
    proc = adapt(*slice_args, "--output", str(out))
    return out, proc.stdout


def _test_metrics(summary: dict) -> dict:
    return {(r["variant"], r["set"], r["instruction"]): r["metrics"] for r in summary["results"]}


def test_every_stage_runs_and_best_reproduces_the_report(full_run, minilm_path):
    from qembed import Embedder
    from qembed.eval import evaluate
    from qembed.models.prompts import QueryFormat

    out, stdout = full_run
    assert "plan (" in stdout and stdout.index("plan (") < stdout.index("== data ==")
    for stage in ("data", "baseline", "negatives", "train", "merge", "final", "report"):
        assert f"== {stage} ==" in stdout
    for name in ("report.md", "summary.json", "recall_at_k.png", "training.png", "merge_t.png", "best/model.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train_queries"] + summary["data"]["dev_queries"] + summary["data"]["test_queries"] > 140
    report = (out / "report.md").read_text()
    for heading in ("## Data", "## Test results", "## Recommendation", "## Training", "## Merge weight", "## Time per stage"):
        assert heading in report
    choice = summary["recommendation"]
    assert choice["serve"] == f"qembed serve --model {out / 'best'}" and choice["serve"] in report
    assert "fine-tuned" in report and "base · no instruction" in report and "**" in report
    training = [json.loads(line) for line in (out / "train" / "model" / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in training) and any("eval" in r for r in training)  # loss and dev metrics logged

    # best/ reproduces the reported test figures exactly, from a fresh cache
    emb = Embedder.from_pretrained(out / "best", device="cpu")
    query_format = QueryFormat(choice["query_format"], choice["instruction"] or "")
    fresh = evaluate(emb, out / "data" / "beir", split="test", instruction=query_format,
                     cache_dir=out.parent / "fresh-cache", show_progress=False)  # fmt: skip
    assert fresh[0]["metrics"] == choice["test"]
    base = _test_metrics(summary)[("base", "test", None)]
    assert choice["test"]["recall@5"] > base["recall@5"] + 0.1  # fine-tuning helped a lot on this slice


def test_best_has_a_model_card_with_the_summary_figures(full_run, minilm_path):
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from qembed import Embedder
    from qembed.models.card import read_front_matter

    out, _ = full_run
    summary = json.loads((out / "summary.json").read_text())
    choice = summary["recommendation"]
    meta = read_front_matter(out / "best" / "README.md")
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert "domain-adaptation" in meta["tags"]
    by_split = {r["dataset"]["split"]: {m["type"]: m["value"] for m in r["metrics"]} for r in meta["model-index"][0]["results"]}
    assert by_split["test"] == {k.replace("@", "_at_"): v for k, v in choice["test"].items()}
    assert by_split["dev"] == {k.replace("@", "_at_"): v for k, v in choice["dev"].items()}
    card = (out / "best" / "README.md").read_text()
    assert "## Before and after (test split)" in card and "| before: base model |" in card
    assert f"| after: {choice['variant']} |" in card
    st = SentenceTransformer(str(out / "best"), device="cpu")  # the folder loads as is
    assert np.allclose(st.encode(["rice blast"]), Embedder.from_pretrained(out / "best").encode_documents(["rice blast"]),
                       atol=1e-4)  # fmt: skip


def test_merged_weights_lie_between_base_and_fine_tuned(full_run, minilm_path):
    import torch
    from safetensors.torch import load_file

    out, _ = full_run
    tuned = load_file(str(out / "merge" / "t1.0" / "model.safetensors"))
    half = load_file(str(out / "merge" / "t0.5" / "model.safetensors"))
    trained = load_file(str(out / "train" / "model" / "model.safetensors"))
    base = load_file(str(minilm_path / "model.safetensors"))
    names = [n for n in tuned if tuned[n].is_floating_point()]
    assert names and all(torch.equal(tuned[n], trained[n]) for n in names)  # t = 1 is the fine-tuned model

    def flat(state):
        return torch.cat([state[n].double().flatten() for n in names])

    b, f, m = flat(base), flat(tuned), flat(half)
    span = (f - b).norm()
    assert span > 0
    assert 0.3 * span < (m - b).norm() < 0.7 * span and 0.3 * span < (m - f).norm() < 0.7 * span


def test_changing_a_training_option_reruns_train_merge_final_report_only(full_run, slice_args, tmp_path):
    out, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    kept = {p: p.stat().st_mtime_ns for p in [copy / "data/beir/qrels/train.tsv", copy / "baseline/test/metrics.json",
                                                copy / "negatives/mined.jsonl"]}  # fmt: skip
    dry = adapt(*slice_args, "--output", str(copy), "--set", "train.lr=3e-5", "--dry-run").stdout
    assert re.search(r"train +will rerun \(changed: train\.lr 0\.0001 -> 3e-05\)", dry), dry
    for stage in ("data", "baseline", "negatives"):
        assert re.search(rf"{stage} +done", dry)
    for stage in ("merge", "final", "report"):
        assert re.search(rf"{stage} +will rerun", dry)
    assert "== " not in dry  # the plan only
    stdout = adapt(*slice_args, "--output", str(copy), "--set", "train.lr=3e-5").stdout
    assert [s for s in ("data", "baseline", "negatives", "train", "merge", "final", "report") if f"== {s} ==" in stdout] \
        == ["train", "merge", "final", "report"]  # fmt: skip
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert json.loads((copy / "train/model/train_config.json").read_text())["lr"] == 3e-5

    # a stage that fails names itself in one line, exits 2, and leaves the earlier stages done
    bad = adapt(*slice_args, "--output", str(copy), "--set", "negatives.range_min=60", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("qembed adapt: error: stage negatives failed: need 0 <= range_min")
    state = json.loads((copy / "state.json").read_text())
    assert state["baseline"]["status"] == "done" and state["negatives"]["status"] == "started"


def test_resume_after_sigkill_during_training(full_run, slice_args, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qembed", "adapt", *slice_args, "--output", str(out), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint = out / "train" / "model" / "checkpoints" / "step-3"
    deadline = time.time() + 500
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (out / "merge").exists(), "the run was not killed during training"
    finished = {p: p.stat().st_mtime_ns for p in [out / "data/beir/qrels/test.tsv", out / "baseline/dev/metrics.json",
                                                  out / "negatives/mined.jsonl"]}  # fmt: skip

    again = adapt(*slice_args, "--output", str(out))
    plan = again.stdout.split("== ", 1)[0]
    for stage in ("data", "baseline", "negatives"):
        assert re.search(rf"{stage} +done", plan), plan
    assert re.search(r"train +will resume \(interrupted\)", plan), plan
    assert "== data ==" not in again.stdout and "== negatives ==" not in again.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert re.search(r"resuming from .*step-\d+ \(step [3-9]", again.stderr), again.stderr[-2000:]

    resumed = _test_metrics(json.loads((out / "summary.json").read_text()))
    uninterrupted = _test_metrics(json.loads((full_run[0] / "summary.json").read_text()))
    assert resumed.keys() == uninterrupted.keys()
    for key, metrics in uninterrupted.items():
        assert resumed[key] == pytest.approx(metrics, abs=1e-6), key


def _llm_reply(body: dict, attempt: int):
    """The scripted LLM, with a stage-2 query taken from the passage so each document gets its own query."""
    from llm_server import Reply, default_reply

    prompt = body["messages"][-1]["content"]
    if "You are this person:" in prompt:
        passage = re.search(r"<passage>\n(.*?)\n</passage>", prompt, re.DOTALL).group(1)
        return Reply(content=json.dumps({"query": passage[:14]}, ensure_ascii=False))
    return default_reply(body, attempt)


def test_documents_and_llm_path_with_reranker(shared_dir, minilm_path, tiny_embedder_path, tiny_reranker_path, tmp_path):
    from llm_server import ScriptedLLMServer

    from qembed.data.beir import write_beir

    retention = tmp_path / "retention"  # a small general-domain set
    docs = {f"r{i}": {"title": "", "text": t} for i, t in enumerate(["The cat sat on the mat.", "Stocks fell today.",
                                                                      "Rain is expected tomorrow.", "Python is a language."])}
    write_beir(retention, docs, {"a": "weather forecast", "b": "programming"}, {"test": {"a": {"r2": 1}, "b": {"r3": 1}}})

    rows = json.loads((shared_dir / "data" / "agri-zh" / "corn_dqa_zh.json").read_text(encoding="utf-8"))[:40]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"c{i}", "text": r["output"]}, ensure_ascii=False) + "\n"
                              for i, r in enumerate(rows)), encoding="utf-8")  # fmt: skip
    personas = tmp_path / "personas.txt"
    personas.write_text("玉米种植户\n农技推广员\n")
    out = tmp_path / "run"
    with ScriptedLLMServer(reply=_llm_reply) as server:
        proc = adapt("--model", str(minilm_path), "--output", str(out), "--corpus", str(corpus),
                     "--llm-base-url", server.base_url, "--llm-model", "scripted", "--reranker", str(tiny_reranker_path),
                     "--compare-model", str(tiny_embedder_path), "--retention-dataset", str(retention),
                     "--set", "synth.languages=[zh]", "--set", f"synth.personas={personas}",
                     "--set", "synth.filter_threshold=0.2", "--set", "train.batch_size=8", "--set", "train.max_length=64",
                     "--set", "train.evaluations=0", "--set", "merge.t=[1.0]", "--set", "reranker.max_length=96",
                     "--set", "reranker.batch_size=8", "--set", "reranker.rerank_top=5")  # fmt: skip
        requests = len(server.requests)
    assert requests >= 2 * 40  # two chat turns per document
    assert "== reranker ==" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["source"] == "llm" and summary["data"]["filter_kept"] > 25
    variants = {r["variant"] for r in summary["results"]}
    assert {"base", "fine-tuned", "merged + base reranker", "merged + fine-tuned reranker"} <= variants
    sets = {(r["variant"], r["set"]) for r in summary["results"]}
    assert all((v, s) in sets for v in variants for s in ("dev", "test", "retention"))
    assert {b["model"] for b in summary["baselines"]} == {str(minilm_path), str(tiny_embedder_path)}
    report = (out / "report.md").read_text()
    assert "## Retention: retention (test)" in report and "## Baselines (test)" in report
    queries = [json.loads(line) for line in (out / "data" / "beir" / "queries.jsonl").read_text().splitlines()]
    assert all(q["text"] in corpus.read_text(encoding="utf-8") for q in queries)  # the LLM's queries


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["no source", "two sources", "missing field flag", "field not in file",
                                  "unreachable LLM", "no test qrels", "unknown key", "wrong type",
                                  "output is an input"])  # fmt: skip
def test_bad_input_is_one_line_before_any_work(case, slice_args, minilm_path, tmp_path, capsys):
    qa = slice_args[slice_args.index("--qa") + 1]
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv"):
        (beir / name).write_text("")
    (tmp_path / "docs.txt").write_text("a document\n")
    base = ["adapt", "--model", str(minilm_path), "--output", str(tmp_path / "out")]
    args, expected = {
        "no source": ([], "no data source"),
        "two sources": (["--qa", qa, "--question-field", "instruction", "--answer-field", "output", "--dataset", str(beir)],
                        "choose one data source, got qa and dataset"),
        "missing field flag": (["--qa", qa, "--question-field", "instruction"], "--qa needs --question-field and --answer-field"),
        "field not in file": (["--qa", qa, "--question-field", "question", "--answer-field", "output"],
                              "no row has the field 'question'"),
        "unreachable LLM": (["--corpus", str(tmp_path / "docs.txt"), "--llm-base-url", f"http://127.0.0.1:{_closed_port()}/v1",
                             "--llm-model", "m"], "LLM server unreachable"),
        "no test qrels": (["--dataset", str(beir)], "qrels/test.tsv not found"),
        "unknown key": (["--qa", qa, "--set", "train.learning_rate=1"], "unknown configuration key 'train.learning_rate'"),
        "wrong type": (["--qa", qa, "--set", "train.lr=fast"], "'train.lr' must be a number, got 'fast'"),
        "output is an input": (["--qa", qa, "--question-field", "instruction", "--answer-field", "output",
                                "--output", qa], f"--output {qa} is also --qa"),
    }[case]  # fmt: skip
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qembed adapt: error: ") and expected in err, err
    assert not (tmp_path / "out" / "state.json").exists()


def test_print_config_is_commented_yaml_with_overrides(slice_args, capsys):
    assert main(["adapt", *slice_args, "--set", "train.lr=0.001", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "lr: 0.001  # peak learning rate" in text and "batch_size: 16  #" in text  # flag > file > default
    cfg = yaml.safe_load(text)
    assert cfg["model"] == slice_args[slice_args.index("--model") + 1] and cfg["merge"]["t"] == [0.5, 1.0]
    assert cfg["data"]["question_field"] == "instruction" and cfg["train"]["epochs"] == 1


def test_existing_beir_dataset_with_lora(shared_dir, tiny_embedder_path, tmp_path):
    """`--dataset`: its test qrels are kept, dev comes from train, train never shares a positive with test;
    LoRA training (merged into the exported model) goes through merge and the report."""
    from qembed.data.qa_to_beir import qa_to_beir

    beir = tmp_path / "beir"
    rows = json.loads((shared_dir / "data" / "agri-zh" / "corn_dqa_zh.json").read_text(encoding="utf-8"))[:80]
    (tmp_path / "qa.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    qa_to_beir(tmp_path / "qa.json", beir, question_field="instruction", answer_field="output", test_fraction=0.2)
    out = tmp_path / "run"
    adapt("--model", str(tiny_embedder_path), "--output", str(out), "--dataset", str(beir), "--set", "train.lora=true",
          "--set", "train.batch_size=8", "--set", "train.max_length=64", "--set", "train.evaluations=0",
          "--set", "merge.t=[1.0]")  # fmt: skip
    from qembed.data.beir import read_qrels

    given = read_qrels(beir / "qrels" / "test.tsv")
    splits = {name: read_qrels(out / "data" / "beir" / "qrels" / f"{name}.tsv") for name in ("train", "dev", "test")}
    assert splits["test"] == given
    assert splits["dev"] and not set(splits["dev"]) & set(splits["train"])
    test_pos = {d for judged in given.values() for d in judged}
    assert not test_pos & {d for judged in splits["train"].values() for d in judged}
    assert json.loads((out / "train" / "model" / "train_config.json").read_text())["lora"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["source"] == "dataset" and (out / "best" / "model.safetensors").is_file()
