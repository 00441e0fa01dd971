"""Merging checkpoints of one architecture: parameter-wise spherical interpolation (slerp) of two models, or a
weighted linear average of several. LoRA adapter folders are merged into their base model first.

The result is written with the first model's files (config, tokenizer, sentence-transformers modules) and
its weight-file layout, so it loads with `Embedder` / `Reranker` like the inputs.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qembed.errors import QembedError
from qembed.models.card import merge_card
from qembed.models.layout import (
    RECORD_FILE,
    ModelRecord,
    dtype_name,
    keep_base_layout,
    read_record,
    read_weights,
    sentence_transformers_pooling,
    weight_files,
    write_record,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SKIP_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "adapter_config.json",
              "train_log.jsonl", "train_config.json", "checkpoints", RECORD_FILE}  # fmt: skip
PARALLEL_DOT = 0.9995  # slerp falls back to linear interpolation above this cosine


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two tensors viewed as flat vectors (angle from their directions,
    applied to the tensors themselves); linear when they are nearly parallel or one is zero."""
    a32, b32 = a.double(), b.double()
    na, nb = a32.norm(), b32.norm()
    if na == 0 or nb == 0:
        return ((1 - t) * a32 + t * b32).to(a.dtype)
    dot = float(((a32 / na) * (b32 / nb)).sum().clamp(-1.0, 1.0))
    if abs(dot) > PARALLEL_DOT:
        return ((1 - t) * a32 + t * b32).to(a.dtype)
    omega = math.acos(dot)
    so = math.sin(omega)
    return (math.sin((1 - t) * omega) / so * a32 + math.sin(t * omega) / so * b32).to(a.dtype)


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = sum(weights)
    merged = sum(w * x.double() for w, x in zip(weights, tensors)) / total
    return merged.to(tensors[0].dtype)


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise QembedError(f"{model_dir}: no config.json (not a model folder)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise QembedError(f"{path}: not valid JSON ({exc})") from None


def _adapter_backbone(adapter_dir: Path, base_dir: Path):
    """The transformers class the adapter was trained on: the one its `qembed.json` records, else the one
    whose module names hold every adapted module (checked on an empty model, never read from `architectures`)."""
    import transformers
    from transformers import AutoConfig

    from qembed.models.loading import model_class

    record = read_record(adapter_dir)
    if record is not None:
        return model_class(record.backbone)
    modules = {re.sub(r"\.lora_\w+\.(default\.)?weight$", "", k).removeprefix("base_model.model.")
               for k in weight_names_adapter(adapter_dir)}  # fmt: skip
    config = AutoConfig.from_pretrained(base_dir)
    for auto in (transformers.AutoModel, transformers.AutoModelForCausalLM,
                 transformers.AutoModelForSequenceClassification):  # fmt: skip
        try:
            with torch.device("meta"):
                skeleton = auto.from_config(config)
        except ValueError:
            continue
        if modules <= {name for name, _ in skeleton.named_modules()}:
            return type(skeleton)
    raise QembedError(f"{adapter_dir}: its adapted modules (e.g. {sorted(modules)[:1]}) belong to no model class "
                      f"of {base_dir}; was it trained on another base model?")  # fmt: skip


def weight_names_adapter(adapter_dir: Path) -> list[str]:
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise QembedError(f"{adapter_dir}: no adapter_model.safetensors")
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def materialize_adapter(adapter_dir: Path, work: Path) -> tuple[Path, Path]:
    """Merge a LoRA adapter into its base model, loaded as the class the adapter was trained on; every adapter
    weight must load. Returns (merged model folder with the base's tensor names, base folder)."""
    from peft import PeftConfig, PeftModel

    from qembed.models.loading import load_weights, resolve_model_dir

    base_name = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise QembedError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path")
    base_dir = resolve_model_dir(base_name)
    cls = _adapter_backbone(adapter_dir, base_dir)
    model = load_weights(cls, base_dir, expected=f"the base model of {adapter_dir}", dtype="auto")
    peft_model = PeftModel(model, PeftConfig.from_pretrained(str(adapter_dir)))
    result = peft_model.load_adapter(str(adapter_dir), adapter_name="default")
    unloaded = sorted(result.missing_keys) + sorted(k for k in result.unexpected_keys if "lora_" in k)
    if unloaded:
        raise QembedError(f"{adapter_dir}: {len(unloaded)} adapter weight(s) not loaded into {cls.__name__} of "
                          f"{base_dir} (e.g. {unloaded[0]}); the adapter does not fit this base model")  # fmt: skip
    merged = peft_model.merge_and_unload()
    out = work / adapter_dir.name
    merged.save_pretrained(out)
    keep_base_layout(out, base_dir, merged)
    return out, base_dir


def merge_models(
    models: Sequence[str | Path],
    output: str | Path,
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    t: float = 0.5,
) -> Path:
    """Merge `models` (folders; LoRA adapter folders are merged into their base first) into `output`.

    `method="slerp"`: exactly two models, `t` in [0, 1] (0 gives the first, 1 the second), per tensor.
    `method="linear"`: weighted average, `weights` default to equal. Non-float tensors are copied from the
    first model. Models must share their parameters' names and shapes (derived tensors such as non-persistent
    buffers and tied copies may differ); `config.json`'s `architectures` is not compared. The output records
    what it is in `qembed.json`. Raises `QembedError` on mismatched names or shapes.
    """
    if method not in ("slerp", "linear"):
        raise QembedError(f"unknown merge method {method!r}: choose slerp or linear")
    if len(models) < 2 and method == "slerp":
        raise QembedError("slerp needs two models")
    if method == "slerp" and len(models) != 2:
        raise QembedError(
            f"slerp merges exactly two models, got {len(models)} (use --method linear for more)"
        )
    if not models:
        raise QembedError("no models to merge")
    if method == "slerp" and not 0.0 <= t <= 1.0:
        raise QembedError(f"--t must be between 0 and 1, got {t}")
    if method == "linear":
        weights = list(weights) if weights else [1.0] * len(models)
        if len(weights) != len(models):
            raise QembedError(f"{len(weights)} weights for {len(models)} models")
        if sum(weights) <= 0 or any(w < 0 for w in weights):
            raise QembedError(f"weights must be non-negative with a positive sum, got {weights}")

    output = Path(output)
    with tempfile.TemporaryDirectory() as tmp:
        dirs, files_from, record = [], None, None
        for model in models:
            path = Path(model)
            if not path.is_dir():
                raise QembedError(f"model folder not found: {path}")
            if (path / "adapter_config.json").is_file():
                merged, base = materialize_adapter(path, Path(tmp))
                dirs.append(merged)
                files_from = files_from or base
            else:
                _config(path)
                dirs.append(path)
                files_from = files_from or path
            record = record or read_record(path)
        states, layout = _read_states(dirs)
        derived = _derived_tensors(states, [str(m) for m in models])
        merged_state = {}
        for key, first in states[0].items():
            if key in derived:
                continue
            tensors = [s[key] for s in states]
            if not first.is_floating_point():
                merged_state[key] = first
            elif method == "slerp":
                merged_state[key] = slerp(tensors[0], tensors[1], t).contiguous()
            else:
                merged_state[key] = linear(tensors, weights).contiguous()
        for key, source in derived.items():  # the first model's layout: its buffers, its tied copies
            if key in states[0]:
                merged_state[key] = states[0][key] if source is None else merged_state[source].clone()
        _write(output, files_from, merged_state, layout)
        write_record(output, _merged_record(record, files_from, merged_state))
    merge_card(output, [str(m) for m in models], method=method, weights=weights, t=t)
    return output


def _read_states(dirs: list[Path]) -> tuple[list[dict[str, torch.Tensor]], dict[str, list[str]]]:
    """All tensors of each folder, and the first folder's file layout (file name -> tensor names)."""
    states: list[dict[str, torch.Tensor]] = [{} for _ in dirs]
    layout: dict[str, list[str]] = {}
    for i, d in enumerate(dirs):
        for f in weight_files(d):
            part = read_weights(f)
            states[i].update(part)
            if i == 0:
                layout[f.with_suffix(".safetensors").name] = list(part)
    return states, layout


def _derived_tensors(states: list[dict], names: list[str]) -> dict[str, str | None]:
    """Check that the models share their parameters' names and shapes. Tensors only some models store must be
    derived ones, not parameters: integer buffers (BERT's `position_ids`) or tied copies of a shared parameter
    (an `lm_head` equal to the embeddings). Returns them, each mapped to the parameter it copies (None: buffer)."""
    common = set.intersection(*(set(s) for s in states))
    derived: dict[str, str | None] = {}
    for i, state in enumerate(states):
        for key in sorted(set(state) - common):
            tensor = state[key]
            if not tensor.is_floating_point():
                derived[key] = None
                continue
            source = next((k for k in sorted(common) if state[k].shape == tensor.shape
                           and torch.equal(state[k], tensor)), None)  # fmt: skip
            if source is None:
                only = sorted(set(state) - common)[:2]
                raise QembedError(f"cannot merge {names[0]} and {names[max(i, 1)]}: parameter names differ "
                                  f"(e.g. {only} only in {names[i]})")  # fmt: skip
            derived[key] = source
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        for key in sorted(common):
            if state[key].shape != first[key].shape:
                raise QembedError(f"cannot merge {names[0]} and {name}: {key} has shape {tuple(first[key].shape)} "
                                  f"vs {tuple(state[key].shape)}")  # fmt: skip
    return derived


def _merged_record(record: ModelRecord | None, files_from: Path, state: dict) -> ModelRecord:
    """The inputs' `qembed.json` (with the merged dtype), or a description of a published first model."""
    dtype = next((dtype_name(v.dtype) for v in state.values() if v.is_floating_point()), None)
    if record is not None:
        return replace(record, dtype=dtype, base_model=str(files_from))
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    config = _config(files_from)
    archs = config.get("architectures") or []
    pooling = sentence_transformers_pooling(files_from)
    if pooling is None and any(a.endswith(("ForCausalLM", "ForSequenceClassification")) for a in archs):
        kind = "cross-encoder" if archs[0].endswith("ForSequenceClassification") else "qwen3"
        return ModelRecord(kind="reranker", backbone=archs[0], reranker=kind, dtype=dtype, base_model=str(files_from))
    backbone = MODEL_MAPPING_NAMES.get(config.get("model_type", ""), archs[0] if archs else "AutoModel")
    return ModelRecord(kind="embedder", backbone=backbone, pooling=pooling, dtype=dtype, base_model=str(files_from))


def _write(output: Path, files_from: Path, state: dict, layout: dict[str, list[str]]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for item in files_from.iterdir():
        if item.name in SKIP_NAMES or item.name.startswith("adapter_") or item.suffix in WEIGHT_SUFFIXES:
            continue
        target = output / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    if len(layout) == 1:
        save_file(state, str(output / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for name, keys in layout.items():
        save_file({k: state[k] for k in keys}, str(output / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
