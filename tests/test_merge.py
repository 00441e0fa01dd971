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
from qembed.testing import build_qwen3_embedding

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def second_embedder(tmp_path_factory) -> Path:
    return build_qwen3_embedding(tmp_path_factory.mktemp("tiny-emb-b"), seed=7)


def _state(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def test_merge_with_itself_returns_it(tiny_embedder_path, tmp_path):
    from qembed import Embedder

    for method in ("slerp", "linear"):
        out = merge_models([tiny_embedder_path, tiny_embedder_path], tmp_path / method, method=method)
        a, b = _state(tiny_embedder_path), _state(out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        merged = Embedder.from_pretrained(out, device="cpu")
        base = Embedder.from_pretrained(tiny_embedder_path, device="cpu")
        assert merged.default_instruction == base.default_instruction
        np.testing.assert_array_equal(merged.encode_queries(["rice"]), base.encode_queries(["rice"]))


def test_slerp_endpoints_and_midpoint(tiny_embedder_path, second_embedder, tmp_path):
    a, b = _state(tiny_embedder_path), _state(second_embedder)
    s0 = _state(merge_models([tiny_embedder_path, second_embedder], tmp_path / "t0", method="slerp", t=0.0))
    s1 = _state(merge_models([tiny_embedder_path, second_embedder], tmp_path / "t1", method="slerp", t=1.0))
    mid = _state(merge_models([tiny_embedder_path, second_embedder], tmp_path / "mid", method="slerp", t=0.5))
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


def test_linear_weights(tiny_embedder_path, second_embedder, tmp_path):
    out = merge_models(
        [tiny_embedder_path, second_embedder], tmp_path / "lin", method="linear", weights=[1, 3]
    )
    a, b, m = _state(tiny_embedder_path), _state(second_embedder), _state(out)
    for k in a:
        torch.testing.assert_close(m[k], 0.25 * a[k] + 0.75 * b[k], rtol=1e-6, atol=1e-7)


def test_mismatches_raise_clear_errors(tiny_embedder_path, tiny_reranker_path, tmp_path):
    with pytest.raises(QembedError, match="architectures differ"):
        merge_models([tiny_embedder_path, tiny_reranker_path], tmp_path / "x", method="linear")
    wide = build_qwen3_embedding(tmp_path / "wide", seed=0, intermediate_size=96)
    with pytest.raises(QembedError, match="shape"):
        merge_models([tiny_embedder_path, wide], tmp_path / "y", method="slerp")
    with pytest.raises(QembedError, match="exactly two"):
        merge_models([tiny_embedder_path] * 3, tmp_path / "z", method="slerp")
    proc = subprocess.run([sys.executable, "-m", "qembed", "merge", "--models", str(tiny_embedder_path),
                           str(tiny_reranker_path), "--output", str(tmp_path / "cli")], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "error" in proc.stderr and "Traceback" not in proc.stderr


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
