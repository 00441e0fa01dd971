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
    """The chosen merge (the only candidate kept) lies between base and fine-tuned as its t says; t = 1 is the
    fine-tuned model itself (train/model, no copy)."""
    import torch
    from safetensors.torch import load_file

    out, _ = full_run
    best_t = json.loads((out / "merge" / "curve.json").read_text())["best_t"]
    trained = load_file(str(out / "train" / "model" / "model.safetensors"))
    merged = trained if best_t == 1.0 else load_file(str(out / "merge" / f"t{best_t}" / "model.safetensors"))
    base = load_file(str(minilm_path / "model.safetensors"))
    names = [n for n in trained if trained[n].is_floating_point()]

    def flat(state):
        return torch.cat([state[n].double().flatten() for n in names])

    b, f, m = flat(base), flat(trained), flat(merged)
    span = (f - b).norm()
    assert span > 0
    assert (best_t - 0.2) * span < (m - b).norm() <= (best_t + 0.2) * span
    assert (0.8 - best_t) * span <= (m - f).norm() < (1.2 - best_t) * span


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

    # options that do not change the trained weights resume; one that does reruns (17.6)
    run_only = ["--set", "train.device=cpu", "--set", "train.precision=fp32", "--set", "train.save_steps=4",
                "--set", "train.evaluations=2"]  # fmt: skip
    dry = adapt(*slice_args, "--output", str(out), *run_only, "--dry-run").stdout
    assert re.search(r"train +will resume \(interrupted\)\n", dry), dry
    dry = adapt(*slice_args, "--output", str(out), *run_only, "--set", "train.lr=3e-5", "--dry-run").stdout
    assert re.search(r"train +will rerun \(changed: train\.lr 0\.0001 -> 3e-05\)", dry), dry
    assert checkpoint.exists()

    again = adapt(*slice_args, "--output", str(out), *run_only[:6])
    plan = again.stdout.split("== ", 1)[0]
    for stage in ("data", "baseline", "negatives"):
        assert re.search(rf"{stage} +done", plan), plan
    assert re.search(r"train +will resume \(interrupted\)\n", plan), plan
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


# ------------------------------------------------------------------ files, splits, resume, inputs (issues 17, 21)
def _state(out: Path) -> dict:
    try:
        return json.loads((out / "state.json").read_text())
    except (OSError, ValueError):  # not written yet, or read while being replaced
        return {}


@pytest.mark.parametrize("case", ["user files", "user files and --dry-run", "qembed run with a user's stage folder"])
def test_output_holding_user_files_is_refused_and_left_alone(case, slice_args, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("my notes")
    (out / "train").mkdir()
    (out / "notes.txt").write_text("keep me")
    if case.startswith("qembed run"):
        (out / "state.json").write_text("{}")  # a qembed run folder, but data/ and train/ are the user's
    before = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    args = ["adapt", *slice_args, "--output", str(out), *(["--dry-run"] if "dry-run" in case else [])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qembed adapt: error: "), err
    expected = f"{out / 'data'} exists but qembed did not create it" if case.startswith("qembed run") else \
        f"--output {out} is not empty and is not the output of an earlier `qembed adapt`"  # fmt: skip
    assert expected in err, err
    assert sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*")) == before


@pytest.mark.parametrize("flag", ["--compare-model", "--reranker", "--model"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_missing_model_fails_before_any_stage_naming_its_flag(flag, dry_run, slice_args, tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    args = [*slice_args, "--output", str(tmp_path / "out"), flag, missing, *(["--dry-run"] if dry_run else [])]
    assert main(["adapt", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"qembed adapt: error: {flag} {missing}: model folder not found"), err
    assert not (tmp_path / "out").exists()


def test_model_is_required_in_the_help_of_adapt_and_eval(capsys):
    for verb in ("adapt", "eval"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        usage = capsys.readouterr().out.split("\n\n", 1)[0]
        assert re.search(r" --model M[ ,]", usage) and "[--model" not in usage, usage  # required: no brackets


def test_qa_to_beir_gives_adapts_split_and_eval_warns_on_a_leaked_split(full_run, slice_args, tmp_path):
    from qembed.data.beir import read_qrels, read_queries

    out, _ = full_run
    qa = slice_args[slice_args.index("--qa") + 1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    folders = {}
    for seed in (0, 1):
        folders[seed] = tmp_path / f"beir-seed{seed}"
        subprocess.run([sys.executable, "-m", "qembed", "data", "qa-to-beir", "--input", qa, "--question-field",
                        "instruction", "--answer-field", "output", "--seed", str(seed), "--output", str(folders[seed])],
                       env=env, check=True, capture_output=True)  # fmt: skip
    adapt_beir = out / "data" / "beir"
    texts = read_queries(adapt_beir / "queries.jsonl")
    assert read_queries(folders[0] / "queries.jsonl") == texts
    for split in ("train", "dev", "test"):  # the same file, fields and seed: the same split in both verbs
        assert read_qrels(folders[0] / "qrels" / f"{split}.tsv") == read_qrels(adapt_beir / "qrels" / f"{split}.tsv")
    assert read_qrels(folders[1] / "qrels" / "test.tsv") != read_qrels(adapt_beir / "qrels" / "test.tsv")

    def evaluate_best(folder):
        return subprocess.run([sys.executable, "-m", "qembed", "eval", "--model", str(out / "best"), "--dataset",
                               str(folder), "--output", str(folder.with_name(folder.name + "-eval")), "--no-progress"],
                              env=env, capture_output=True, text=True, check=True)  # fmt: skip

    honest = evaluate_best(folders[0])  # adapt's own test split: no warning
    assert "WARNING" not in honest.stderr + honest.stdout
    leaked = evaluate_best(folders[1])  # another seed: its test split holds many of best/'s training queries
    train_texts = {texts[q] for q in read_qrels(adapt_beir / "qrels" / "train.tsv")}
    test_texts = [texts[q] for q in read_qrels(folders[1] / "qrels" / "test.tsv")]
    overlap = sum(t in train_texts for t in test_texts)
    assert overlap > 0
    line = f"WARNING: {overlap} of the {len(test_texts)} test queries of {folders[1]} are queries {out / 'best'} was trained on"
    assert line in leaked.stderr and line in leaked.stdout.splitlines()[-2 if "chosen on" in leaked.stdout else -1]


def test_footprint_and_console_dev_metrics(full_run):
    out, stdout = full_run
    assert re.search(r"step \d+: dev ndcg@10 \d+\.\d\d, recall@1 ", stdout), stdout  # dev metrics on the console
    assert not (out / "train" / "model" / "checkpoints").exists()  # removed once training is done
    best_t = json.loads((out / "merge" / "curve.json").read_text())["best_t"]
    kept = sorted(p.name for p in (out / "merge").iterdir() if p.is_dir())
    assert kept == ([] if best_t == 1.0 else [f"t{best_t}"])  # only the chosen merge (t = 1 is train/model)
    assert json.loads((out / "best" / "training_queries.json").read_text())["train"]


def _squad_file(path: Path) -> list[tuple[str, list[str]]]:
    """A SQuAD-style file (CMRC2018 / DRCD shape) in Chinese and English: (paragraph, its questions)."""
    crops = [("水稻", "rice"), ("玉米", "maize"), ("小麦", "wheat"), ("大豆", "soybean"), ("棉花", "cotton"),
             ("油菜", "rapeseed"), ("花生", "peanut"), ("高粱", "sorghum"), ("谷子", "millet"), ("甘薯", "sweet potato")]
    paragraphs = []
    for i, (zh, en) in enumerate(crops):
        paragraphs.append((f"{zh}第{i}号品种在{i + 3}月播种，每亩施氮肥{10 + i}公斤，抗{zh}病能力强。",
                           [f"{zh}第{i}号品种什么时候播种？", f"{zh}第{i}号品种每亩施多少氮肥？"]))  # fmt: skip
        paragraphs.append((f"The {en} variety {i} is sown in month {i + 3} and needs {10 + i} kg of nitrogen per mu.",
                           [f"When is the {en} variety {i} sown?", f"How much nitrogen does {en} variety {i} need?"]))
    data = {"version": "v1.0", "data": [
        {"title": f"article {a}", "paragraphs": [
            {"id": f"p{a}-{j}", "context": context,
             "qas": [{"id": f"q{a}-{j}-{k}", "question": q, "answers": [{"text": context[:4], "answer_start": 0}]}
                     for k, q in enumerate(questions)]}
            for j, (context, questions) in enumerate(paragraphs[a::4])]}
        for a in range(4)]}  # fmt: skip
    data["data"][0]["paragraphs"][0]["qas"].append({"id": "x", "question": "unanswerable?", "is_impossible": True})
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return paragraphs


def test_squad_json_through_qa_to_beir_and_adapt(tiny_embedder_path, tmp_path):
    from qembed.data.beir import read_qrels, read_queries
    from qembed.data.corpus import read_corpus

    squad = tmp_path / "cmrc-like.json"
    paragraphs = _squad_file(squad)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    beir = tmp_path / "beir"
    proc = subprocess.run([sys.executable, "-m", "qembed", "data", "qa-to-beir", "--input", str(squad), "--output",
                           str(beir)], env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    corpus = read_corpus(beir)
    queries = read_queries(beir / "queries.jsonl")
    assert sorted(corpus.values()) == sorted(p for p, _ in paragraphs)  # paragraphs -> corpus
    assert sorted(queries.values()) == sorted(q for _, qs in paragraphs for q in qs)  # questions -> queries
    judged = {q: j for split in ("train", "dev", "test") for q, j in read_qrels(beir / "qrels" / f"{split}.tsv").items()}
    context_of = {q: p for p, qs in paragraphs for q in qs}
    assert {queries[q]: [corpus[d] for d in j] for q, j in judged.items()} == {q: [p] for q, p in context_of.items()}

    out = tmp_path / "run"  # adapt --qa with the same file: the same split, then every stage on a tiny model
    adapt("--model", str(tiny_embedder_path), "--output", str(out), "--qa", str(squad), "--keep-checkpoints",
          "--set", "train.batch_size=4", "--set", "train.max_length=48", "--set", "train.evaluations=0",
          "--set", "train.save_steps=2", "--set", "merge.t=[1.0]", "--set", "eval.instruction_modes=[none]")  # fmt: skip
    for split in ("train", "dev", "test"):
        assert read_qrels(out / "data" / "beir" / "qrels" / f"{split}.tsv") == read_qrels(beir / "qrels" / f"{split}.tsv")
    assert list((out / "train" / "model" / "checkpoints").glob("step-*"))  # --keep-checkpoints


def test_time_checkpoint_resumes_a_kill_before_the_first_step_checkpoint(shared_dir, tiny_embedder_path, tmp_path):
    """save_steps beyond the run: only the time-based checkpoint (every step here, 10 minutes by default) exists
    when the run is killed; the plan says what resuming will do, and the report counts every attempt's time."""
    rows = json.loads((shared_dir / "data" / "agri-zh" / "corn_dqa_zh.json").read_text(encoding="utf-8"))[:100]
    (tmp_path / "qa.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "run"
    args = ["--model", str(tiny_embedder_path), "--output", str(out), "--qa", str(tmp_path / "qa.json"),
            "--question-field", "instruction", "--answer-field", "output", "--set", "train.batch_size=8",
            "--set", "train.max_length=48", "--set", "train.epochs=3", "--set", "train.evaluations=0",
            "--set", "merge.t=[1.0]", "--set", "eval.instruction_modes=[none]", "--set", "train.save_steps=1000"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    checkpoints = out / "train" / "model" / "checkpoints"

    def run_until(ready, *extra):
        proc = subprocess.Popen([sys.executable, "-m", "qembed", "adapt", *args, "--no-progress", *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 500
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert ready() and not (out / "merge").exists(), "the run was not killed during training"

    # 1. killed in training with no checkpoint at all (time-based ones off): the plan says training restarts
    run_until(lambda: _state(out).get("train", {}).get("seconds", 0) > 0, "--set", "train.save_minutes=0")
    assert not list(checkpoints.glob("step-*"))
    dry = adapt(*args, "--dry-run").stdout
    assert re.search(r"train +will resume \(interrupted; no checkpoint yet: training restarts\)", dry), dry

    # 2. killed again once a time-based checkpoint exists (long before step 1000)
    run_until(lambda: bool(list(checkpoints.glob("step-*"))), "--set", "train.save_minutes=0.0001")
    killed_at = _state(out)["train"]["seconds"]
    assert killed_at > 0  # the killed attempts' time is on disk
    dry = adapt(*args, "--dry-run").stdout
    assert re.search(r"train +will resume \(interrupted\)\n", dry), dry

    again = adapt(*args)
    assert re.search(r"resuming from .*step-\d+ \(step [1-9]", again.stderr), again.stderr[-2000:]
    seconds = json.loads((out / "summary.json").read_text())["seconds"]["train"]["seconds"]
    assert seconds > killed_at  # every attempt counted, not only the last one
