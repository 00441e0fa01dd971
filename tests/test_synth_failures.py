"""Synthesis failures: local-backend runtime errors are transient, permanent rejects are counted apart from
jobs already done, a run where no job succeeds exits non-zero, and a local LLM that cannot load is one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from llm_server import ScriptedLLMServer

from qembed.cli import main
from qembed.data.corpus import Document
from qembed.data.jsonl import read_jsonl
from qembed.synth.generate import SynthConfig, rejects_path, synthesize
from qembed.synth.llm import LocalChat
from qembed.synth.personas import PersonaMatcher

TEXT = "Rice blast is a fungal disease of rice. Farmers spray tricyclazole at booting to control it."
PERSONAS = ["A rice farmer in Hunan.", "A plant pathologist."]


@pytest.fixture(scope="module")
def server():
    with ScriptedLLMServer() as s:
        yield s


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("device-side assert")])
def test_local_out_of_memory_and_runtime_errors_are_transient(tiny_reranker_path, tmp_path, error):
    def failing(prompts, **kwargs):
        raise error

    llm = LocalChat(str(tiny_reranker_path), device="cpu")
    llm.generate = failing
    out = tmp_path / "o.jsonl"
    stats = synthesize([Document("d0", TEXT)], out, llm, matcher=PersonaMatcher(PERSONAS), show_progress=False)
    assert (stats.done, stats.failed) == (0, 1)
    (reject,) = read_jsonl(rejects_path(out))
    assert reject["transient"] is True and type(error).__name__ in reject["reason"]
    # a transient failure is retried by the next run, not counted as done or rejected
    llm.generate = lambda prompts, **kwargs: ["not json"] * len(prompts)
    again = synthesize([Document("d0", TEXT)], out, llm, matcher=PersonaMatcher(PERSONAS), show_progress=False,
                       config=SynthConfig(max_repairs=0))  # fmt: skip
    assert (again.skipped, again.rejected_before, again.failed) == (0, 0, 1)


def _corpus(tmp_path, cases):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"[case={c}] {TEXT}"}) + "\n"
                              for i, c in enumerate(cases)))  # fmt: skip
    personas = tmp_path / "personas.txt"
    personas.write_text("\n".join(PERSONAS) + "\n")
    return corpus, personas


def _synth(server, corpus, personas, out, *extra):
    return main(["synth", "--corpus", str(corpus), "--personas", str(personas), "--llm-base-url", server.base_url,
                 "--llm-model", "scripted-llm", "--max-repairs", "0", "--output", str(out), *extra])  # fmt: skip


def test_permanent_rejects_are_counted_apart_from_done(server, tmp_path, capsys, monkeypatch):
    corpus, personas = _corpus(tmp_path, ["good", "garbage", "good"])
    out = tmp_path / "out.jsonl"
    monkeypatch.setenv("QEMBED_PROGRESS_INTERVAL", "0")
    assert _synth(server, corpus, personas, out) == 0
    captured = capsys.readouterr()
    assert "wrote 2 record(s)" in captured.out
    assert re.search(r"^qembed: synth: 3/3 query \(100%\), .* done=2, failed=1$", captured.err, re.MULTILINE)
    assert _synth(server, corpus, personas, out) == 0  # nothing left to do is not a failure
    printed = capsys.readouterr().out
    assert "wrote 0 record(s)" in printed and "2 already done" in printed
    assert "1 rejected for good in an earlier run (not retried; --overwrite starts afresh)" in printed
    assert _synth(server, corpus, personas, out, "--overwrite", "--no-progress") == 0
    captured = capsys.readouterr()
    assert "wrote 2 record(s)" in captured.out and "0 already done" in captured.out and "earlier" not in captured.out
    assert captured.err == "" and len(read_jsonl(out)) == 2 and len(read_jsonl(rejects_path(out))) == 1


def test_exit_status_is_non_zero_when_no_job_succeeds(server, tmp_path, capsys):
    corpus, personas = _corpus(tmp_path, ["garbage", "invalid"])
    out = tmp_path / "out.jsonl"
    assert _synth(server, corpus, personas, out) == 1
    captured = capsys.readouterr()
    assert "2 failed" in captured.out
    assert captured.err.strip().splitlines() == [
        f"qembed synth: error: no query was generated: all 2 job(s) failed (see {rejects_path(out)})"
    ]


@pytest.mark.parametrize("config, device", [("{not json", "cpu"), ('{"model_type": "no-such-arch"}', "cpu"),
                                            (None, "no-such-device")])
def test_local_llm_that_cannot_load_is_one_line_exit_2(tiny_reranker_path, tmp_path, capsys, config, device):
    corpus, personas = _corpus(tmp_path, ["good"])
    path = tiny_reranker_path
    if config is not None:
        path = tmp_path / "bad-llm"
        path.mkdir()
        (path / "config.json").write_text(config, encoding="utf-8")
    code = main(["synth", "--corpus", str(corpus), "--personas", str(personas), "--llm-local", str(path),
                 "--device", device, "--output", str(tmp_path / "o.jsonl")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"qembed synth: error: cannot load local LLM {str(path)!r}"), err


def test_output_equal_to_corpus_and_offline_embed_model_errors(tmp_path, capsys):
    corpus, personas = _corpus(tmp_path, ["good"])
    code = main(["synth", "--corpus", str(corpus), "--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "m",
                 "--output", str(corpus)])  # fmt: skip
    assert code == 2 and "is also --corpus" in capsys.readouterr().err
    code = main(["synth", "--corpus", str(corpus), "--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "m",
                 "--embed-model", "no-such-org/no-such-model", "--output", str(tmp_path / "o.jsonl")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--embed-model" in err and "--model " not in err, err
