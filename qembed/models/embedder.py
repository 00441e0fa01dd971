"""`Embedder`: text -> vectors with the exact semantics of the model family.

Qwen3-Embedding-style (decoder) models: instruction template on queries, `<|endoftext|>` ending every
sequence exactly once (kept by truncation), left padding, last-token pooling, L2 normalisation, Matryoshka
truncation. Sentence-transformers encoders (MiniLM, bge-m3, e5): their own pooling, prompts and max length.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from qembed.errors import QembedError
from qembed.models import prompts
from qembed.models.batching import (
    BatchDefaults,
    default_batching,
    pad_batch,
    steady_rows,
    token_budget_batches,
)
from qembed.models.layout import (
    ModelRecord,
    declares_matryoshka,
    dtype_name,
    keep_base_layout,
    read_record,
    write_record,
)
from qembed.models.loading import (
    SentenceTransformersInfo,
    input_limit,
    load_pretrained,
    load_weights,
    model_class,
    pick_device,
    pick_dtype,
    read_sentence_transformers_info,
    resolve_model_dir,
    weights_fingerprint,
    write_sentence_transformers_files,
)
from qembed.models.matryoshka import MIN_MRL_DIM, truncate_and_normalize
from qembed.models.prompts import MODEL_DEFAULT, QueryFormat
from qembed.models.quantize import check_quantize
from qembed.progress import progress_bar

log = logging.getLogger(__name__)

_AUTO_PROGRESS_FROM = 256  # texts


def check_texts(texts: Sequence[str]) -> list[str]:
    """Validate a list of texts: a `TypeError` names the first non-string item."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string: wrap it in a list")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__}, expected str")
    return texts


class Embedder:
    """Turns texts into float32 vectors; load with `Embedder.from_pretrained(name_or_path)`."""

    quantize: str | None = None  # "int8" when inference runs an int8 model (part of `fingerprint`)
    inference_model = None  # that model (`OpenVINOEncoder` or `OnnxRuntimeEncoder`); None: `model` itself

    def __init__(self, model, tokenizer, info: SentenceTransformersInfo, *, model_dir: Path, name_or_path: str,
                 max_length: int, device: torch.device) -> None:  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.model_dir = model_dir
        self.name_or_path = name_or_path
        self.device = device
        self.pooling = info.pooling
        self.normalize: bool = info.normalize  # the model declares L2 normalisation (a `Normalize` module)
        self.similarity_fn_name: str = info.similarity_fn_name  # "cosine" | "dot": how its vectors are compared
        self.hidden_size = int(model.config.hidden_size)
        limit = input_limit(model, tokenizer, info.max_seq_length)
        self.max_length = min(max_length, limit) if limit else max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eot_id: int | None = None
        self._tokenizer_appends_eot = False
        self.query_prompt = ""  # raw prefix for sentence-transformers prompts that are not the Qwen3 template
        self.default_instruction: str | None = None
        if self.pooling == "lasttoken":
            eot = tokenizer.convert_tokens_to_ids(prompts.END_OF_TEXT)
            self.eot_id = eot if isinstance(eot, int) and eot != tokenizer.unk_token_id else tokenizer.eos_token_id
            probe = tokenizer("a", add_special_tokens=True)["input_ids"]
            self._tokenizer_appends_eot = bool(probe) and probe[-1] == self.eot_id
        query_prompt = info.prompts.get("query", "")
        if query_prompt:
            instruction = prompts.instruction_from_prompt(query_prompt)
            if instruction is not None:
                self.default_instruction = instruction
            else:
                self.query_prompt = query_prompt
        elif "query" not in info.prompts and self.pooling == "lasttoken" and \
                getattr(model.config, "model_type", "").startswith("qwen"):  # an empty query prompt: no instruction
            self.default_instruction = prompts.DEFAULT_QUERY_INSTRUCTION
        self.fingerprint = weights_fingerprint(model_dir, self.pooling, self.max_length, info.normalize, "fmt-1")
        self.matryoshka = declares_matryoshka(model_dir)  # else `dim` warns once
        self._warned_dim = False

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, max_length: int = 8192,
                        trust_remote_code: bool = False, quantize: str | None = None) -> Embedder:  # fmt: skip
        """Load from a local folder or a hub id (sentence-transformers or plain transformers layout): the base
        model (no head; the class a qembed export records), refusing weights that would be randomly initialised.
        `quantize="int8"` runs inference in int8 with OpenVINO on the CPU (`qembed.models.openvino`; needs the
        `cpu-fast` extra)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        model_dir = resolve_model_dir(name_or_path)
        device = pick_device(check_quantize(quantize, device, dtype))
        config = load_pretrained(AutoConfig, model_dir, trust_remote_code=trust_remote_code)
        info = read_sentence_transformers_info(model_dir, config)
        tokenizer = load_pretrained(AutoTokenizer, model_dir, trust_remote_code=trust_remote_code)
        record = read_record(model_dir)
        backbone = model_class(record.backbone) if record and record.kind == "embedder" else AutoModel
        model = load_weights(backbone, model_dir, expected="an embedding model with all of its weights",
                             dtype=pick_dtype(dtype, device), trust_remote_code=trust_remote_code)  # fmt: skip
        model.to(device).eval()
        embedder = cls(model, tokenizer, info, model_dir=model_dir, name_or_path=str(name_or_path),
                       max_length=max_length, device=device)  # fmt: skip
        if quantize:
            embedder._quantize_int8()
        return embedder

    def _quantize_int8(self) -> None:
        """Switch inference to an int8 model, calibrated on the built-in texts as documents and as queries: OpenVINO
        (`qembed.models.openvino`) or, on x86 CPUs without AVX-512 VNNI or AMX, ONNX Runtime
        (`qembed.models.onnxruntime`), as `int8_backend()` chooses. The fp32 weights are released."""
        from qembed.models.openvino import CALIBRATION_TEXTS, int8_backend, quantize_to_openvino

        backend = int8_backend()
        texts = list(CALIBRATION_TEXTS)
        token_ids = self.prepare(texts, prompt=self.document_prompt) + self.prepare(texts, instruction=MODEL_DEFAULT)
        calibration = [self.collate([ids]) for ids in token_ids]
        if backend == "onnxruntime":
            from qembed.models.onnxruntime import quantize_to_onnxruntime

            self.inference_model = quantize_to_onnxruntime(self.model, calibration, self.fingerprint)
        else:
            self.inference_model = quantize_to_openvino(self.model, calibration, self.fingerprint, pad_id=self.pad_id,
                                                        max_width=self.max_length)  # fmt: skip
        self.model.to("meta")
        # int8 vectors never share a cache entry or an index with fp32 ones, nor with another backend's, library
        # version's or calibration's (the kept model's key hashes those)
        self.quantize = "int8"
        self.fingerprint = f"{self.fingerprint}-int8-{backend}-{self.inference_model.key[:8]}"

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save model, tokenizer, sentence-transformers files and `qembed.json`, keeping the tensor names and
        `architectures` of the folder it was loaded from; the folder loads back with `from_pretrained`."""
        if self.quantize:
            raise QembedError("an int8 embedder runs inference only: save the model loaded without quantize")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        keep_base_layout(directory, self.model_dir, self.model)
        self.tokenizer.save_pretrained(directory)
        write_sentence_transformers_files(directory, self.info, self.hidden_size)
        write_record(directory, self.record())

    def record(self) -> ModelRecord:
        """What this model is, as `qembed.json` records it."""
        return ModelRecord(kind="embedder", backbone=type(self.model).__name__, pooling=self.pooling,
                           dtype=dtype_name(self.model.dtype), matryoshka=self.matryoshka,
                           base_model=self.name_or_path)  # fmt: skip

    # ------------------------------------------------------------------ formatting
    @property
    def default_query_format(self) -> QueryFormat:
        """The model's own query format: its instruction (Qwen3 template), its raw query prompt, or none."""
        if self.default_instruction:
            return QueryFormat("instruction", self.default_instruction)
        return QueryFormat("prompt", self.query_prompt) if self.query_prompt else QueryFormat("none")

    def resolve_query_format(self, instruction: QueryFormat | str | None, prompt: str = "") -> QueryFormat:
        """`QueryFormat.of(instruction, prompt)` with `MODEL_DEFAULT` replaced by this model's own format."""
        fmt = QueryFormat.of(instruction, prompt)
        return self.default_query_format if fmt.kind == "default" else fmt

    @property
    def cache_identity(self) -> dict[str, str]:
        """What besides the text and its format determines a vector: weights, dtype and device type."""
        dtype = str(getattr(self.model, "dtype", "")).removeprefix("torch.")
        return {"fingerprint": self.fingerprint, "dtype": dtype, "device": torch.device(self.device).type}

    @property
    def batching(self) -> BatchDefaults:
        """The batching measured best for this model family on its device (see `default_batching`)."""
        return default_batching(self.pooling == "lasttoken", torch.device(self.device).type)

    def prepare(self, texts: Sequence[str], *, instruction: QueryFormat | str | None = None,
                prompt: str = "") -> list[list[int]]:  # fmt: skip
        """Token ids of fully formatted texts: query format (instruction template, raw prompt or none),
        truncation while tokenising, end-of-text token."""
        texts = check_texts(texts)
        if not texts:
            return []
        prefix = self.resolve_query_format(instruction, prompt).prefix
        if self.info.do_lower_case:
            texts = [t.lower() for t in texts]
        formatted = [prefix + t for t in texts]
        if self.pooling != "lasttoken":
            encoded = self.tokenizer(formatted, truncation=True, max_length=self.max_length, add_special_tokens=True)
            return [list(ids) for ids in encoded["input_ids"]]
        encoded = self.tokenizer(formatted, add_special_tokens=self._tokenizer_appends_eot, truncation=True,
                                 max_length=self.max_length)["input_ids"]  # fmt: skip
        return [self.finish_token_ids(ids) for ids in encoded]

    def finish_token_ids(self, ids: Sequence[int]) -> list[int]:
        """Token ids as the model takes them: cut to `max_length` and, for last-token pooling, ending in
        exactly one end-of-text token whatever the input ended with (used by `prepare` and for token-id
        inputs, e.g. the server's)."""
        ids = list(ids)
        if self.pooling != "lasttoken":
            return ids[: self.max_length]
        while ids and ids[-1] == self.eot_id:
            ids.pop()
        return ids[: self.max_length - 1] + [self.eot_id]

    def collate(self, token_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """A padded batch on this model's device (left padding for last-token pooling)."""
        return pad_batch(token_ids, self.pad_id, left=self.pooling == "lasttoken", device=self.device)

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled, unnormalised embeddings `(batch, hidden)`; differentiable when grad is enabled."""
        hidden = (self.inference_model or self.model)(**batch).last_hidden_state
        if self.pooling == "lasttoken":
            return hidden[:, -1]
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    # ------------------------------------------------------------------ encoding
    @property
    def search_normalize(self) -> bool:
        """Whether vectors are L2-normalised for search and ranking, so that the inner product of two of them
        is the model's declared similarity: always for "cosine"; for "dot", only when the model itself
        normalises. Rank with `truncate_and_normalize(vectors, dim, embedder.search_normalize)` (or
        `encode(..., normalize=embedder.search_normalize)`) and an inner-product index."""
        return self.similarity_fn_name == "cosine" or self.normalize

    def encode(self, texts: Sequence[str], *, instruction: QueryFormat | str | None = None, dim: int | None = None,
               normalize: bool | None = None, batch_tokens: int | None = None,
               show_progress: bool | None = None, prompt: str = "") -> np.ndarray:  # fmt: skip
        """Embed `texts` -> float32 array `(len(texts), dim or hidden)`, rows in input order.

        `instruction` applies the Qwen3 query template `Instruct: {instruction}\\nQuery:{text}` (or give a
        `QueryFormat`; `prompt` is a raw prefix); `dim` keeps the first `dim` components (Matryoshka) before
        normalising; `normalize=None` L2-normalises exactly when the model declares it (`self.normalize`, as
        sentence-transformers does); batches are cut by a padded-token budget (`None`: the model family's
        `batching`).
        """
        normalize = self.normalize if normalize is None else normalize
        texts = check_texts(texts)
        out_dim = self._check_dim(dim)
        if not texts:
            return np.zeros((0, out_dim), dtype=np.float32)
        token_ids = self.prepare(texts, instruction=instruction, prompt=prompt)
        show = (None if len(texts) >= _AUTO_PROGRESS_FROM else False) if show_progress is None else show_progress
        result = self.encode_token_ids(token_ids, batch_tokens=batch_tokens, show_progress=show)
        return truncate_and_normalize(result, dim, normalize)

    def token_batches(self, token_ids: Sequence[Sequence[int]], batch_tokens: int | None = None) -> list[list[int]]:
        """Indices of `token_ids` grouped into the model family's token-budget batches (`token_budget_batches`)."""
        batching = self.batching
        return token_budget_batches([len(ids) for ids in token_ids], batch_tokens or batching.batch_tokens,
                                    min_batch_tokens=batching.min_batch_tokens,
                                    shape_buckets=getattr(self.inference_model, "shape_buckets", False))  # fmt: skip

    def encode_batch(self, token_ids: Sequence[Sequence[int]], *, steady_shape: bool = False,
                     batch_tokens: int | None = None) -> np.ndarray:  # fmt: skip
        """Full-size, unnormalised float32 rows of one batch of prepared token ids (one forward pass).

        `steady_shape` (corpus encoding): with a runtime that keeps compiled kernels per input shape
        (OpenVINO), a short batch runs with copies of its first row added, up to `batching.steady_rows` under
        `batch_tokens`, so a corpus runs in about one shape per width (bounded memory); the copies are dropped.
        """
        rows = len(token_ids)
        if steady_shape and rows and getattr(self.inference_model, "shape_buckets", False):
            batching = self.batching
            longest = max(len(ids) for ids in token_ids)
            target = steady_rows(longest, batch_tokens or batching.batch_tokens, batching.min_batch_tokens)
            token_ids = list(token_ids) + [token_ids[0]] * (target - rows)
        with torch.inference_mode():
            return self.forward_features(self.collate(token_ids)).float().cpu().numpy()[:rows]

    def encode_token_ids(self, token_ids: Sequence[Sequence[int]], *, batch_tokens: int | None = None,
                         show_progress: bool | None = False, steady_shapes: bool = False) -> np.ndarray:  # fmt: skip
        """Full-size, unnormalised float32 rows `(len(token_ids), hidden)` of already prepared token ids
        (`prepare`), in input order, in token-budget batches (`steady_shapes`: as `encode_batch`'s
        `steady_shape`, for a corpus)."""
        result = np.empty((len(token_ids), self.hidden_size), dtype=np.float32)
        with progress_bar(total=len(token_ids), enabled=show_progress, desc="encode", unit="text") as bar:
            for indices in self.token_batches(token_ids, batch_tokens):
                result[indices] = self.encode_batch([token_ids[i] for i in indices], steady_shape=steady_shapes,
                                                    batch_tokens=batch_tokens)  # fmt: skip
                bar.update(len(indices))
        return result

    def encode_queries(self, queries: Sequence[str], *, instruction: QueryFormat | str | None = MODEL_DEFAULT,
                       **kwargs) -> np.ndarray:  # fmt: skip
        """Embed queries in the model's own query format (`MODEL_DEFAULT`) unless another is given:
        an instruction text, a `QueryFormat`, or `instruction=None` for bare queries."""
        return self.encode(queries, instruction=instruction, **kwargs)

    @property
    def document_prompt(self) -> str:
        """The raw prefix documents get: the model's `document` (or `passage`) prompt, usually empty."""
        return self.info.prompts.get("document", "") or self.info.prompts.get("passage", "")

    def encode_documents(self, documents: Sequence[str], **kwargs) -> np.ndarray:
        """Embed documents: never an instruction (the model's document prompt, if it has one)."""
        return self.encode(documents, prompt=self.document_prompt, **kwargs)

    def _check_dim(self, dim: int | None) -> int:
        if dim is None:
            return self.hidden_size
        if not isinstance(dim, int) or isinstance(dim, bool) or not MIN_MRL_DIM <= dim <= self.hidden_size:
            raise ValueError(f"dim must be an integer between {MIN_MRL_DIM} and {self.hidden_size}, got {dim!r}")
        if dim < self.hidden_size and not self.matryoshka and not self._warned_dim:
            self._warned_dim = True
            log.warning("%s: dim=%d keeps the first %d of %d components, but the model's files do not declare "
                        "Matryoshka support (qembed.json from training with --mrl-dims, or MRL in its model card): "
                        "quality may drop", self.name_or_path, dim, dim, self.hidden_size)  # fmt: skip
        return dim

    def __repr__(self) -> str:
        return (f"Embedder({self.name_or_path!r}, pooling={self.pooling}, hidden={self.hidden_size}, "
                f"max_length={self.max_length}, device={self.device})")  # fmt: skip
