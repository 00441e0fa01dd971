"""Merging checkpoints of one architecture: parameter-wise spherical interpolation (slerp) of two models, or a
weighted linear average of several. LoRA adapter folders are merged into their base model first.

The result is written with the first model's files (config, tokenizer, sentence-transformers modules) and
its weight-file layout, so it loads with `Embedder` / `Reranker` like the inputs.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qembed.errors import QembedError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SKIP_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "adapter_config.json",
              "train_log.jsonl", "train_config.json", "checkpoints"}  # fmt: skip
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


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise QembedError(f"{model_dir}: no model weights (model.safetensors or pytorch_model.bin) found")


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise QembedError(f"{model_dir}: no config.json (not a model folder)")
    return json.loads(path.read_text())


def materialize_adapter(adapter_dir: Path, work: Path) -> tuple[Path, Path]:
    """Merge a LoRA adapter into its base model; returns (merged model folder, base folder)."""
    import transformers
    from peft import PeftModel

    from qembed.models.loading import resolve_model_dir

    base_name = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise QembedError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path")
    base_dir = resolve_model_dir(base_name)
    archs = _config(base_dir).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise QembedError(f"{base_dir}: unknown architecture {archs}")
    model = cls.from_pretrained(base_dir, dtype="auto")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out = work / adapter_dir.name
    merged.save_pretrained(out)
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
    first model (they must agree). Raises `QembedError` on mismatched architectures, names or shapes.
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
        dirs, files_from = [], None
        for model in models:
            path = Path(model)
            if not path.is_dir():
                raise QembedError(f"model folder not found: {path}")
            if (path / "adapter_config.json").is_file():
                merged, base = materialize_adapter(path, Path(tmp))
                dirs.append(merged)
                files_from = files_from or base
            else:
                dirs.append(path)
                files_from = files_from or path
        _check_configs(dirs)
        states = [{} for _ in dirs]
        layout: dict[str, list[str]] = {}
        for i, d in enumerate(dirs):
            for f in _weight_files(d):
                part = _load(f)
                states[i].update(part)
                if i == 0:
                    layout[f.with_suffix(".safetensors").name] = list(part)
        _check_states(states, [str(m) for m in models])
        merged_state = {}
        for key, first in states[0].items():
            tensors = [s[key] for s in states]
            if not first.is_floating_point():
                merged_state[key] = first
            elif method == "slerp":
                merged_state[key] = slerp(tensors[0], tensors[1], t).contiguous()
            else:
                merged_state[key] = linear(tensors, weights).contiguous()
        _write(output, files_from, dirs[0], merged_state, layout)
    return output


def _check_configs(dirs: list[Path]) -> None:
    first = _config(dirs[0])
    keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size")
    for d in dirs[1:]:
        other = _config(d)
        for key in keys:
            if first.get(key) != other.get(key):
                raise QembedError(
                    f"cannot merge {dirs[0]} and {d}: different {key} ({first.get(key)!r} vs {other.get(key)!r})"
                )


def _check_states(states: list[dict], names: list[str]) -> None:
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != first.keys():
            extra = sorted(set(state) ^ set(first))[:3]
            raise QembedError(f"cannot merge {names[0]} and {name}: parameter names differ (e.g. {extra})")
        for key, value in first.items():
            if state[key].shape != value.shape:
                raise QembedError(
                    f"cannot merge {names[0]} and {name}: {key} has shape {tuple(value.shape)} vs {tuple(state[key].shape)}"
                )


def _write(
    output: Path, files_from: Path, weights_from: Path, state: dict, layout: dict[str, list[str]]
) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for item in files_from.iterdir():
        if item.name in SKIP_NAMES or item.name.startswith("adapter_") or item.suffix in WEIGHT_SUFFIXES:
            continue
        target = output / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    if files_from != weights_from:  # an adapter's base: take config.json from the merged model
        shutil.copy2(weights_from / "config.json", output / "config.json")
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
