"""The quality filter with the real all-MiniLM-L6-v2: related pairs kept, unrelated dropped, duplicates
dropped, and the report's counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from qembed.cli import main
from qembed.data.jsonl import read_jsonl, write_jsonl
from qembed.errors import QembedError
from qembed.synth.filter import filter_file, filter_records, length_bucket

ROOT = Path(__file__).resolve().parent.parent
RICE = "Rice blast is a fungal disease of rice. Farmers control rice blast by spraying fungicides and planting resistant varieties."
RUN = "Beginners training for a marathon should build weekly mileage gradually over a training plan of 16 to 20 weeks."
LAW = "The court held that the tenant was entitled to the return of the security deposit."


def _rec(query, pos, qtype="acquire_knowledge", difficulty="university", language="en"):
    meta = {"question_type": qtype, "difficulty": difficulty, "language": language}
    return {"query": query, "pos": [pos], "neg": [], "query_id": query[:20], "pos_ids": ["x"], "meta": meta}


RECORDS = [
    _rec("how to control rice blast disease", RICE),  # related: kept
    _rec("best marathon training plan for beginners", RUN, "keywords", "high_school"),  # related: kept
    _rec("how to control rice blast disease", RICE, "summary"),  # exact duplicate
    _rec("How to control rice-blast disease?", RICE, "yes_or_no", "phd"),  # near duplicate
    _rec("best marathon training plan for beginners", LAW, "keywords"),  # unrelated: dropped
    _rec("how to control rice blast disease", LAW, "background"),  # unrelated (and would be a duplicate)
    {"query": "", "pos": [RICE]},  # malformed
]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    from qembed import Embedder

    return Embedder.from_pretrained(str(minilm_path), device="cpu")


def test_filter_keeps_related_drops_unrelated_and_duplicates(minilm):
    kept, report = filter_records(RECORDS, minilm, threshold=0.7)
    assert [(r["query"], r["pos"][0]) for r in kept] == [
        ("how to control rice blast disease", RICE),
        ("best marathon training plan for beginners", RUN),
    ]
    assert all(r["meta"]["score"] > 0.7 for r in kept)
    assert report.total == 7 and report.kept == 2
    assert report.dropped == {"malformed": 1, "cosine <= 0.7": 2, "duplicate query": 1,
                              "near-duplicate query (same normalised text)": 1}  # fmt: skip
    assert report.before["question_type"]["keywords"] == 2 and report.after["question_type"]["keywords"] == 1
    assert report.before["difficulty"]["phd"] == 1 and report.after["difficulty"]["phd"] == 0
    assert report.after["language"] == {"en": 2}
    assert report.after["length"] == {"6-10 words": 2}
    text = report.format()
    assert "kept 2 of 7" in text and "near-duplicate" in text and "question_type:" in text


def test_threshold_changes_what_is_kept(minilm):
    kept_all, report = filter_records(RECORDS[:2] + RECORDS[4:6], minilm, threshold=-1.0)
    assert len(kept_all) == 2  # with no similarity bar, the unrelated pairs fall to the duplicate check
    assert report.dropped == {"duplicate query": 2}
    kept_none, report = filter_records(RECORDS[:2], minilm, threshold=0.99)
    assert kept_none == [] and report.dropped == {"cosine <= 0.99": 2}


def test_length_bucket_by_language():
    assert length_bucket({"query": "水稻稻瘟病应该如何防治", "meta": {"language": "zh"}}) == "11-20 chars"
    assert length_bucket({"query": " ".join(["w"] * 45)}) == "41+ words"


@pytest.mark.slow
def test_filter_file_and_cli(minilm_path, tmp_path, capsys):
    src = tmp_path / "synth.jsonl"
    write_jsonl(src, RECORDS[:2] + RECORDS[4:5])
    with pytest.raises(QembedError, match="differ"):
        filter_file(src, src, str(minilm_path))
    out = tmp_path / "kept.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "qembed", "filter", "--model", str(minilm_path), "--input", str(src),
         "--threshold", "0.7", "--output", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "kept 2 of 3" in result.stdout and "cosine <= 0.7" in result.stdout
    kept = read_jsonl(out)
    assert [r["query"] for r in kept] == [RECORDS[0]["query"], RECORDS[1]["query"]]
    assert json.loads(out.read_text().splitlines()[0])["meta"]["score"] > 0.7

    # --balance through the CLI (in this process): equal shares of the question types
    write_jsonl(src, [RECORDS[0], RECORDS[1], _rec("rice blast fungicide spraying", RICE)])
    balanced = tmp_path / "balanced.jsonl"
    assert main(["filter", "--model", str(minilm_path), "--input", str(src), "--threshold", "0.3", "--balance",
                 "meta.question_type", "--seed", "3", "--output", str(balanced), "--device", "cpu"]) == 0  # fmt: skip
    assert "dropped       1  balance meta.question_type (equal shares)" in capsys.readouterr().out
    assert Counter(r["meta"]["question_type"] for r in read_jsonl(balanced)) == {"acquire_knowledge": 1, "keywords": 1}
    assert main(["filter", "--model", str(minilm_path), "--input", str(src), "--balance", "meta.domain=code:0.2",
                 "--output", str(balanced)]) == 2  # fmt: skip
    assert capsys.readouterr().err.splitlines() == ["qembed filter: error: --balance: no record has meta.domain"]
