"""`qembed data convert` and direct reading of other trainers' pair formats: qembed JSONL <-> ms-swift embedding
rows <-> sentence-transformers columns, in JSONL, Parquet and `datasets` folders; lossless round trips (what a
format cannot carry is said and tested), and `train` / `mine` / `filter` reading converted files as the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qembed.cli import main
from qembed.data.formats import to_rows
from qembed.data.pairs import read_pairs
from qembed.errors import QembedError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INSTRUCTION = "Given a farming question, retrieve the passage that answers it"
RECORDS = [
    {"query": "how to grow rice", "pos": ["Rice needs flooded fields."], "neg": ["Wheat likes dry soil.", "Tea grows on hills."],
     "instruction": INSTRUCTION, "pos_ids": ["d1"], "neg_ids": ["d2", "d3"], "neg_scores": [0.5, 0.25],
     "meta": {"language": "en", "difficulty": "easy"}},
    {"query": "水稻 病虫害 防治", "pos": ["稻瘟病的防治：选用抗病品种，合理施肥。"], "source": "synth", "meta": {"language": "zh"}},
    {"query": "maize spacing", "pos": ["Plant maize 25 cm apart."], "neg": ["Barley is sown in autumn."],
     "instruction": "Find the agronomy advice"},
]  # fmt: skip
CORE = ("query", "pos", "neg", "instruction")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def convert(src: Path, dst: Path, to: str, capsys, source: str | None = None) -> str:
    assert main(["data", "convert", *(["--from", source] if source else []), "--to", to, "--input", str(src),
                 "--output", str(dst)]) == 0  # fmt: skip
    return capsys.readouterr().out


def core(record: dict) -> dict:
    return {k: record[k] for k in CORE if k in record}


@pytest.mark.parametrize("target", ["swift.jsonl", "swift.parquet", "swift-folder", "st.jsonl", "st.parquet", "st-folder"])
def test_qembed_round_trip(target, tmp_path, capsys):
    original = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    fmt = target.split(".")[0].split("-")[0]
    converted = tmp_path / target
    printed = convert(original, converted, fmt, capsys, source="qembed")
    assert f"read 3 record(s), wrote 3 {fmt} row(s)" in printed
    back = tmp_path / "back.jsonl"
    convert(converted, back, "qembed", capsys)  # the format is detected from the first row
    if fmt == "swift":  # ms-swift rows carry every field
        assert read_jsonl(back) == RECORDS
    else:  # sentence-transformers columns carry the pairs and the instructions, nothing else (said so)
        assert read_jsonl(back) == [core(r) for r in RECORDS]
        assert "left out (sentence-transformers columns are all model inputs): meta, neg_ids, neg_scores, pos_ids, " \
               "source" in printed  # fmt: skip
        assert "2 row(s) have fewer negatives than the most" in printed


def test_rows_of_the_other_formats_round_trip(tmp_path, capsys):
    swift = [
        {"messages": [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": "rice?"}],
         "positive_messages": [[{"role": "user", "content": "Rice needs water."}]],
         "negative_messages": [[{"role": "user", "content": "Tea."}], [{"role": "user", "content": "Wheat."}]],
         "label": 1, "id": 7},
        {"messages": [{"role": "user", "content": "maize?"}], "positive_messages": [[{"role": "user", "content": "Corn."}]]},
    ]  # fmt: skip
    convert(write_jsonl(tmp_path / "swift.jsonl", swift), tmp_path / "q.jsonl", "qembed", capsys)
    assert read_jsonl(tmp_path / "q.jsonl") == [
        {"query": "rice?", "pos": ["Rice needs water."], "neg": ["Tea.", "Wheat."], "instruction": INSTRUCTION,
         "label": 1, "id": 7},
        {"query": "maize?", "pos": ["Corn."]},
    ]  # fmt: skip
    convert(tmp_path / "q.jsonl", tmp_path / "swift2.jsonl", "swift", capsys)
    assert read_jsonl(tmp_path / "swift2.jsonl") == swift

    st = [{"anchor": f"Instruct: {INSTRUCTION}\nQuery:rice?", "positive": "Rice.", "negative_1": "Tea.", "negative_2": "Oat."},
          {"anchor": "maize?", "positive": "Corn.", "negative_1": "Rye.", "negative_2": None}]  # fmt: skip
    convert(write_jsonl(tmp_path / "st.jsonl", st), tmp_path / "q2.parquet", "qembed", capsys)
    assert [core(r.record) for r in read_pairs(tmp_path / "q2.parquet")] == [
        {"query": "rice?", "pos": ["Rice."], "neg": ["Tea.", "Oat."], "instruction": INSTRUCTION},
        {"query": "maize?", "pos": ["Corn."], "neg": ["Rye."]},
    ]  # fmt: skip
    convert(tmp_path / "q2.parquet", tmp_path / "st2.jsonl", "st", capsys)
    assert read_jsonl(tmp_path / "st2.jsonl") == st


def test_several_positives_become_one_row_each(tmp_path, capsys):
    record = {"query": "q", "pos": ["a", "b"], "pos_ids": ["da", "db"], "neg": ["n"], "neg_ids": ["dn"]}
    printed = convert(write_jsonl(tmp_path / "p.jsonl", [record]), tmp_path / "s.jsonl", "swift", capsys)
    assert "1 record(s) with several positives became one swift row per positive" in printed
    rows = read_jsonl(tmp_path / "s.jsonl")
    assert [r["positive_messages"] for r in rows] == [[[{"role": "user", "content": "a"}]], [[{"role": "user", "content": "b"}]]]
    assert [r["pos_ids"] for r in rows] == [["da"], ["db"]] and all(r["neg_ids"] == ["dn"] for r in rows)
    assert [(p.pos, p.pos_ids) for p in read_pairs(tmp_path / "s.jsonl")] == [(["a"], ["da"]), (["b"], ["db"])]


def test_swift_reading_rules_and_errors(tmp_path, capsys):
    def one(row):
        [record] = read_pairs(write_jsonl(tmp_path / "r.jsonl", [row]))
        return record

    user = [{"role": "user", "content": "q"}]
    positive = [[{"role": "user", "content": "p"}]]
    # a system message already in the Qwen3 template gives its instruction (qembed applies the template itself)
    templated = one({"messages": [{"role": "system", "content": f"Instruct: {INSTRUCTION}\nQuery:"}, *user],
                     "positive_messages": positive})  # fmt: skip
    assert templated.instruction == INSTRUCTION
    # a document with a system message is the text ms-swift encodes: "{system} {content}"
    doc = one({"messages": user, "positive_messages": [[{"role": "system", "content": "Passage:"}, *positive[0]]]})
    assert doc.pos == ["Passage: p"]
    for row, message in [
        ({"messages": user, "positive_messages": positive, "label": 0}, "ms-swift cosine/contrastive-loss data"),
        ({"messages": user, "positive_messages": positive, "images": ["a.jpg"]}, "multimodal records are not supported"),
        ({"messages": [*user, {"role": "assistant", "content": "x"}], "positive_messages": positive}, "multi-turn"),
        ({"messages": user}, "'positive_messages' must be a non-empty list"),
    ]:
        with pytest.raises(QembedError, match=message):
            one(row)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": user, "positive_messages": positive, "label": 0.5}])
    assert main(["data", "convert", "--to", "st", "--input", str(bad), "--output", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qembed data convert: error: {bad}:1: 'label' 0.5") and err.count("\n") == 1
    assert not (tmp_path / "o.parquet").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    assert main(["data", "convert", "--to", "st", "--input", str(bad), "--output", str(tmp_path / "mine")]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "the user's"


def test_pos_aligned_fields_follow_their_positive():
    from qembed.data.pairs import parse_pair

    record = parse_pair({"query": "q", "pos": ["a", "b"], "pos_scores": [0.9, 0.8], "tag": "x"}, "test")
    rows, notes = to_rows([record], "swift")
    assert [r["pos_scores"] for r in rows] == [[0.9], [0.8]] and all(r["tag"] == "x" for r in rows)
    assert notes == {"split": 1}


@pytest.fixture(scope="module")
def training_pairs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    crops = ["rice", "maize", "wheat", "soybean", "potato", "tomato", "cotton", "barley"]
    rows = [{"query": f"how to grow {c}", "pos": [f"{c} growing guide"], "neg": [f"{crops[i - 1]} market prices"],
             **({"instruction": INSTRUCTION} if i % 2 else {}), "pos_ids": [f"d{i}"]} for i, c in enumerate(crops)]  # fmt: skip
    return write_jsonl(folder / "pairs.jsonl", rows)


def test_training_on_converted_data_gives_the_same_first_step_loss(training_pairs, tiny_embedder_path, tmp_path, capsys):
    losses = {}
    for name in ("pairs.jsonl", "swift.jsonl", "st.parquet", "st-folder"):
        data = training_pairs if name == "pairs.jsonl" else tmp_path / name
        if data != training_pairs:
            convert(training_pairs, data, name.split(".")[0].split("-")[0], capsys)
        out = tmp_path / f"model-{name}"
        assert main(["train", "embedder", "--model", str(tiny_embedder_path), "--data", str(data), "--output", str(out),
                     "--batch-size", "4", "--max-steps", "1", "--full", "--no-progress"]) == 0  # fmt: skip
        losses[name] = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses["pairs.jsonl"]) == 1 and losses["pairs.jsonl"][0] > 0
    assert losses["swift.jsonl"] == losses["pairs.jsonl"]
    assert losses["st.parquet"] == losses["pairs.jsonl"] and losses["st-folder"] == losses["pairs.jsonl"]


def test_mine_and_filter_read_converted_files(training_pairs, tiny_embedder_path, tmp_path, capsys):
    convert(training_pairs, tmp_path / "swift.parquet", "swift", capsys)
    convert(training_pairs, tmp_path / "st-folder", "st", capsys)
    outputs = {}
    for name, data in (("qembed", training_pairs), ("swift", tmp_path / "swift.parquet")):
        out = tmp_path / f"mined-{name}.jsonl"
        assert main(["mine", "--model", str(tiny_embedder_path), "--input", str(data), "--range-min", "0",
                     "--no-max-score", "--margin", "0", "--num-negatives", "2", "--cache-dir", str(tmp_path / "cache"),
                     "--output", str(out), "--no-progress"]) == 0  # fmt: skip
        outputs[name] = read_jsonl(out)
    assert outputs["swift"] == outputs["qembed"] and sum(len(r["neg"]) for r in outputs["qembed"]) >= 8
    for name, data in (("qembed", training_pairs), ("st", tmp_path / "st-folder")):
        out = tmp_path / f"filtered-{name}.jsonl"
        assert main(["filter", "--model", str(tiny_embedder_path), "--input", str(data), "--threshold", "-1",
                     "--output", str(out), "--no-progress"]) == 0  # fmt: skip
        outputs[f"filtered-{name}"] = [core(r) | {"score": r["meta"]["score"]} for r in read_jsonl(out)]
    assert outputs["filtered-st"] == outputs["filtered-qembed"] and len(outputs["filtered-st"]) == 8
