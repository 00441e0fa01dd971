"""Resolving model names to local folders, choosing device and dtype, reading sentence-transformers files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qembed.errors import ModelNotFoundError, QembedError

log = logging.getLogger(__name__)

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip
# Weight formats we never need (other runtimes); `.bin` is skipped when safetensors exist.
_IGNORE_ON_HUB = ["*.onnx", "*.onnx_data", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "*.gguf", "*.pt"]
# transformers' `model_max_length` when a tokenizer declares none (int(1e30))
_UNSET_MODEL_MAX_LENGTH = 10**18
#: The similarity functions of sentence-transformers that qembed ranks by (`similarity_fn_name`).
SIMILARITY_FUNCTIONS = ("cosine", "dot")
_DECODER_TYPES = ("qwen", "llama", "mistral", "gemma", "phi", "gpt", "opt", "falcon", "mixtral", "deepseek")


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder for `name_or_path`: the folder itself, or a hub snapshot (downloaded or cached).

    Raises `ModelNotFoundError` with a one-line explanation when neither works.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json: not a transformers model folder")
        return path
    name = str(name_or_path)
    if path.exists() or name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model folder not found: {name}")
    from huggingface_hub import list_repo_files, snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or not _hub_reachable()
    try:
        if offline:
            return Path(snapshot_download(name, local_files_only=True))
        ignore = list(_IGNORE_ON_HUB)
        if any(f.endswith(".safetensors") for f in list_repo_files(name)):
            ignore.append("*.bin")
        return Path(snapshot_download(name, ignore_patterns=ignore))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes the same user-facing message
        log.debug("hub lookup for %s failed", name, exc_info=True)
        reason = "offline and not in the local cache" if offline else f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder and could not be fetched from the Hugging Face Hub ({reason}); "
            f"download it where there is network and pass its local path, e.g. --model /path/to/{name.split('/')[-1]}"
        ) from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so an offline machine fails in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def pick_device(device: str | torch.device | None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if isinstance(device, str) and "," in device:
        raise QembedError(f"device {device!r}: a list of devices is for corpus encoding on Ray (embed, index build, "
                          "eval); give one device")  # fmt: skip
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The requested dtype, else bf16 (or fp16) on GPU and fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        try:
            return _DTYPES[str(dtype).lower()]
        except KeyError:
            raise QembedError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class SentenceTransformersInfo:
    """What the sentence-transformers files of a model folder say (or what we infer without them)."""

    pooling: str  # "lasttoken" | "mean" | "cls"
    normalize: bool  # a `Normalize` module: vectors are L2-normalised
    similarity_fn_name: str = "cosine"  # how the model's vectors are compared: "cosine" | "dot"
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise QembedError(f"cannot read {path}: {exc}") from None


def is_decoder_config(config) -> bool:
    """True for decoder-only LLM families (last-token pooling, left padding)."""
    model_type = getattr(config, "model_type", "") or ""
    archs = getattr(config, "architectures", None) or []
    return model_type.startswith(_DECODER_TYPES) or any(a.endswith("ForCausalLM") for a in archs)


def read_sentence_transformers_info(model_dir: Path, config) -> SentenceTransformersInfo:
    """Pooling, normalisation, max length and prompts from `modules.json` and friends; inferred when absent
    (decoder LLMs: last-token pooling, normalised; encoders: mean pooling, normalised)."""
    modules_file = model_dir / "modules.json"
    info = SentenceTransformersInfo(pooling="lasttoken" if is_decoder_config(config) else "mean", normalize=True)
    if modules_file.is_file():
        modules = _read_json(modules_file)
        types = [m.get("type", "") for m in modules]
        info.normalize = any(t.endswith("Normalize") for t in types)
        for module in modules:
            kind = module.get("type", "").rsplit(".", 1)[-1]
            if kind == "Pooling":
                pooling_config = _read_json(model_dir / module["path"] / "config.json")
                info.pooling = _pooling_mode(pooling_config, model_dir)
            elif kind not in ("Transformer", "Normalize"):
                raise QembedError(f"{model_dir}: sentence-transformers module {kind!r} is not supported")
    bert_config = model_dir / "sentence_bert_config.json"
    if bert_config.is_file():
        data = _read_json(bert_config)
        info.max_seq_length = data.get("max_seq_length")
        info.do_lower_case = bool(data.get("do_lower_case", False))
    st_config = model_dir / "config_sentence_transformers.json"
    if st_config.is_file():
        data = _read_json(st_config)
        info.prompts = {k: v for k, v in (data.get("prompts") or {}).items() if isinstance(v, str)}
        info.similarity_fn_name = data.get("similarity_fn_name") or "cosine"  # sentence-transformers' default
        if info.similarity_fn_name not in SIMILARITY_FUNCTIONS:
            raise QembedError(f"{st_config}: similarity_fn_name {info.similarity_fn_name!r} is not supported; "
                              f"qembed ranks by {' or '.join(SIMILARITY_FUNCTIONS)}")  # fmt: skip
    return info


def _pooling_mode(pooling_config: dict, model_dir: Path) -> str:
    modes = {
        "pooling_mode_lasttoken": "lasttoken",
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_cls_token": "cls",
    }
    chosen = [mode for key, mode in modes.items() if pooling_config.get(key)]
    if "pooling_mode" in pooling_config:  # newer sentence-transformers write a single string
        chosen = [{"lasttoken": "lasttoken", "mean": "mean", "cls": "cls"}.get(pooling_config["pooling_mode"], "?")]
    if len(chosen) != 1 or chosen[0] == "?":
        raise QembedError(f"{model_dir}: unsupported pooling configuration {pooling_config}")
    return chosen[0]


def write_sentence_transformers_files(model_dir: Path, info: SentenceTransformersInfo, hidden_size: int) -> None:
    """Write `modules.json`, `1_Pooling/config.json` and friends so the folder loads in sentence-transformers too."""
    model_dir = Path(model_dir)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if info.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (model_dir / "2_Normalize").mkdir(parents=True, exist_ok=True)
    (model_dir / "modules.json").write_text(json.dumps(modules, indent=2))
    (model_dir / "1_Pooling").mkdir(parents=True, exist_ok=True)
    pooling = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": info.pooling == "cls",
        "pooling_mode_mean_tokens": info.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": info.pooling == "lasttoken",
        "include_prompt": True,
    }
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    bert = {"max_seq_length": info.max_seq_length, "do_lower_case": info.do_lower_case}
    (model_dir / "sentence_bert_config.json").write_text(json.dumps(bert, indent=2))
    st = {"prompts": info.prompts, "default_prompt_name": None, "similarity_fn_name": info.similarity_fn_name}
    (model_dir / "config_sentence_transformers.json").write_text(json.dumps(st, indent=2, ensure_ascii=False))


def position_offset(model: torch.nn.Module) -> int:
    """How many rows of the model's position table come before the first token's: `padding_idx + 1` for the
    RoBERTa family (XLM-R, MPNet, CamemBERT: positions start after the padding index), else 0."""
    for module in model.modules():
        padding_idx = getattr(module, "padding_idx", None)
        if isinstance(padding_idx, int) and isinstance(getattr(module, "position_embeddings", None), torch.nn.Embedding):
            return padding_idx + 1
    return 0


def input_limit(model: torch.nn.Module, tokenizer, declared: int | None = None) -> int | None:
    """The most tokens one input may have: `declared` (sentence-transformers' `max_seq_length`), else the
    tokenizer's `model_max_length`, capped by the position table less the architecture's position offset
    (514 positions of an XLM-R model hold 512 tokens). None when nothing bounds it."""
    if not declared:
        declared = getattr(tokenizer, "model_max_length", None)
        declared = declared if isinstance(declared, int) and 0 < declared < _UNSET_MODEL_MAX_LENGTH else None
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        positions -= position_offset(model)
        return min(declared, positions) if declared else positions
    return declared


def weights_fingerprint(model_dir: Path, *extra: object) -> str:
    """A short stable id of a model folder's weights and configuration (for on-disk caches)."""
    digest = hashlib.sha1()
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and (path.suffix in (".safetensors", ".bin", ".json")):
            stat = path.stat()
            digest.update(f"{path.relative_to(model_dir)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            if path.suffix == ".json" and stat.st_size < 1_000_000:
                digest.update(path.read_bytes())
    for item in extra:
        digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def load_pretrained(auto_class, model_dir: Path, **kwargs):
    """`auto_class.from_pretrained(model_dir)`, with a broken folder reported as one line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise for a toolkit user
    try:
        return auto_class.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:  # TypeError: transformers 4.x on
        # a folder without tokenizer files (its slow tokenizer is built from `vocab_file=None`)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QembedError(f"cannot load {auto_class.__name__} from {model_dir}: {first_line}") from None


def model_class(name: str):
    """The transformers class called `name` (as recorded in `qembed.json`)."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise QembedError(f"unknown transformers model class {name!r} (upgrade transformers?)")
    return cls


def load_weights(model_class_or_auto, model_dir: Path, *, expected: str, **kwargs):
    """Load a model and refuse to initialise anything at random: weights the folder lacks (a missing head, a
    missing layer) are a one-line `QembedError` naming what was found and `expected`. Tensors the class does
    not use (a head an embedder ignores) are fine."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' own load report: its findings become our error below
    try:
        model, info = load_pretrained(model_class_or_auto, model_dir, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise QembedError(
            f"{model_dir} loaded as {type(model).__name__} leaves {shown} randomly initialised "
            f"(not in its weights); expected {expected}"
        )
    if info.get("unexpected_keys"):
        log.debug("%s: unused tensors %s", model_dir, sorted(info["unexpected_keys"])[:5])
    return model
