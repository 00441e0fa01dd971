"""Instruction search on a planted fixture: a BEIR folder whose relevant documents are the queries in the Qwen3
template with one instruction (PLANTED), beside decoy documents that are the same queries formatted with every
other candidate (the model's default, none, the closest mteb task's). A query formatted with a candidate encodes
exactly like its decoy, so on the dev split PLANTED, and only PLANTED, ranks every relevant document first,
whatever the weights. The test split can be planted for another candidate: the choice must not move.

`qembed eval --instruction-search` (the CLI's main), `qembed adapt`'s instruction stage with the candidates an
LLM (the scripted server) writes, `best/`'s prompts, and `qembed serve` on `best/` (a real server process)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from llm_server import ScriptedLLMServer

from qembed.cli import main
from qembed.models.prompts import DEFAULT_QUERY_INSTRUCTION, format_query, query_prefix

PLANTED = "Given a grower's field note, retrieve the matching field record"
WORDS = ["yellow", "spotted", "curled", "wilted", "brown", "dry", "pale", "torn", "mottled", "striped", "burnt",
         "limp", "red", "grey", "thin", "soft", "black", "white", "bent", "patchy"]  # fmt: skip


def questions(n: int, start: int = 0) -> list[str]:
    return [f"why are the {WORDS[i % len(WORDS)]} leaves in plot {i} of farm {i * 7 % 13}?" for i in range(start, start + n)]


def write_planted(folder: Path, splits: dict[str, list[str]], winners: dict[str, str | None]) -> Path:
    """A BEIR folder: for each query, one document per candidate format; the one of `winners[split]` is relevant."""
    from qembed.eval.instruction_search import closest_mteb_task

    (folder / "qrels").mkdir(parents=True)
    mteb = closest_mteb_task([q for name in ("train", "dev") for q in splits.get(name, [])], folder.name)
    assert mteb is not None and mteb.instruction not in (PLANTED, DEFAULT_QUERY_INSTRUCTION)
    settings = list(dict.fromkeys([PLANTED, DEFAULT_QUERY_INSTRUCTION, None, mteb.instruction]))
    corpus, queries = [], []
    for name, texts in splits.items():
        rows = []
        for i, query in enumerate(texts):
            qid = f"{name}{i}"
            queries.append({"_id": qid, "text": query})
            for j, setting in enumerate(settings):
                corpus.append({"_id": f"{qid}-d{j}", "text": format_query(query, setting)})
                if setting == winners[name]:
                    rows.append(f"{qid}\t{qid}-d{j}\t1")
        (folder / "qrels" / f"{name}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(d) + "\n" for d in queries))
    return folder


def eval_search(tiny: Path, dataset: Path, out: Path, capsys) -> tuple[dict, list[dict], str]:
    code = main(["eval", "--model", str(tiny), "--dataset", str(dataset), "--instruction-search", "--instruction",
                 PLANTED, "--output", str(out), "--cache-dir", str(out.parent / "cache"), "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    search = json.loads((out / "instruction_search.json").read_text())
    return search, json.loads((out / "metrics.json").read_text()), printed


def test_eval_instruction_search_picks_the_dev_winner_whatever_the_test_split(tiny_embedder_path, tmp_path, capsys,
                                                                               one_torch_thread):  # fmt: skip
    dev, test = questions(8), questions(6, 8)
    same = write_planted(tmp_path / "a" / "farm", {"dev": dev, "test": test}, {"dev": PLANTED, "test": PLANTED})
    other = write_planted(tmp_path / "b" / "farm", {"dev": dev, "test": test}, {"dev": PLANTED, "test": None})
    runs = [eval_search(tiny_embedder_path, folder, tmp_path / f"out-{i}", capsys) for i, folder in enumerate([same, other])]

    (search, metrics, printed), (search_b, metrics_b, printed_b) = runs
    rows = search["models"][0]["rows"]
    sources = [r["source"] for r in rows]
    assert sources == ["default", "none", "mteb:NFCorpus", "given"]  # every candidate scored on dev
    scores = {r["source"]: r["score"] for r in rows}
    assert scores["given"] == 1.0 and max(v for k, v in scores.items() if k != "given") < 1.0  # the plant
    chosen = rows[search["models"][0]["chosen"]]
    assert chosen["source"] == "given" and chosen["instruction"] == PLANTED
    for row in rows:  # each candidate's dev score is printed, then the choice
        assert f"{100 * row['score']:6.2f}  {row['source']}" in printed
    assert f"chosen: given ({PLANTED})" in printed
    # the test evaluation runs with the choice
    assert [(m["split"], m["instruction"]) for m in metrics] == [("test", PLANTED)]
    assert metrics[0]["metrics"]["ndcg@10"] == 1.0

    # a test split planted for bare queries: test figures change, the choice and the dev figures do not
    assert search_b["models"][0]["rows"] == rows and search_b["models"][0]["chosen"] == search["models"][0]["chosen"]
    assert metrics_b[0]["instruction"] == PLANTED and metrics_b[0]["metrics"]["ndcg@10"] < 0.5
    assert printed_b.split("\nfarm (test)")[0] == printed.split("\nfarm (test)")[0]


def test_eval_instruction_search_bad_input_is_one_line(tiny_embedder_path, tmp_path, capsys):
    folder = write_planted(tmp_path / "farm", {"train": questions(4), "test": questions(4, 4)},
                           {"train": PLANTED, "test": PLANTED})  # fmt: skip
    cases = [([], "needs a dev split"), (["--dev-split", "train", "--split", "train"], "evaluate another --split"),
             (["--dev-split", "train", "--search-metric", "ndcg"], "at a cut-off"),
             (["--dev-split", "train", "--llm-base-url", "http://127.0.0.1:9/v1"], "need both --llm-base-url and --llm-model"),
             (["--dev-split", "train", "--instruction-modes", "none"], "drop --instruction-modes")]  # fmt: skip
    for extra, message in [*cases, (["--llm-model", "m"], "add it")]:
        search = ["--instruction-search"] if message != "add it" else []
        code = main(["eval", "--model", str(tiny_embedder_path), "--dataset", str(folder), *search,
                     "--output", str(tmp_path / "out"), *extra])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_written_prompt_is_the_folder_default(tiny_embedder_path, tmp_path):
    """`write_query_prompt`: an instruction, or an empty prompt (bare queries, not the Qwen3 default), becomes
    what `encode_queries` applies; sentence-transformers reads the same prompt."""
    from qembed import Embedder
    from qembed.eval.instruction_search import write_query_prompt
    from qembed.models.prompts import NO_INSTRUCTION, QueryFormat

    folder = tmp_path / "model"
    shutil.copytree(tiny_embedder_path, folder)
    texts = ["why are the leaves yellow?"]
    write_query_prompt(folder, QueryFormat("instruction", PLANTED))
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {"query": query_prefix(PLANTED), "document": ""}
    emb = Embedder.from_pretrained(folder)
    assert emb.default_instruction == PLANTED
    assert np.array_equal(emb.encode_queries(texts), emb.encode(texts, instruction=PLANTED))
    write_query_prompt(folder, NO_INSTRUCTION)
    emb = Embedder.from_pretrained(folder)
    assert emb.default_query_format == NO_INSTRUCTION
    assert np.array_equal(emb.encode_queries(texts), emb.encode(texts, instruction=None))
    assert not np.allclose(emb.encode_queries(texts), emb.encode(texts, instruction=DEFAULT_QUERY_INSTRUCTION))


def test_adapt_unreachable_instruction_llm_is_one_line_before_any_work(tiny_embedder_path, tmp_path, capsys):
    import socket

    folder = write_planted(tmp_path / "farm", {"train": questions(4), "test": questions(2, 4)},
                           {"train": PLANTED, "test": PLANTED})  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for extra, message in [(["--llm-model", "m"], "LLM server unreachable"), ([], "needs --llm-model")]:
        code = main(["adapt", "--model", str(tiny_embedder_path), "--dataset", str(folder), "--output",
                     str(tmp_path / "run"), "--llm-base-url", f"http://127.0.0.1:{port}/v1", *extra])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def adapt_run(tiny_embedder_path, tmp_path_factory):
    """`qembed adapt --dataset` on a planted folder (train for dev, test planted for bare queries), with the
    scripted LLM writing candidates from train pairs."""
    root = tmp_path_factory.mktemp("adapt-instruction")
    folder = write_planted(root / "farm", {"train": questions(16), "test": questions(6, 16)},
                           {"train": PLANTED, "test": None})  # fmt: skip
    with ScriptedLLMServer() as server:
        code = main(["adapt", "--model", str(tiny_embedder_path), "--dataset", str(folder), "--output", str(root / "run"),
                     "--llm-base-url", server.base_url, "--llm-model", "scripted-llm", "--set", "data.dev_fraction=0.3",
                     "--set", "train.batch_size=4", "--set", "train.epochs=1", "--set", "train.max_length=48",
                     "--set", "train.evaluations=0", "--set", "merge.t=[1.0]", "--set", "negatives.num_negatives=2",
                     "--no-progress"])  # fmt: skip
        requests = [r["body"]["messages"][-1]["content"] for r in server.requests]
    assert code == 0
    return root / "run", requests


def test_adapt_instruction_stage_picks_the_planted_instruction(adapt_run):
    from qembed.data.beir import read_queries

    out, requests = adapt_run
    # the LLM saw train pairs only: never a dev or test query
    assert len(requests) == 1 and "task instructions for a text embedding model" in requests[0]
    queries = read_queries(out / "data" / "beir" / "queries.jsonl")
    from qembed.data.beir import read_qrels

    for split in ("dev", "test"):
        assert not any(queries[q] in requests[0] for q in read_qrels(out / "data" / "beir" / "qrels" / f"{split}.tsv"))
    candidates = json.loads((out / "instruction" / "candidates.json").read_text())
    assert [c["source"] for c in candidates][:3] == ["default", "none", "mteb:NFCorpus"]
    assert {"source": "llm", "instruction": PLANTED} in candidates
    base = json.loads((out / "instruction" / "base.json").read_text())
    assert base["split"] == "dev" and base["rows"][base["chosen"]]["instruction"] == PLANTED
    # every evaluated model (base, the fine-tuned one) chose it on dev and is evaluated with it
    searches = json.loads((out / "final" / "instructions.json").read_text())
    assert set(searches) == {"base", "fine-tuned"}
    for search in searches.values():
        assert search["rows"][search["chosen"]]["instruction"] == PLANTED and search["split"] == "dev"
    summary = json.loads((out / "summary.json").read_text())
    choice = summary["recommendation"]
    assert choice["instruction"] == PLANTED and choice["dev"]["ndcg@10"] == 1.0
    # test figures never influenced the choice: on this test split bare queries do far better than the choice
    test = {(r["variant"], r["instruction"]): r["metrics"]["ndcg@10"] for r in summary["results"] if r["set"] == "test"}
    assert test[("base", None)] > test[("base", PLANTED)] + 0.3
    report = (out / "report.md").read_text()
    assert "## Query instruction (dev ndcg@10)" in report and f"| llm | {PLANTED} | **100.00** | **100.00** |" in report
    assert "instruction “Given a grower's field note, retrieve t…”" in report


def test_best_carries_the_choice_and_serve_applies_it(adapt_run):
    import httpx
    from serve_helpers import start_server

    from qembed import Embedder

    out, _ = adapt_run
    config = json.loads((out / "best" / "config_sentence_transformers.json").read_text())
    assert config["prompts"]["query"] == query_prefix(PLANTED)
    card = (out / "best" / "README.md").read_text()
    assert f"> {PLANTED}" in card  # the model card's usage names the deployed instruction
    query = "why are the yellow leaves in plot 0 of farm 0?"
    emb = Embedder.from_pretrained(out / "best")
    expected = emb.encode([query], instruction=PLANTED)[0]
    server = start_server(["--model", str(out / "best"), "--served-model-name", "best"], out.parent / "serve.log")
    try:
        answer = httpx.post(f"{server.url}/v1/embeddings", json={"model": "best", "input": [query], "input_type": "query"},
                            timeout=60)  # fmt: skip
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    served = np.asarray(answer.json()["data"][0]["embedding"], dtype=np.float32)
    assert np.allclose(served, expected, atol=1e-5)
    assert not np.allclose(served, emb.encode([query], instruction=DEFAULT_QUERY_INSTRUCTION)[0], atol=1e-3)
