"""Small, fast end-to-end training runs on the tiny random Qwen3 embedder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qembed.train.embedder import train_embedder
from qembed.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["rice", "maize", "wheat", "soybean", "potato", "tomato", "cotton", "barley"]
ASPECTS = ["disease", "fertiliser", "irrigation"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with path.open("w") as f:
        for i, topic in enumerate(TOPICS):
            for aspect in ASPECTS:
                other = TOPICS[(i + 1) % len(TOPICS)]
                record = {
                    "query": f"how to manage {topic} {aspect}",
                    "pos": [f"{aspect} guidance for {topic} growers"],
                    "neg": [f"{aspect} guidance for {other} growers", f"{topic} market prices"],
                }
                f.write(json.dumps(record) + "\n")
    return path


def _cfg(model, data, out, **kw):
    base = dict(model=str(model), data=[str(data)], output=str(out), batch_size=6, epochs=2, lr=2e-3,
                progress=False, save_steps=0, seed=3)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_full_finetune_loss_goes_down_and_output_loads(tiny_embedder_path, train_file, tmp_path):
    from qembed import Embedder
    from qembed.data.beir import write_beir

    beir = tmp_path / "beir"
    corpus = {f"d{i}": {"text": f"disease guidance for {t} growers"} for i, t in enumerate(TOPICS)}
    queries = {f"q{i}": f"how to manage {t} disease" for i, t in enumerate(TOPICS)}
    write_beir(beir, corpus, queries, {"test": {f"q{i}": {f"d{i}": 1} for i in range(len(TOPICS))}})
    out = tmp_path / "out"
    cfg = _cfg(tiny_embedder_path, train_file, out, lora=False, epochs=3, eval_dataset=str(beir), eval_steps=6,
               eval_split="test")
    result = train_embedder(cfg)
    assert result.steps == 12 and len(_losses(out)) == 12
    evals = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [6, 12] and 0 <= evals[-1]["eval"]["ndcg@10"] <= 1
    assert result.best["step"] in (6, 12) and (out / "checkpoints" / "best" / "trainable.safetensors").is_file()
    assert np.mean(result.losses[-3:]) < 0.5 * np.mean(result.losses[:3])
    trained = Embedder.from_pretrained(out, device="cpu")
    base = Embedder.from_pretrained(tiny_embedder_path, device="cpu")
    assert trained.default_instruction == base.default_instruction and trained.pooling == "lasttoken"
    queries = [f"how to manage {t} disease" for t in TOPICS]
    docs = [f"disease guidance for {t} growers" for t in TOPICS]

    def accuracy(model):
        q, d = model.encode_queries(queries), model.encode_documents(docs)
        return float(np.mean((q @ d.T).argmax(1) == np.arange(len(TOPICS))))

    assert np.allclose(np.linalg.norm(trained.encode(["x"]), axis=1), 1.0, atol=1e-5)
    assert accuracy(trained) > accuracy(base)


def test_lora_with_gradcache_exports_merged_model(tiny_embedder_path, train_file, tmp_path):
    from qembed import Embedder

    merged = tmp_path / "merged"
    train_embedder(_cfg(tiny_embedder_path, train_file, merged, lora=True, lora_r=4, epochs=1, grad_cache_chunk=4,
                        mrl_dims=[32]))  # fmt: skip
    model = Embedder.from_pretrained(merged, device="cpu")
    assert not any("lora" in name for name, _ in model.model.named_parameters())
    base = Embedder.from_pretrained(tiny_embedder_path, device="cpu")
    assert not np.allclose(model.encode(["rice blast"]), base.encode(["rice blast"]), atol=1e-4)


DRIVER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from qembed.train.embedder import train_embedder
from qembed.train.loop import TrainConfig
cfg = TrainConfig(**__import__("json").loads(sys.argv[1]))
def on_step(record):
    if record["step"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
train_embedder(cfg, on_step=on_step)
"""


def test_resume_after_kill_reproduces_uninterrupted_loss_curve(tiny_embedder_path, train_file, tmp_path):
    # LoRA dropout makes the run depend on the RNG state, which the checkpoint must restore
    kw = dict(
        lora=True, lora_r=4, lora_dropout=0.2, save_steps=2, grad_accum=2, batch_size=4, merge_lora=False
    )
    straight = tmp_path / "straight"
    train_embedder(_cfg(tiny_embedder_path, train_file, straight, **kw))
    expected = _losses(straight)
    assert len(expected) == 6  # 2 epochs of 6 batches, 2 batches per step

    killed = tmp_path / "killed"
    cfg = _cfg(tiny_embedder_path, train_file, killed, **kw)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg.__dict__)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(_losses(killed)) == 3 and not (killed / "adapter_config.json").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-2"]

    with pytest.raises(Exception, match="--resume"):
        train_embedder(_cfg(tiny_embedder_path, train_file, killed, **kw))
    train_embedder(_cfg(tiny_embedder_path, train_file, killed, resume=True, **kw))
    resumed = _losses(killed)
    assert len(resumed) == 6
    np.testing.assert_allclose(resumed, expected, rtol=1e-5)
    # merge_lora=False exports the adapter only
    assert (killed / "adapter_config.json").is_file() and (killed / "adapter_model.safetensors").is_file()
