"""`TrainConfig` (the options of `qembed train`) and its checks, all made before any model is loaded: option
values, the model's hidden size and module names (read from its config, weights not loaded), and, when
resuming, that the run's options and data are those the checkpoints were written with.

Light on purpose (no torch at import): the CLI builds its parser from these defaults.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from qembed.errors import QembedError
from qembed.models.matryoshka import MIN_MRL_DIM
from qembed.negatives import MiningConfig

CONFIG_FILE = "train_config.json"
EVAL_KS = {"embedder": (1, 5, 10, 100), "reranker": (1, 5, 10)}
EVAL_METRICS = ("ndcg", "recall", "mrr")
# options a resumed run may change: they do not alter the training trajectory
RESUMABLE_CHANGES = frozenset(
    {"output", "resume", "progress", "device", "precision", "save_steps", "save_minutes", "save_total_limit",
     "eval_steps", "load_best", "merge_lora"}
)  # fmt: skip
AUTO = frozenset({"lr", "lora", "temperature", "lora_targets"})  # None: resolved from the model
FLAGS = {"qq_dd": "--qq-dd-terms", "lora": "--lora/--full", "merge_lora": "--no-merge-lora"}


@dataclass
class TrainConfig:
    """Options of `train_embedder` / `train_reranker` (the CLI flags of `qembed train`).

    `None` defaults are chosen from the model: `lora` (LoRA for models over 300M parameters, full fine-tuning
    below), `lr` (1e-4 with LoRA, 2e-5 full), `temperature` (embedder: 0.01 for last-token LLM embedders,
    0.05 for mean/CLS-pooling encoders), `lora_targets` (the attention and MLP projections of the family).
    `fn_margin=None` turns the false-negative mask off. A checkpoint is written every `save_steps` steps and
    also after any step that ends `save_minutes` or more after the last one (0 or None: by steps only). `eval_split="dev"` uses the dataset's dev split or,
    without one, a seeded tenth of its train queries (see `qembed.train.evalsplit`).
    """

    model: str
    data: list[str]
    output: str
    epochs: int = 1
    batch_size: int = 32
    lr: float | None = None
    lora: bool | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None
    merge_lora: bool = True
    temperature: float | None = None
    qq_dd: bool = True
    fn_margin: float | None = 0.1
    mrl_dims: list[int] | None = None
    num_negatives: int = MiningConfig.num_negatives  # what `qembed mine` writes per record
    grad_cache_chunk: int | None = None
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    scheduler: str = "linear"
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    max_length: int = 512
    save_steps: int = 500
    save_minutes: float | None = 10.0
    save_total_limit: int | None = 2
    resume: bool = False
    eval_dataset: str | None = None
    eval_steps: int = 0
    eval_split: str = "dev"
    eval_metric: str = "ndcg@10"
    load_best: bool = False
    same_source_batches: bool = False
    seed: int = 0
    device: str | None = None
    precision: str = "auto"
    max_steps: int | None = None
    progress: bool = True


def flag(name: str) -> str:
    """The CLI flag of a `TrainConfig` field."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def validate(cfg: TrainConfig, recipe: str) -> None:
    """Every option's value on its own and against the others (`recipe`: "embedder" or "reranker");
    raises `QembedError` naming the flag."""
    positive = ["epochs", "batch_size", "lora_r", "lora_alpha", "grad_accum", "max_length"]
    for name in positive + ["grad_cache_chunk", "max_steps", "save_total_limit"]:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise QembedError(f"{flag(name)} must be at least 1, got {value}")
    for name in ["num_negatives", "save_steps", "save_minutes", "eval_steps", "weight_decay"]:
        if (getattr(cfg, name) or 0) < 0:
            raise QembedError(f"{flag(name)} must not be negative, got {getattr(cfg, name)}")
    for name in ["lr", "temperature", "max_grad_norm"]:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise QembedError(f"{flag(name)} must be positive, got {value}")
    if not 0 <= cfg.lora_dropout < 1 or not 0 <= cfg.warmup_ratio < 1:
        raise QembedError("--lora-dropout and --warmup-ratio must lie in [0, 1)")
    if cfg.fn_margin is not None and cfg.fn_margin < 0:
        raise QembedError(f"--fn-margin must not be negative, got {cfg.fn_margin} (turn the mask off with 'off')")
    if cfg.scheduler not in ("linear", "cosine"):
        raise QembedError(f"unknown --scheduler {cfg.scheduler!r}: choose linear or cosine")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise QembedError(f"unknown --precision {cfg.precision!r}: choose auto, fp32, bf16 or fp16")
    if not cfg.data:
        raise QembedError("no training data given (--data)")
    for path in cfg.data:
        if not Path(path).exists():
            raise QembedError(f"training data file not found: {path}")
    if cfg.lora is False and cfg.lora_targets:
        raise QembedError("--lora-targets needs LoRA: drop --full")
    if recipe == "reranker" and (cfg.mrl_dims or cfg.temperature is not None):
        raise QembedError("mrl_dims and temperature apply to embedder training only")
    if cfg.mrl_dims and min(cfg.mrl_dims) < MIN_MRL_DIM:
        raise QembedError(f"--mrl-dims must be at least {MIN_MRL_DIM}, got {min(cfg.mrl_dims)}")
    _validate_eval(cfg, recipe)


def _validate_eval(cfg: TrainConfig, recipe: str) -> None:
    known = [f"{m}@{k}" for m in EVAL_METRICS for k in EVAL_KS[recipe]]
    if cfg.eval_metric not in known:
        raise QembedError(f"unknown --eval-metric {cfg.eval_metric!r}: choose one of {', '.join(known)}")
    if cfg.eval_dataset is None:
        for name in ("eval_steps", "load_best"):
            if getattr(cfg, name):
                raise QembedError(f"{flag(name)} needs --eval-dataset")
    elif not Path(cfg.eval_dataset).is_dir():
        raise QembedError(f"--eval-dataset folder not found: {cfg.eval_dataset}")


def check_model(cfg: TrainConfig, recipe: str) -> None:
    """Checks that need the model's config and module names (built on the meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from qembed.models.loading import load_pretrained, resolve_model_dir

    config = load_pretrained(AutoConfig, resolve_model_dir(cfg.model))
    hidden = getattr(config, "hidden_size", None)
    if cfg.mrl_dims and hidden and max(cfg.mrl_dims) > hidden:
        raise QembedError(f"--mrl-dims {max(cfg.mrl_dims)} exceeds the model's hidden size {hidden}")
    if not cfg.lora_targets:
        return
    auto = AutoModel
    if recipe == "reranker":
        archs = getattr(config, "architectures", None) or []
        classify = any(a.endswith("ForSequenceClassification") for a in archs)
        auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    with torch.device("meta"):
        names = [name for name, _ in auto.from_config(config).named_modules()]
    unknown = [t for t in cfg.lora_targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and not re.fullmatch(r"\d+", n.rsplit(".")[-1])})
        raise QembedError(f"--lora-targets {','.join(unknown)}: no such module in the model (has: {', '.join(leaves)})")


def data_fingerprint(paths: list[str]) -> list[str]:
    """SHA-256 of each training data file (of a `datasets` folder: of its files' names and contents)."""
    digests = []
    for path in paths:
        digest = hashlib.sha256()
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for file in files:
            if Path(path).is_dir():
                digest.update(str(file.relative_to(path)).encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        digests.append(digest.hexdigest())
    return digests


def saved_record(cfg: TrainConfig) -> dict:
    """What `OUTPUT/train_config.json` holds: the options (auto ones resolved) and the data's fingerprint."""
    return {**asdict(cfg), "data_sha256": data_fingerprint(cfg.data)}


def check_output(cfg: TrainConfig, has_checkpoints: bool) -> None:
    """Refuse to overwrite checkpoints without `resume`, and to resume with options or data that differ from
    those in `OUTPUT/train_config.json`."""
    output = Path(cfg.output)
    if not has_checkpoints:
        return
    if not cfg.resume:
        raise QembedError(
            f"{output / 'checkpoints'} already has checkpoints: pass --resume to continue, or use a new --output"
        )
    path = output / CONFIG_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    for field in fields(TrainConfig):
        name, now = field.name, getattr(cfg, field.name)
        if name in RESUMABLE_CHANGES or (name in AUTO and now is None) or name not in saved:
            continue
        if saved[name] != now:
            raise QembedError(
                f"cannot resume: {flag(name)} is {_show(now)} but the checkpoints were trained with "
                f"{_show(saved[name])}; use the same options or a new --output"
            )
    changed = [p for p, old, new in zip(cfg.data, saved.get("data_sha256", []), data_fingerprint(cfg.data))
               if old != new]  # fmt: skip
    if changed:
        raise QembedError(f"cannot resume: {changed[0]} changed since the checkpoints were written; use a new --output")


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, str) else str(value)
