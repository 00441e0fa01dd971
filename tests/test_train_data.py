import json
import random

import pytest

from qembed.cli import main
from qembed.errors import QembedError
from qembed.train.data import TrainRecord, contrastive_batch, epoch_batches, pair_batch, read_training_data


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_reading_validates_records(tmp_path):
    good = _write(tmp_path / "a.jsonl", [{"query": "q", "pos": "p", "neg": ["n"], "instruction": "find"}])
    records = read_training_data([good])
    assert records[0].pos == ["p"] and records[0].instruction == "find" and records[0].source == 0
    bad = _write(tmp_path / "b.jsonl", [{"query": "q", "pos": ["p"]}, {"query": "q2", "pos": []}])
    with pytest.raises(QembedError, match=r"b.jsonl:2: 'pos'"):
        read_training_data([bad])
    with pytest.raises(QembedError, match="no training records"):
        read_training_data([_write(tmp_path / "empty.jsonl", [])])


def test_epoch_batches_seeded_and_same_source():
    records = [TrainRecord(f"q{i}", ["p"], [], source=i % 3) for i in range(20)]
    a = epoch_batches(records, 4, seed=1, epoch=0)
    assert a == epoch_batches(records, 4, seed=1, epoch=0)
    assert a != epoch_batches(records, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(20))
    grouped = epoch_batches(records, 4, seed=1, epoch=0, same_source=True, min_size=2)
    assert all(len({records[i].source for i in b}) == 1 for b in grouped)
    assert all(len(b) >= 2 for b in grouped)


def test_contrastive_batch_layout_and_text_mask():
    records = [
        TrainRecord("q0", ["shared answer"], ["n0a", "n0b", "shared answer"]),
        TrainRecord("q1", ["p1", "shared answer"], ["n1"]),
    ]
    batch = contrastive_batch(records, [0, 1], num_negatives=5, rng=random.Random(0))
    # record 0: its negative equal to its positive is skipped
    assert batch.docs[:3] == ["shared answer", "n0a", "n0b"]
    assert batch.owner.tolist() == [0, 0, 0, 1, 1] and batch.pos_index.tolist()[0] == 0
    # "shared answer" is a positive of both queries: flagged for both wherever it appears
    for i in range(2):
        for j, doc in enumerate(batch.docs):
            assert bool(batch.same_text[i, j]) == (doc in records[i].pos)
    pairs = pair_batch(records, [0], num_negatives=1, rng=random.Random(0))
    assert pairs[0] == ("q0", "shared answer", None, 1.0) and len(pairs) == 2 and pairs[1][3] == 0.0


def test_cli_bad_data_is_one_line_error(tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [{"query": "", "pos": ["p"]}])
    code = main(
        ["train", "embedder", "--model", "unused", "--data", str(bad), "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "'query' must be a non-empty string" in err and "Traceback" not in err
