"""The configuration of `qembed adapt`: defaults with their comments, YAML loading, command-line overrides,
validation and the commented `--print-config` output."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from qembed.errors import QembedError
from qembed.negatives import MiningConfig

MINING = MiningConfig()

# (default, comment) leaves; nested dicts are sections. The defaults and how they were chosen: docs/adapt.md,
# "Defaults, and how they were chosen".
SPEC: dict[str, Any] = {
    "model": (None, "base embedder to adapt: a model folder or hub id"),
    "output": (None, "run folder: one sub-folder per stage, report.md, summary.json, best/"),
    "compare_models": ([], "more embedders measured as baselines (e.g. BAAI/bge-m3)"),
    "seed": (0, "seed of the split, mining samples and training"),
    "keep_checkpoints": (False, "keep training checkpoints once training is done (default: removed)"),
    "data": {
        "qa": ([], "question-answer files (JSON array, JSONL, CSV or SQuAD JSON); the answers become the corpus"),
        "question_field": (None, "field of the question in the QA files (SQuAD: question)"),
        "answer_field": (None, "field of the answer in the QA files (SQuAD: context, the paragraph)"),
        "encoding": ("utf-8", "text encoding of the QA files (e.g. gb18030)"),
        "format": (None, "json | jsonl | csv | squad (default: from the file extension; SQuAD JSON is detected)"),
        "corpus": (None, "documents to write queries for with an LLM (corpus.jsonl, JSONL with a text field, .txt)"),
        "text_field": ("text", "text field of a JSONL corpus"),
        "llm_base_url": (None, "OpenAI-compatible server that writes the queries (with corpus)"),
        "llm_model": (None, "model name sent to that server"),
        "api_key_env": (None, "environment variable holding the server's API key"),
        "dataset": (None, "an existing BEIR folder with qrels/train.tsv and qrels/test.tsv"),
        "dev_fraction": (0.1, "share of the queries held out as dev (the only split automatic choices see)"),
        "test_fraction": (0.2, "share of the queries held out as test (QA / LLM sources)"),
        "max_dev": (500, "at most this many dev queries"),
        "max_test": (1000, "at most this many test queries"),
    },
    "synth": {
        "languages": (["en"], "query languages, drawn per query (e.g. [zh, en])"),
        "queries_per_doc": (1, "LLM-written queries per document"),
        "limit": (None, "only the first N documents"),
        "concurrency": (8, "documents in flight"),
        "timeout": (120.0, "seconds per LLM request attempt"),
        "max_retries": (5, "retries on 429/5xx/timeouts"),
        "personas": (None, "persona file (default: the built-in library)"),
        "embed_model": (None, "embedder matching personas to documents (default: the base model)"),
        "filter_threshold": (0.7, "keep a written query when its cosine to the document, by the base model, is above this"),
    },
    "negatives": {  # the `qembed mine` defaults, but for the margin rule (see docs/adapt.md)
        "num_negatives": (MINING.num_negatives, "hard negatives mined per train query"),
        "range_min": (MINING.range_min, "candidates start at this rank (0-based)"),
        "range_max": (MINING.range_max, "and end before this rank"),
        "max_score": (MINING.max_score, "drop candidates scoring above this (likely unjudged positives)"),
        "margin": (None, "drop candidates scoring above positive score minus this (null: off; training's "
                         "false-negative mask judges with the model being trained)"),
    },
    "train": {
        "lora": (None, "true: LoRA adapters; false: full fine-tuning; null: LoRA above 300M parameters"),
        "epochs": (2, "passes over the train queries"),
        "batch_size": (32, "queries per step (each with its positive and hard negatives)"),
        "lr": (1e-4, "peak learning rate (null: 1e-4 LoRA, 2e-5 full)"),
        "num_negatives": (2, "mined hard negatives per query and step"),
        "max_length": (128, "token limit per text while training (evaluation uses the model's own limit)"),
        "temperature": (None, "InfoNCE temperature (null: 0.01 last-token models, 0.05 mean/CLS pooling)"),
        "qq_dd": (True, "Qwen3 in-batch query-query and document-document terms"),
        "fn_margin": (0.1, "false-negative mask margin (null: off)"),
        "warmup_ratio": (0.1, "share of steps with linear warm-up"),
        "scheduler": ("linear", "linear | cosine decay"),
        "weight_decay": (0.01, "AdamW weight decay"),
        "lora_r": (16, "LoRA rank"),
        "lora_alpha": (32, "LoRA alpha"),
        "lora_dropout": (0.05, "LoRA dropout"),
        "grad_cache_chunk": (None, "GradCache chunk size in texts (null: plain batch); bounds training memory, "
                                   "e.g. 32: MiniLM at batch 32 x 128 tokens peaked at 2.6 GB instead of 4.9 GB"),
        "grad_accum": (1, "micro-batches per optimizer step"),
        "gradient_checkpointing": (False, "recompute activations in the backward pass"),
        "mrl_dims": (None, "Matryoshka dims, e.g. [64, 128, 256]"),
        "evaluations": (3, "dev evaluations during training (evenly spaced; 0: none)"),
        "save_steps": (50, "checkpoint every N steps (what a killed run resumes from)"),
        "save_minutes": (10.0, "also checkpoint when this many minutes passed since the last checkpoint (0: off)"),
        "precision": ("auto", "auto | fp32 | bf16 | fp16 (autocast on GPU)"),
        "device": (None, "cpu | cuda | cuda:N (default: CUDA when present)"),
    },
    "merge": {
        "t": ([0.3, 0.5, 0.7, 1.0], "slerp weights of the fine-tuned model (0 = base, 1 = fine-tuned)"),
    },
    "reranker": {
        "model": (None, "reranker to fine-tune on the mined pairs and evaluate retrieve-then-rerank"),
        "rerank_top": (30, "candidates reranked per query"),
        "epochs": (1, "reranker training passes"),
        "batch_size": (16, "reranker training records per step"),
        "lr": (None, "null: 1e-4 LoRA, 2e-5 full"),
        "lora": (None, "null: LoRA above 300M parameters"),
        "num_negatives": (3, "negatives per positive"),
        "max_length": (512, "token limit per pair"),
    },
    "instruction": {
        "search": (True, "choose the query instruction on dev (the model's default, none, the closest mteb task's, "
                         "candidates, LLM-written) for each model; best/ gets the recommended one"),
        "candidates": ([], "more instructions to try (--instruction)"),
        "llm_count": (3, "instructions the LLM of data.llm_base_url writes from train pairs (0: none)"),
    },
    "eval": {
        "metric": ("ndcg@10", "dev metric behind every automatic choice (merge t, recommended variant)"),
        "k": ([1, 5, 10, 30, 100], "cut-offs reported"),
        "instruction_modes": (["default", "none"], "query instruction settings compared (model default, none)"),
        "index": ("faiss", "vector index for evaluation and mining (faiss, hnsw, milvus:PATH)"),
        "retention_dataset": (None, "general-domain BEIR folder: what the domain gain costs elsewhere"),
        "cache_dir": (None, "embedding cache (default: the shared one, $QEMBED_CACHE or ~/.cache/qembed/embeddings)"),
    },
}


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers: `3e-5` is a float (PyYAML's YAML 1.1 rules read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_yaml(text: str):
    """Parse YAML text with YAML 1.2 number rules."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def defaults(spec: dict = SPEC) -> dict:
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v[0]) for k, v in spec.items()}


def merge_into(base: dict, update: dict, spec: dict = SPEC, where: str = "") -> dict:
    """`update` laid over `base`; unknown keys raise `QembedError` naming them."""
    for key, value in update.items():
        name = f"{where}{key}"
        if key not in spec:
            raise QembedError(f"unknown configuration key {name!r} (known: {', '.join(sorted(spec))})")
        if isinstance(spec[key], dict):
            if not isinstance(value, dict):
                raise QembedError(f"configuration key {name!r} must be a section (a mapping)")
            merge_into(base[key], value, spec[key], name + ".")
        else:
            _check_type(name, spec[key][0], value)
            base[key] = value
    return base


def _check_type(name: str, default: Any, value: Any) -> None:
    """A value must have its default's kind (numbers mix; a `None` default takes anything)."""
    if default is None or value is None:
        return
    kinds = [(bool, "true or false"), ((int, float), "a number"), (str, "a text"), (list, "a list")]
    for kind, words in kinds:
        if isinstance(default, kind):
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise QembedError(f"configuration key {name!r} must be {words}, got {value!r}")
            return


def set_dotted(update: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        update = update.setdefault(part, {})
    update[leaf] = value


def resolve(config_file: str | None, overrides: dict) -> dict:
    """Defaults, then the YAML file, then `overrides` (a nested dict of values set on the command line)."""
    cfg = defaults()
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise QembedError(f"config file not found: {path}")
        try:
            loaded = load_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise QembedError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise QembedError(f"{path}: expected a mapping of options")
        merge_into(cfg, loaded)
    merge_into(cfg, overrides)
    return cfg


def source_of(cfg: dict) -> str:
    """`qa`, `llm` or `dataset`; raises a one-line error unless exactly one data source is given."""
    data = cfg["data"]
    given = [name for name, flag in (("qa", "--qa"), ("llm", "--corpus"), ("dataset", "--dataset"))
             if (data["qa"] if name == "qa" else data["corpus" if name == "llm" else "dataset"])]  # fmt: skip
    if not given:
        raise QembedError("no data source: give --qa FILE (with --question-field/--answer-field), "
                          "--corpus FILE with --llm-base-url/--llm-model, or --dataset BEIR_DIR")  # fmt: skip
    if len(given) > 1:
        raise QembedError(f"choose one data source, got {' and '.join(given)}")
    return given[0]


def dump(cfg: dict, spec: dict = SPEC, indent: int = 0) -> str:
    """The configuration as YAML with each key's comment."""
    lines = []
    pad = "  " * indent
    for key, item in spec.items():
        if isinstance(item, dict):
            lines.append(f"{pad}{key}:")
            lines.append(dump(cfg[key], item, indent + 1))
            continue
        value = yaml.safe_dump(cfg[key], default_flow_style=True, allow_unicode=True, width=1000).strip()
        value = value.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{pad}{key}: {value}  # {item[1]}")
    return "\n".join(lines)
