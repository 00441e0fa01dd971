"""The int8 CPU path of the Embedder: the transformer exported to OpenVINO and quantised to int8 with NNCF.

Chosen by measurement (`bench/bench_embed.py`, docs/inference.md "CPU fast paths"): on the development CPU (AVX-512
VNNI and BF16, no AMX), against PyTorch fp32 on all-MiniLM-L6-v2, OpenVINO ran at 3.3x (it computes in bf16
where the CPU can), ONNX Runtime dynamic int8 at 2.7x, PyTorch dynamic int8 at 1.9x, and OpenVINO with
weights *and* activations in int8 (static quantisation, this module) at 5.5x. Static quantisation needs sample
activations: NNCF calibrates on `CALIBRATION_TEXTS`, a fixed built-in mix of queries and passages (English,
Chinese, code, numbers) formatted exactly as the model sees them (query instruction, document prompt), so an
int8 model is deterministic and does not depend on the batch it runs in.

Only the transformer runs in OpenVINO; tokenising, padding, pooling, Matryoshka truncation and normalisation
stay in `Embedder`, so the semantics are those of the fp32 path. Needs the `cpu-fast` extra. On x86 CPUs
without AVX-512 VNNI or AMX, `int8_backend()` picks ONNX Runtime instead (`qembed.models.onnxruntime`, which
shares this module's calibration texts and model cache).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from qembed.errors import QembedError
from qembed.models.batching import bucket_up, row_bucket_up

CPU_FAST_HINT = "quantize='int8' needs OpenVINO and NNCF: pip install 'qembed[cpu-fast]'"
INT8_BACKENDS = ("openvino", "onnxruntime")

#: Calibration samples: short queries and passages of varied length, languages and content.
CALIBRATION_TEXTS = (
    "how do I reset my password",
    "best fertilizer for rice seedlings",
    "what causes yellow leaves on tomato plants?",
    "symptoms of vitamin D deficiency in adults",
    "python sort list of dicts by key",
    "latest quarterly revenue of the company",
    "When was the Eiffel Tower built and how tall is it?",
    "side effects of ibuprofen with alcohol",
    "水稻纹枯病怎么防治？",
    "玉米种植的最佳密度是多少",
    "如何提高小麦的产量",
    "Was ist der Unterschied zwischen Wetter und Klima?",
    "¿Cuántos litros de agua necesita una vaca al día?",
    "The Eiffel Tower was completed in 1889 for the World's Fair and stands about 330 metres tall.",
    "Ibuprofen is a nonsteroidal anti-inflammatory drug. Combining it with alcohol increases the risk of "
    "stomach bleeding, especially at high doses or with long-term use.",
    "To reset your password, open Settings, choose Account, then Security, and follow the link we send to "
    "your registered e-mail address. The link expires after 24 hours.",
    "def sort_records(records: list[dict], key: str) -> list[dict]:\n    return sorted(records, key=lambda r: r[key])",
    "Revenue for the third quarter was $4.2 billion, up 12% year over year, driven by subscription growth of "
    "18% and a 3-point improvement in gross margin to 61.5%.",
    "水稻纹枯病的防治应以农业防治为基础，合理密植，科学施肥，避免偏施氮肥；发病初期可选用井冈霉素、噻呋酰胺等药剂喷雾，"
    "重点喷施植株中下部，间隔7到10天再喷一次。",
    "玉米的种植密度应根据品种特性、土壤肥力和气候条件确定。一般紧凑型品种每亩4500至5000株，平展型品种每亩3500至4000株。",
    "Vitamin D deficiency often goes unnoticed. Common symptoms include fatigue, bone pain, muscle weakness, "
    "low mood and frequent infections. Severe deficiency can cause osteomalacia in adults. Blood levels below "
    "20 ng/mL are generally considered deficient, and treatment usually involves oral supplements of "
    "cholecalciferol together with dietary changes and safe sun exposure.",
    "Climate describes the average weather of a region over decades, including temperature, precipitation "
    "and wind patterns, while weather is the state of the atmosphere at a given time and place. A single cold "
    "winter says little about the climate; a trend over thirty years of measurements does. Scientists use "
    "long records from weather stations, satellites, ocean buoys and ice cores to describe how the climate "
    "changes, and models of the atmosphere and oceans to project how it may change under different emission "
    "scenarios. Regional effects differ: some areas see more intense rainfall, others longer droughts.",
    "Tomato leaves turn yellow for several reasons. Nitrogen deficiency yellows the older, lower leaves first. "
    "Overwatering starves roots of oxygen, while underwatering stresses the plant. Fungal diseases such as "
    "early blight produce yellow patches with brown concentric rings, and fusarium wilt yellows leaves on one "
    "side of the plant. Check the soil moisture, remove affected leaves, rotate crops each season and feed "
    "with a balanced fertilizer. If the problem spreads quickly, send a sample to an extension laboratory.",
    "Una vaca lechera adulta bebe entre 80 y 150 litros de agua al día, según la producción de leche, la "
    "temperatura y la dieta. En verano el consumo puede aumentar un 50 %.",
    "Error: connection refused (os error 111) at 127.0.0.1:8000 — retrying in 5 s [attempt 3/10]",
    "| year | yield t/ha | rainfall mm |\n| 2021 | 6.8 | 1120 |\n| 2022 | 7.1 | 980 |\n| 2023 | 6.4 | 1310 |",
)


def check_cpu_fast() -> str:
    """Raise a one-line `QembedError` naming the `cpu-fast` extra when OpenVINO or NNCF is missing; returns
    NNCF's version. NNCF is imported only to quantise (40 MiB that a process reading a kept model saves)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import openvino  # noqa: F401

        return version("nncf")
    except (ImportError, PackageNotFoundError) as exc:
        raise QembedError(f"{CPU_FAST_HINT} ({exc})") from None


class _HiddenStates(torch.nn.Module):
    """The base model as a function of tensors to its last hidden states (what OpenVINO traces)."""

    def __init__(self, model: torch.nn.Module, inputs: Sequence[str]):
        super().__init__()
        self.model, self.inputs = model, tuple(inputs)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.inputs, tensors))
        if "position_ids" in kwargs:  # a decoder: no key/value cache in the graph
            kwargs["use_cache"] = False
        return self.model(**kwargs).last_hidden_state


class OpenVINOEncoder:
    """A compiled int8 OpenVINO model called like a transformers base model: `encoder(**batch).last_hidden_state`
    (a float32 CPU tensor).

    OpenVINO keeps compiled kernels and buffers for every input shape it has run, so each batch is padded to
    `(row_bucket_up(rows), bucket_up(width))` (`qembed.models.batching`; width at most `max_width`, the model's
    token limit) and the result cut back: a corpus runs in a bounded set of shapes and bounded memory. Padding
    columns are masked pad tokens (on the left when the model takes `position_ids`, i.e. left-padded decoders);
    padding rows repeat the first row and are dropped."""

    shape_buckets = True  # batches are cut for the ladder shapes (`token_budget_batches(shape_buckets=True)`)

    def __init__(self, compiled, inputs: Sequence[str], *, pad_id: int = 0, max_width: int | None = None,
                 key: str = ""):  # fmt: skip
        self.compiled, self.inputs, self.key = compiled, tuple(inputs), key
        self.pad_id, self.max_width = pad_id, max_width
        self.left = "position_ids" in self.inputs

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        feed = {name: batch[name].numpy() for name in self.inputs}
        rows, width = feed["input_ids"].shape
        padded_width = max(width, min(bucket_up(width), self.max_width or width))
        feed = {name: self._pad(name, array, row_bucket_up(rows), padded_width) for name, array in feed.items()}
        hidden = np.asarray(self.compiled(feed)[0], dtype=np.float32)
        hidden = hidden[:rows, padded_width - width :] if self.left else hidden[:rows, :width]
        return SimpleNamespace(last_hidden_state=torch.from_numpy(np.ascontiguousarray(hidden)))

    def _pad(self, name: str, array: np.ndarray, rows: int, width: int) -> np.ndarray:
        extra = width - array.shape[1]
        if extra:
            columns = (extra, 0) if self.left else (0, extra)
            array = np.pad(array, ((0, 0), columns), constant_values=self.pad_id if name == "input_ids" else 0)
        if rows > len(array):
            array = np.concatenate([array, np.repeat(array[:1], rows - len(array), axis=0)])
        return array


def openvino_cache_dir() -> Path:
    """Where quantised models are kept (both backends): `$QEMBED_OPENVINO_CACHE`, else
    `~/.cache/qembed/openvino`."""
    default = Path.home() / ".cache" / "qembed" / "openvino"
    return Path(os.environ.get("QEMBED_OPENVINO_CACHE") or default).expanduser()


def calibration_key(settings: str, calibration: Sequence[dict[str, torch.Tensor]]) -> str:
    """A kept model's folder name: a hash of `settings` (fingerprint, backend versions) and the calibration."""
    key = hashlib.sha1(settings.encode())
    for batch in calibration:
        key.update(batch["input_ids"].numpy().tobytes())
    return key.hexdigest()[:20]


def keep_model(folder: Path, filename: str, write: Callable[[Path], object]) -> None:
    """Unless `folder/filename` exists, `write(tmp)` the model into a folder beside it, then rename that folder
    into place: a killed run never leaves half a model; if another process kept the same model first, theirs
    is used."""
    if (folder / filename).exists():
        return
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    write(tmp)
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def int8_backend() -> str:
    """Which library runs `quantize="int8"`: `$QEMBED_INT8_BACKEND` (`openvino` or `onnxruntime`), else OpenVINO
    on CPUs with int8 dot-product units (AVX-512 VNNI or AMX: 5.5x PyTorch fp32 on MiniLM) and on non-x86 CPUs,
    and ONNX Runtime on other x86 CPUs (AVX2: its static int8 is 1.7-1.8x OpenVINO's there; docs/scale.md). Read
    from CPUID (PyTorch's cpuinfo), so an emulated AVX2 CPU is seen as one."""
    chosen = os.environ.get("QEMBED_INT8_BACKEND")
    if chosen:
        if chosen not in INT8_BACKENDS:
            raise QembedError(f"QEMBED_INT8_BACKEND={chosen!r}: use one of {', '.join(INT8_BACKENDS)}")
        return chosen
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "openvino"
    has_vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: True)()
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "openvino" if has_vnni or has_amx else "onnxruntime"


def quantize_to_openvino(model: torch.nn.Module, calibration: Sequence[dict[str, torch.Tensor]],
                         fingerprint: str | None = None, *, pad_id: int = 0,
                         max_width: int | None = None) -> OpenVINOEncoder:  # fmt: skip
    """Export `model` (a transformers base model, fp32 on the CPU) to OpenVINO and quantise its matrix
    multiplications to int8 (weights per channel, activations with scales calibrated on `calibration`, a list
    of collated batches); compiled for as many threads as torch uses.

    With the weights' `fingerprint`, the quantised model is kept in `openvino_cache_dir()` under a key of the
    fingerprint, the calibration inputs, the OpenVINO/NNCF versions and the precision it runs in (so its vectors
    never share an embedding cache with another setting's), and later loads read it back
    (export and calibration take minutes for a 0.6B model). `pad_id` and `max_width` (the longest input the
    model takes) are how `OpenVINOEncoder` pads batches to bucketed shapes."""
    nncf_version = check_cpu_fast()
    import openvino as ov

    inputs = list(calibration[0])
    # The operations left in floating point run in float32. OpenVINO's default on CPUs with bf16 units is
    # bfloat16, and with it, on an AMX CPU, all-MiniLM-L6-v2's vectors at a padded width of 32 tokens came out
    # at cosine 0.87-0.90 to fp32's (0.99 at every other width, and at 32 with AMX disabled); float32 costs
    # ~7 % of speed there (docs/inference.md).
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads()),
              "INFERENCE_PRECISION_HINT": "f32"}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        settings = f"{fingerprint}|{ov.__version__}|{nncf_version}|{inputs}|{config['INFERENCE_PRECISION_HINT']}"
        key = calibration_key(settings, calibration)
        folder = openvino_cache_dir() / key if fingerprint else Path(scratch) / "model"
        # always compiled from the saved file: the in-memory graph NNCF returns gives slightly different vectors
        # than the same graph read back
        keep_model(folder, "model.xml", lambda tmp: ov.save_model(_export_int8(model, calibration, inputs),
                                                                  tmp / "model.xml", compress_to_fp16=False))  # fmt: skip
        compiled = ov.Core().compile_model(folder / "model.xml", "CPU", config)
    return OpenVINOEncoder(compiled, inputs, pad_id=pad_id, max_width=max_width, key=key)


def prepare_export(model: torch.nn.Module, calibration: Sequence[dict[str, torch.Tensor]], inputs: list[str]):
    """What both int8 exports (OpenVINO, ONNX) start from: the model as a function of its input tensors
    (`_HiddenStates`), one example batch, and the calibration batches as an NNCF dataset. A left-padded decoder
    is switched to eager attention: its additive mask never yields NaN on a padded row once traced (SDPA's
    traced mask does)."""
    import nncf

    if "position_ids" in inputs:
        model.set_attn_implementation("eager")
    example = tuple(calibration[0][name] for name in inputs)
    samples = nncf.Dataset([{name: batch[name].numpy() for name in inputs} for batch in calibration])
    return _HiddenStates(model, inputs).eval(), example, samples


@contextmanager
def quiet_export() -> Iterator[None]:
    """Around an export and its quantisation: no gradients, and tracing warnings, NNCF's log and its progress
    bars silenced (they are noise here); errors still raise."""
    level = logging.getLogger("nncf").level
    logging.getLogger("nncf").setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("nncf").setLevel(level)


def _export_int8(model: torch.nn.Module, calibration: Sequence[dict[str, torch.Tensor]], inputs: list[str]):
    import nncf
    import openvino as ov

    module, example, samples = prepare_export(model, calibration, inputs)
    with quiet_export():
        graph = ov.convert_model(module, example_input=example)
        for port, name in zip(graph.inputs, inputs):
            port.get_tensor().set_names({name})
        return nncf.quantize(graph, samples, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
