"""Checkpoint merging on tiny random Qwen3 models in the published layouts and on the real all-MiniLM-L6-v2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qembed.errors import QembedError
from qembed.merge import merge_models, slerp

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bare_model(path: Path, seed: int, **overrides) -> Path:
    """A small-vocabulary Qwen3Model folder without tokenizer: enough for tensor-level merge checks."""
    from transformers import Qwen3Model

    from qembed.testing import qwen3_config

    torch.manual_seed(seed)
    params = dict(vocab_size=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    Qwen3Model(qwen3_config(**{**params, **overrides})).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bare")
    return _bare_model(root / "a", 0), _bare_model(root / "b", 7)


def _state(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def test_merge_with_itself_returns_it(tiny_embedder_path, tmp_path):
    from qembed import Embedder

    out = merge_models([tiny_embedder_path, tiny_embedder_path], tmp_path / "slerp", method="slerp")
    a, b = _state(tiny_embedder_path), _state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged = Embedder.from_pretrained(out, device="cpu")
    base = Embedder.from_pretrained(tiny_embedder_path, device="cpu")
    assert merged.default_instruction == base.default_instruction and merged.pooling == base.pooling
    np.testing.assert_array_equal(merged.encode_queries(["rice"]), base.encode_queries(["rice"]))


def test_linear_merge_with_itself_returns_it(pair, tmp_path):
    out = merge_models([pair[0]] * 3, tmp_path / "linear", method="linear", weights=[0.2, 0.3, 0.5])
    a, b = _state(pair[0]), _state(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=0)


def test_slerp_endpoints_and_midpoint(pair, tmp_path):
    a, b = _state(pair[0]), _state(pair[1])
    s0 = _state(merge_models(pair, tmp_path / "t0", method="slerp", t=0.0))
    s1 = _state(merge_models(pair, tmp_path / "t1", method="slerp", t=1.0))
    mid = _state(merge_models(pair, tmp_path / "mid", method="slerp", t=0.5))
    key = "layers.0.mlp.up_proj.weight"
    assert all(torch.equal(s0[k], a[k]) for k in a) and all(torch.equal(s1[k], b[k]) for k in b)
    # independent random matrices are ~orthogonal: the slerp midpoint keeps the norm that linear averaging
    # loses; with omega the angle between them, slerp(t=.5) = (a + b) / (2 cos(omega / 2))
    lin = (a[key] + b[key]) / 2
    assert mid[key].norm() > 1.3 * lin.norm()
    cos = float(torch.nn.functional.cosine_similarity(a[key].flatten(), b[key].flatten(), dim=0))
    torch.testing.assert_close(mid[key], lin / np.cos(np.arccos(cos) / 2), rtol=1e-4, atol=1e-6)


def test_slerp_function_parallel_fallback_and_angle():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 2.0])
    m = slerp(a, b, 0.5)
    # angle 45° to both axes; magnitude interpolates along the arc between a and b
    assert float(m[0]) == pytest.approx(np.sin(np.pi / 4) / 1.0, rel=1e-6)
    assert float(m[1]) == pytest.approx(2 * np.sin(np.pi / 4), rel=1e-6)
    assert torch.allclose(slerp(a, 3 * a, 0.5), 2 * a)  # parallel: linear


def test_linear_weights(pair, tmp_path):
    out = merge_models(pair, tmp_path / "lin", method="linear", weights=[1, 3])
    a, b, m = _state(pair[0]), _state(pair[1]), _state(out)
    for k in a:
        torch.testing.assert_close(m[k], 0.25 * a[k] + 0.75 * b[k], rtol=1e-6, atol=1e-7)


def test_mismatches_raise_clear_errors(pair, tiny_embedder_path, tiny_reranker_path, tmp_path):
    with pytest.raises(QembedError, match="parameter names differ"):  # flat Qwen3Model keys vs model.* + head
        merge_models([tiny_embedder_path, tiny_reranker_path], tmp_path / "x", method="linear")
    wide = _bare_model(tmp_path / "wide", 0, intermediate_size=96)
    with pytest.raises(QembedError, match="shape"):
        merge_models([pair[0], wide], tmp_path / "y", method="slerp")
    with pytest.raises(QembedError, match="exactly two"):
        merge_models([pair[0]] * 3, tmp_path / "z", method="slerp")
    proc = subprocess.run([sys.executable, "-m", "qembed", "merge", "--models",
                           f"{tiny_embedder_path},{tiny_reranker_path}", "--output", str(tmp_path / "cli")], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "parameter names differ" in proc.stderr and "Traceback" not in proc.stderr


def test_lora_adapter_is_merged_into_base_first(tiny_reranker_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    from qembed import Reranker

    torch.manual_seed(0)
    model = Qwen3ForCausalLM.from_pretrained(tiny_reranker_path)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().state_dict()
    out = merge_models([tmp_path / "adapter", tmp_path / "adapter"], tmp_path / "merged", method="linear")
    got = _state(out)
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[key], expected[key])
    assert not torch.equal(got[key], _state(tiny_reranker_path)[key])
    rr = Reranker.from_pretrained(out, device="cpu")
    assert rr.kind == "qwen3" and 0.0 <= rr.score("q", ["d"])[0] <= 1.0


# ---------------------------------------------------------------- fine-tuned models merged with their base

TOPICS = ["rice", "maize", "wheat", "soybean"]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("merge-data") / "train.jsonl"
    rows = [{"query": f"{t} disease", "pos": [f"{t} disease control"], "neg": [f"{t} market prices"]} for t in TOPICS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(kind: str, base: Path, data: Path, out: Path, **kw) -> Path:
    from qembed.train.embedder import train_embedder
    from qembed.train.loop import TrainConfig
    from qembed.train.reranker import train_reranker

    params = dict(model=str(base), data=[str(data)], output=str(out), batch_size=4, max_steps=2, lora=True,
                  lora_r=4, lr=2e-2, save_steps=0, progress=False, seed=0)  # fmt: skip
    (train_embedder if kind == "embedder" else train_reranker)(TrainConfig(**{**params, **kw}))
    return out


def _keys(path: Path) -> set[str]:
    return set(_state(path))


def _assert_between(mid: dict, a: dict, b: dict) -> int:
    """Every float tensor of `mid` lies strictly between `a` and `b` where they differ (equal where they agree);
    returns how many tensors differ."""
    differ = 0
    for key, x in a.items():
        y, m = b[key], mid[key]
        if not x.is_floating_point() or torch.equal(x, y):
            assert torch.equal(m, x), key
            continue
        differ += 1
        x, y, m = x.double(), y.double(), m.double()
        span = float((y - x).norm())
        assert 0 < float((m - x).norm()) < span and 0 < float((m - y).norm()) < span, key
        along = float(((m - x) * (y - x)).sum()) / span**2  # position along the segment a -> b
        assert 0.3 < along < 0.7, (key, along)
    return differ


@pytest.fixture(scope="module")
def adapters(tiny_embedder_path, tiny_reranker_path, train_file, tmp_path_factory) -> dict[str, Path]:
    """LoRA adapters (`--no-merge-lora` exports) trained on the published-layout fixtures, built on demand."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            base = tiny_embedder_path if kind == "embedder" else tiny_reranker_path
            built[kind] = _train(kind, base, train_file, tmp_path_factory.mktemp(kind) / "adapter", merge_lora=False)
        return built[kind]

    return get


@pytest.mark.parametrize("kind", ["embedder", "reranker"])
def test_lora_adapter_on_published_layout_merges_with_base(kind, request, adapters, tmp_path):
    """Issue 9: an adapter trained on the real layout must load fully; the merge lies between base and tuned."""
    from qembed import Embedder, Reranker

    base = request.getfixturevalue(f"tiny_{kind}_path")
    adapter = adapters(kind)
    assert (adapter / "adapter_config.json").is_file()
    record = json.loads((adapter / "qembed.json").read_text())
    assert record["backbone"] == ("Qwen3Model" if kind == "embedder" else "Qwen3ForCausalLM")
    a = _state(base)
    ends = [_state(merge_models([base, adapter], tmp_path / f"t{t}", method="slerp", t=t)) for t in (0.0, 1.0)]
    assert ends[0].keys() == a.keys() == ends[1].keys()
    assert all(torch.equal(ends[0][k], a[k]) for k in a)
    mid_dir = merge_models([base, adapter], tmp_path / "mid", method="slerp", t=0.5)
    changed = _assert_between(_state(mid_dir), a, ends[1])
    assert changed >= 4  # every LoRA target of every layer moved (the bug left the output bit-identical to the base)
    loader = Embedder if kind == "embedder" else Reranker
    assert loader.from_pretrained(mid_dir, device="cpu") is not None


def test_adapter_weight_left_unloaded_is_an_error(tiny_embedder_path, adapters, tmp_path):
    import shutil

    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(adapters("embedder"), adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = sorted(weights)[0]
    weights[key.replace("layers.0.", "layers.9.")] = weights.pop(key)  # a module the model does not have
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(QembedError, match="adapter weight.*not loaded"):
        merge_models([tiny_embedder_path, adapter], tmp_path / "x", method="slerp")


@pytest.mark.parametrize("kind", ["embedder", "reranker"])
def test_finetuned_export_keeps_base_names_records_itself_and_merges(kind, request, train_file, tmp_path):
    """Issue 9/13: a qembed export has its base's parameter names and config, says what it is, and merges with
    its base in both orders, by slerp and linear."""
    base = request.getfixturevalue(f"tiny_{kind}_path")
    tuned = _train(kind, base, train_file, tmp_path / "tuned", mrl_dims=[32] if kind == "embedder" else None)
    assert _keys(tuned) == _keys(base)
    config = json.loads((tuned / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    record = json.loads((tuned / "qembed.json").read_text())
    want = {"kind": kind, "dtype": "float32"}
    if kind == "embedder":
        want.update(backbone="Qwen3Model", pooling="lasttoken", matryoshka=True)
    else:
        want.update(backbone="Qwen3ForCausalLM", reranker="qwen3")
    assert {k: record.get(k) for k in want} == want
    a, b = _state(base), _state(tuned)
    for order in ((base, tuned), (tuned, base)):
        mid = _state(merge_models(order, tmp_path / "slerp", method="slerp", t=0.5))
        assert _assert_between(mid, a, b) >= 4
    mid = _state(merge_models([base, tuned], tmp_path / "linear", method="linear", weights=[1, 1]))
    assert _assert_between(mid, a, b) >= 4


def test_minilm_finetuned_by_the_cli_merges_with_its_base(minilm_path, train_file, tmp_path):
    """Issue 13: the base stores `embeddings.position_ids`; the fine-tuned copy keeps it and both merge."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    tuned = tmp_path / "ft"
    train = [sys.executable, "-m", "qembed", "train", "embedder", "--model", str(minilm_path), "--data",
             str(train_file), "--output", str(tuned), "--full", "--max-steps", "1", "--batch-size", "4",
             "--lr", "1e-3", "--save-steps", "0"]  # fmt: skip
    proc = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "embeddings.position_ids" in _keys(tuned) and _keys(tuned) == _keys(minilm_path)
    a, b = _state(minilm_path), _state(tuned)
    merged = merge_models([minilm_path, tuned], tmp_path / "merged", method="slerp", t=0.5)
    assert _assert_between(_state(merged), a, b) > 30
    reverse = merge_models([tuned, minilm_path], tmp_path / "rev", method="linear")
    assert _assert_between(_state(reverse), a, b) > 30


def test_derived_tensors_are_not_parameter_names_that_differ(minilm_path, tmp_path):
    """A third-party copy without the `position_ids` buffer still merges with the base that stores it."""
    import shutil

    from safetensors.torch import save_file

    copy = tmp_path / "copy"
    shutil.copytree(minilm_path, copy)
    weights = load_file(str(copy / "model.safetensors"))
    del weights["embeddings.position_ids"]
    weights["pooler.dense.bias"] = weights["pooler.dense.bias"] + 0.5
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    for order in ((minilm_path, copy), (copy, minilm_path)):
        out = merge_models(order, tmp_path / "m", method="slerp", t=0.5)
        got = _state(out)
        assert _keys(order[0]) == set(got)
        assert _assert_between(got, weights, _state(minilm_path)) == 1
