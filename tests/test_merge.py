"""Checkpoint merging on tiny random Qwen3 models."""

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
    with pytest.raises(QembedError, match="different architectures"):
        merge_models([tiny_embedder_path, tiny_reranker_path], tmp_path / "x", method="linear")
    wide = _bare_model(tmp_path / "wide", 0, intermediate_size=96)
    with pytest.raises(QembedError, match="shape"):
        merge_models([pair[0], wide], tmp_path / "y", method="slerp")
    with pytest.raises(QembedError, match="exactly two"):
        merge_models([pair[0]] * 3, tmp_path / "z", method="slerp")
    proc = subprocess.run([sys.executable, "-m", "qembed", "merge", "--models",
                           f"{tiny_embedder_path},{tiny_reranker_path}", "--output", str(tmp_path / "cli")], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "different architectures" in proc.stderr and "Traceback" not in proc.stderr


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
