"""Reranker SFT on the tiny Qwen3 reranker (yes/no) and a tiny BERT cross-encoder (BCE)."""

import json
from pathlib import Path

import numpy as np
import pytest

from qembed.train.loop import TrainConfig
from qembed.train.reranker import train_reranker

TOPICS = ["rice", "maize", "wheat", "soybean", "potato", "tomato"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rr-data") / "train.jsonl"
    with path.open("w") as f:
        for i, topic in enumerate(TOPICS):
            other = TOPICS[(i + 2) % len(TOPICS)]
            record = {
                "query": f"{topic} disease",
                "pos": [f"{topic} disease control"],
                "neg": [f"{other} recipes"],
            }
            f.write(json.dumps(record) + "\n")
    return path


def _margin(rr) -> float:
    """Mean score of positives minus mean score of negatives on the training pairs."""
    pos = [rr.score(f"{t} disease", [f"{t} disease control"])[0] for t in TOPICS]
    neg = [
        rr.score(f"{t} disease", [f"{TOPICS[(i + 2) % len(TOPICS)]} recipes"])[0]
        for i, t in enumerate(TOPICS)
    ]
    return float(np.mean(pos) - np.mean(neg))


def test_qwen3_reranker_lora_sft_learns_yes_no(tiny_reranker_path, pairs_file, tmp_path):
    from qembed import Reranker
    from qembed.data.beir import write_beir

    beir = tmp_path / "beir"
    corpus = {f"d{i}": {"text": f"{t} disease control"} for i, t in enumerate(TOPICS)}
    corpus.update({f"n{i}": {"text": f"{t} recipes"} for i, t in enumerate(TOPICS)})
    write_beir(beir, corpus, {f"q{i}": f"{t} disease" for i, t in enumerate(TOPICS)},
               {"test": {f"q{i}": {f"d{i}": 1} for i in range(len(TOPICS))}})  # fmt: skip
    out = tmp_path / "rr"
    cfg = TrainConfig(model=str(tiny_reranker_path), data=[str(pairs_file)], output=str(out), batch_size=3,
                      epochs=4, lora=True, lora_r=8, lr=5e-3, save_steps=0, progress=False, seed=0,
                      eval_dataset=str(beir), eval_split="test", eval_steps=8)  # fmt: skip
    result = train_reranker(cfg)
    assert result.steps == 8
    evals = [
        json.loads(line)["eval"]
        for line in (out / "train_log.jsonl").read_text().splitlines()
        if '"eval"' in line
    ]
    assert len(evals) == 1 and 0 < evals[0]["mrr@10"] <= 1
    assert np.mean(result.losses[-2:]) < np.mean(result.losses[:2])
    trained = Reranker.from_pretrained(out, device="cpu")
    base = Reranker.from_pretrained(tiny_reranker_path, device="cpu")
    assert trained.kind == "qwen3"
    assert _margin(trained) > _margin(base) + 0.05


def test_cross_encoder_bce_and_resume_args(minilm_path, pairs_file, tmp_path):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from qembed import Reranker

    model_dir = tmp_path / "tiny-ce"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(model_dir)
    out = tmp_path / "ce-out"
    cfg = TrainConfig(model=str(model_dir), data=[str(pairs_file)], output=str(out), batch_size=6, epochs=15,
                      lr=1e-2, save_steps=0, progress=False, grad_cache_chunk=4)  # fmt: skip
    result = train_reranker(cfg)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    trained = Reranker.from_pretrained(out, device="cpu")
    assert trained.kind == "cross-encoder"
    assert _margin(trained) > _margin(Reranker.from_pretrained(model_dir, device="cpu")) + 0.05
