"""What a model folder is and how its weights are laid out.

Every qembed export (train, merge) writes `qembed.json` — a `ModelRecord` naming the transformers class its
weights belong to, its role, pooling and dtype — so loading, merging and adapter loading never guess from
`config.json`'s `architectures` (the published Qwen3-Embedding names `Qwen3ForCausalLM` over `Qwen3Model`
weights). Folders without one (published checkpoints) are described from their sentence-transformers files.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from qembed.errors import QembedError

RECORD_FILE = "qembed.json"
_MATRYOSHKA_CARD = re.compile(r"matryoshka|\bMRL\b", re.IGNORECASE)


@dataclass
class ModelRecord:
    """The contents of `qembed.json`."""

    kind: str  # "embedder" | "reranker"
    backbone: str  # transformers class the weights belong to, e.g. "Qwen3Model", "Qwen3ForCausalLM"
    dtype: str | None = None  # "float32" | "bfloat16" | "float16"
    pooling: str | None = None  # embedders: "lasttoken" | "mean" | "cls"
    reranker: str | None = None  # rerankers: "qwen3" (yes/no causal LM) | "cross-encoder"
    matryoshka: bool = False  # embedders: trained (or published) for Matryoshka truncation
    base_model: str | None = None  # the folder or hub id it was trained from


def read_record(model_dir: Path) -> ModelRecord | None:
    """The folder's `qembed.json`, or None when it has none."""
    path = Path(model_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ModelRecord(**{f.name: data[f.name] for f in fields(ModelRecord) if f.name in data})
    except (OSError, ValueError, TypeError) as exc:
        raise QembedError(f"cannot read {path}: {exc}") from None


def write_record(model_dir: Path, record: ModelRecord) -> None:
    (Path(model_dir) / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sentence_transformers_pooling(model_dir: Path) -> str | None:
    """The pooling mode when the folder is a sentence-transformers embedding model (a Pooling module), else None."""
    from qembed.models.loading import _pooling_mode, _read_json

    modules_file = Path(model_dir) / "modules.json"
    if not modules_file.is_file():
        return None
    for module in _read_json(modules_file):
        if module.get("type", "").rsplit(".", 1)[-1] == "Pooling":
            return _pooling_mode(_read_json(Path(model_dir) / module["path"] / "config.json"), model_dir)
    return None


def declares_matryoshka(model_dir: Path) -> bool:
    """True when the folder's files declare Matryoshka support: its `qembed.json` (trained with `--mrl-dims`)
    or its model card (the Qwen3-Embedding card's "MRL Support", a sentence-transformers `MatryoshkaLoss`)."""
    record = read_record(model_dir)
    if record is not None and record.matryoshka:
        return True
    card = Path(model_dir) / "README.md"
    try:
        return bool(_MATRYOSHKA_CARD.search(card.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return False


# ------------------------------------------------------------------ weight files


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model folder (sharded safetensors, one safetensors file, or a `.bin`)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise QembedError(f"{model_dir}: no model weights (model.safetensors or pytorch_model.bin) found")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def weight_names(model_dir: Path) -> set[str]:
    """Tensor names stored in a model folder (read from the safetensors headers; `.bin` files are loaded)."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in weight_files(model_dir):
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                names.update(f.keys())
        else:
            names.update(read_weights(path))
    return names


def keep_base_layout(out_dir: Path, base_dir: Path, model: torch.nn.Module) -> None:
    """Make a folder just saved from `model` keep the names its base folder had: the base's `architectures`
    in `config.json`, and the tensors the base stored that transformers no longer saves (non-persistent
    buffers such as BERT's `embeddings.position_ids`, tied copies), taken from `model` itself."""
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    try:
        base_config = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError):
        return
    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    if base_config.get("architectures") and config.get("architectures") != base_config["architectures"]:
        config["architectures"] = base_config["architectures"]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    try:
        saved = weight_names(out_dir)
        missing = weight_names(base_dir) - saved
    except QembedError:
        return
    own = {**model.state_dict(), **dict(model.named_buffers())}
    prefix = getattr(model, "base_model_prefix", "") or ""
    extra = {}
    for name in sorted(missing):
        for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if candidate in own:
                if candidate not in saved:  # else saved under the model's own name (e.g. an LM's body)
                    extra[name] = own[candidate].detach().to("cpu").clone().contiguous()
                break
    if extra:
        _add_tensors(out_dir, extra)


def _add_tensors(out_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add tensors to a saved safetensors folder (the first shard when sharded)."""
    from safetensors.torch import save_file

    files = weight_files(out_dir)
    target = files[0]
    if target.suffix != ".safetensors":
        return
    state = read_weights(target)
    state.update(tensors)
    save_file(state, str(target), metadata={"format": "pt"})
    index_file = out_dir / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        index["weight_map"].update(dict.fromkeys(tensors, target.name))
        index_file.write_text(json.dumps(index, indent=2) + "\n")
