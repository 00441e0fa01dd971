"""The local transformers backend with a tiny random Qwen3 causal LM: its output is garbage, so every
document must end up in the rejects file and the run must finish cleanly."""

from __future__ import annotations

import pytest

from qembed.data.corpus import Document
from qembed.data.jsonl import read_jsonl
from qembed.synth.generate import SynthConfig, rejects_path, synthesize
from qembed.synth.llm import CHATML_TEMPLATE, LocalChat
from qembed.synth.personas import PersonaMatcher


@pytest.mark.slow
def test_local_backend_batches_and_run_ends_with_rejects(tiny_reranker_path, tmp_path):
    llm = LocalChat(str(tiny_reranker_path), batch_size=4, device="cpu")
    assert llm.tokenizer.chat_template == CHATML_TEMPLATE  # the tiny tokenizer has none: ChatML fallback
    prompt = llm._prompt([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    batch_sizes = []
    generate = llm.generate

    def counting_generate(prompts, **kw):
        batch_sizes.append(len(prompts))
        return generate(prompts, **kw)

    llm.generate = counting_generate
    docs = [Document(f"d{i}", f"Rice blast note {i}: the fungus spreads in humid weather.") for i in range(3)]
    out = tmp_path / "local.jsonl"
    config = SynthConfig(max_tokens=8, max_repairs=1, temperature=0.0, concurrency=3)
    stats = synthesize(docs, out, llm, matcher=PersonaMatcher(["A farmer.", "A scientist."]), config=config,
                       show_progress=False)  # fmt: skip
    assert (stats.done, stats.failed) == (0, 3)
    assert not out.exists() or read_jsonl(out) == []
    rejects = read_jsonl(rejects_path(out))
    assert sorted(r["query_id"] for r in rejects) == ["d0-q0", "d1-q0", "d2-q0"]
    for r in rejects:
        assert r["stage"] == "config" and not r["transient"] and r["llm_model"] == tiny_reranker_path.name
        assert len(r["raw"]) == 2 and all(isinstance(x, str) for x in r["raw"])
    assert max(batch_sizes) == 3  # concurrent requests were generated together
    assert sum(batch_sizes) == 6  # 3 documents x (answer + one repair)

    prompts = [llm._prompt([{"role": "user", "content": t}]) for t in ("short", "a much longer prompt than the first")]
    sampled = generate(prompts, max_tokens=4, temperature=0.8)
    assert len(sampled) == 2 and all(isinstance(t, str) for t in sampled)
    assert generate(prompts, max_tokens=4, temperature=0.0) == generate(prompts, max_tokens=4, temperature=0.0)

