"""The Ray Data engine: encode a corpus on a Ray cluster (or a local one) and stream the vectors back.

`encode_corpus` reads the corpus as Ray Data blocks (the lines of `.jsonl`/`.txt` files or the rows of a
`.parquet` file, parsed by qembed's own corpus reader, so texts and ids are exactly those of one process),
hands them to a pool of Ray actors that each load the model once (one GPU per actor when the model runs on
CUDA, CPU actors otherwise) and encode as one process does (`Embedder.prepare` and `encode_token_ids`: same
tokenisation, same token-budget batches and shapes), and
yields `EncodedBlock`s (ids, text keys, full-size unnormalised float32 vectors) to the driver as they are
done.

`fill_cache` is what the verbs call: it writes those blocks into a `CachedEncoder`'s embedding cache, one
crash-safe shard per block, skipping every text already there (so a killed job continues where it
stopped); the verb's own single-process pass that follows finds every vector in the cache, and writes the
index, vectors or evaluation exactly as without Ray.

Needs the `ray` extra (`pip install 'qembed[ray]'`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qembed.cache import KEY_BYTES
from qembed.errors import QembedError

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'qembed[ray]'"
_READ_CPUS = 0.1  # Ray CPUs of a read task: reading lines is cheap, the actors get the rest


def require_ray():
    """The `ray` module (with Ray Data), or a one-line `QembedError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise QembedError(f"--engine ray needs Ray Data, which is not installed: {EXTRA_HINT}") from None
    return ray


@dataclass
class RayOptions:
    """Where and how a corpus is encoded on Ray.

    `address`: a running cluster (`ray start --head` prints it; `auto` finds a local one); None starts a
    local cluster for the run (with `num_cpus` CPUs, default all) and stops it afterwards. `actors`: model
    replicas (default: one per GPU when the model runs on CUDA, else one per 4 CPUs of the cluster, at least
    one). `batch_size`: texts per actor call, which is also one embedding-cache shard (a killed job re-encodes
    at most the batches in flight). `gpu_ids`: the local cluster runs on these CUDA devices of this machine
    only (`--device cuda:0,cuda:1`)."""

    address: str | None = None
    actors: int | None = None
    batch_size: int = 1024
    num_cpus: int | None = None
    gpu_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise QembedError(f"Ray actors must be at least 1, got {self.actors}")
        if self.batch_size < 1:
            raise QembedError(f"Ray batch size must be at least 1, got {self.batch_size}")


@dataclass
class EncodedBlock:
    """What an actor sends back for one batch: document ids, text keys `(n, 20)` uint8 and full-size,
    unnormalised float32 vectors `(n, hidden)`. Texts already cached, and repeats within the batch, are left
    out."""

    ids: list[str]
    keys: np.ndarray
    vectors: np.ndarray

    def key_list(self) -> list[bytes]:
        return [bytes(row) for row in self.keys]


@dataclass(frozen=True)
class _ModelSpec:
    """How an actor loads the model so that its vectors share the driver's cache entries."""

    name_or_path: str
    device_type: str  # "cpu" | "cuda"
    dtype: object  # torch.dtype
    quantize: str | None
    max_length: int
    query_format: object  # resolved QueryFormat
    identity: dict  # the `cache_key` the actor's embedder must have
    batch_tokens: int | None


def _corpus_files(corpus: str | Path) -> list[Path]:
    from qembed.data.corpus import corpus_path

    path = corpus_path(corpus)
    if not path.is_file():
        raise QembedError(f"corpus file not found: {path}")
    if path.suffix not in (".jsonl", ".txt", ".parquet"):
        raise QembedError(f"{path}: the Ray engine reads .jsonl, .parquet and .txt corpora (or a BEIR folder)")
    return [path]


def _block(column: str, payloads: list[bytes], numbers):
    """A Ray Data block: a binary `column` of raw lines or pickled records and their 1-based `number`s."""
    import pyarrow as pa

    return pa.table({column: pa.array(payloads, pa.binary()), "number": pa.array(numbers, pa.int64())})


def _lines_datasource(paths: list[Path], lines_per_block: int):
    """A Ray datasource of a text file's raw lines with their 1-based line numbers (one read task per file,
    streaming blocks), split on `\\n` only, exactly as qembed's corpus reader does."""
    from ray.data.datasource import FileBasedDatasource

    class LinesDatasource(FileBasedDatasource):
        def _read_stream(self, f, path: str):
            number, lines, rest = 0, [], b""

            def block():
                return _block("line", lines, range(number - len(lines) + 1, number + 1))

            while data := f.read(1 << 22):
                parts = (rest + data).split(b"\n")
                rest = parts.pop()
                for part in parts:
                    number += 1
                    lines.append(part + b"\n")
                    if len(lines) >= lines_per_block:
                        yield block()
                        lines = []
            if rest:  # a last line without its newline
                number += 1
                lines.append(rest)
            if lines:
                yield block()

    return LinesDatasource([str(p) for p in paths])


def _parquet_datasource(paths: list[Path], rows_per_block: int):
    """A Ray datasource of a Parquet file's rows as qembed's reader sees them (`qembed.data.formats.iter_rows`:
    Python values, nulls dropped), each pickled whole so an actor validates exactly the record one process
    would, with their 1-based row numbers (one read task per file, streaming blocks). The file is read through
    Ray's filesystem (opened for random access, as Parquet needs), like the lines datasource."""
    import pickle

    from ray.data.datasource import FileBasedDatasource

    from qembed.data.formats import iter_parquet_rows

    class ParquetRecordsDatasource(FileBasedDatasource):
        def _open_input_source(self, filesystem, path: str, **open_args):
            return filesystem.open_input_file(path)

        def _read_stream(self, f, path: str):
            records, numbers = [], []
            for number, record in iter_parquet_rows(f):
                records.append(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
                numbers.append(number)
                if len(records) >= rows_per_block:
                    yield _block("record", records, numbers)
                    records, numbers = [], []
            if records:
                yield _block("record", records, numbers)

    return ParquetRecordsDatasource([str(p) for p in paths])


class _EncodeActor:
    """One model replica: parses a batch of corpus lines (or takes texts), drops texts already cached, encodes
    the rest as the encode pipeline does (full-size, unnormalised, as the cache stores them; a chunk's last
    batch padded to steady shapes)."""

    def __init__(self, spec: _ModelSpec, known, text_field: str, keep_blank: bool, path: str, threads: int) -> None:
        import ray
        import torch

        from qembed.cache import cache_key
        from qembed.models.embedder import Embedder

        if spec.device_type == "cpu":
            torch.set_num_threads(max(1, threads))
        self.embedder = Embedder.from_pretrained(spec.name_or_path, device=spec.device_type, dtype=spec.dtype,
                                                 quantize=spec.quantize, max_length=spec.max_length)  # fmt: skip
        got = cache_key(self.embedder, spec.query_format)
        if got != spec.identity:
            raise QembedError(f"the Ray actor's model differs from the driver's: {got} != {spec.identity} "
                              "(give every node the same model files)")  # fmt: skip
        self.spec = spec
        known = ray.get(known[0]) if isinstance(known, list) else known
        self.known = known if known is not None else np.empty(0, dtype=f"S{KEY_BYTES}")
        self.text_field, self.keep_blank, self.path = text_field, keep_blank, Path(path)
        self.hidden = self.embedder.hidden_size

    def _documents(self, batch: dict) -> tuple[list[str], list[str]]:
        import pickle

        from qembed.data.corpus import parse_corpus_line, parse_corpus_record

        if "text" in batch:  # texts given in memory: the id is the position
            return [str(i) for i in batch["id"]], [str(t) for t in batch["text"]]
        ids, texts = [], []
        records = "record" in batch  # a Parquet corpus (`_parquet_datasource`), else lines
        for raw, number in zip(batch["record" if records else "line"], batch["number"]):
            if records:
                doc = parse_corpus_record(pickle.loads(bytes(raw)), self.path, int(number), self.text_field)
            else:
                doc = parse_corpus_line(bytes(raw), self.path, int(number), self.text_field)
            if doc is not None and (doc.text or self.keep_blank):
                ids.append(doc.doc_id)
                texts.append(doc.text)
        return ids, texts

    def __call__(self, batch: dict) -> dict:
        from qembed.cache import text_key

        ids, texts = self._documents(batch)
        keys = np.frombuffer(b"".join(text_key(t) for t in texts), dtype=f"S{KEY_BYTES}")
        keep, seen = [], set()
        found = _contains(self.known, keys)
        for i, key in enumerate(keys.tolist() if len(keys) else []):
            if not found[i] and key not in seen:
                seen.add(key)
                keep.append(i)
        vectors = np.empty((0, self.hidden), dtype=np.float32)
        if keep:
            token_ids = self.embedder.prepare([texts[i] for i in keep], instruction=self.spec.query_format)
            vectors = self.embedder.encode_token_ids(token_ids, batch_tokens=self.spec.batch_tokens,
                                                     steady_shapes=True)  # fmt: skip
        return {
            "id": np.array([ids[i] for i in keep], dtype=object),
            "key": keys[keep].view(np.uint8).reshape(-1, KEY_BYTES),
            "vector": np.ascontiguousarray(vectors, dtype=np.float32),
        }


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Whether each key is in `sorted_keys` (both `S20` arrays, the first sorted)."""
    if not len(sorted_keys) or not len(keys):
        return np.zeros(len(keys), dtype=bool)
    at = np.searchsorted(sorted_keys, keys)
    return sorted_keys[np.minimum(at, len(sorted_keys) - 1)] == keys


def _connect(ray, options: RayOptions) -> bool:
    """Connect to `options.address` or start a local cluster; True when this call started Ray."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if options.address:
        try:
            ray.init(address=options.address, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise QembedError(f"cannot join the Ray cluster at {options.address}: {str(exc).splitlines()[0]}") from None
    elif options.gpu_ids:  # Ray hands out the GPUs its node was started with: these ones
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        physical = visible.split(",") if visible else [str(i) for i in range(max(options.gpu_ids) + 1)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical[i] for i in options.gpu_ids)
        try:
            ray.init(num_cpus=options.num_cpus, num_gpus=len(options.gpu_ids), **quiet)
        finally:
            if visible is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private cluster of this process
        ray.init(num_cpus=options.num_cpus, **quiet)
    return True


def _actor_plan(ray, options: RayOptions, device_type: str) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for the cluster's resources."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if device_type == "cuda":
        if not gpus:
            raise QembedError("the model runs on CUDA but the Ray cluster has no GPU (use --device cpu)")
        actors = options.actors or gpus
        return actors, max(0.1, min(1.0, (cpus - 2 * _READ_CPUS) / actors)), 1.0
    actors = options.actors or max(1, int(cpus // 4))
    return actors, max(0.1, (cpus - 2 * _READ_CPUS) / actors), 0.0


def encode_corpus(embedder, corpus: str | Path | Sequence[str], *, query_format=None, prompt: str = "",
                  batch_tokens: int | None = None, text_field: str = "text", keep_blank: bool = False,
                  skip: np.ndarray | None = None, options: RayOptions | None = None,
                  show_progress: bool | None = None) -> Iterator[EncodedBlock]:  # fmt: skip
    """Encode a corpus on Ray with the model of `embedder` (loaded again by each actor, on the same device type,
    dtype and quantisation, so the vectors are those `embedder.encode` gives) and yield `EncodedBlock`s as
    the actors finish them, in no particular order.

    `corpus`: a `.jsonl`/`.parquet`/`.txt` file or a BEIR folder (read as Ray Data blocks by the workers: the path
    must be reachable from every node), or a list of texts (ids are their positions). `query_format`/
    `prompt` as in `Embedder.encode`; `skip`: sorted `S20` text keys to leave out (already cached)."""
    from qembed.cache import cache_key
    from qembed.progress import progress_bar

    ray = require_ray()
    options = options or RayOptions()
    fmt = embedder.resolve_query_format(query_format, prompt)
    device_type = embedder.device.type
    if device_type not in ("cpu", "cuda"):
        raise QembedError(f"the Ray engine runs models on cpu or cuda, not {device_type}")
    paths = None if isinstance(corpus, (list, tuple)) else _corpus_files(corpus)  # bad input: before Ray starts
    spec = _ModelSpec(embedder.name_or_path, device_type, embedder.model.dtype, embedder.quantize,
                      embedder.max_length, fmt, cache_key(embedder, fmt), batch_tokens)  # fmt: skip
    started = _connect(ray, options)
    context = None
    try:
        import ray.data

        context = ray.data.DataContext.get_current()
        saved = context.enable_progress_bars, context.target_max_block_size
        context.enable_progress_bars = bool(show_progress)  # qembed's own bar counts the vectors
        # One output block per actor call (a batch's vectors fill the target), so every batch reaches the
        # driver, and the cache, as soon as it is encoded; Ray's default (128 MiB) would hold them back.
        context.target_max_block_size = options.batch_size * embedder.hidden_size * 4
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # not "progress bars disabled"
        actors, cpus, gpus = _actor_plan(ray, options, device_type)
        if paths is None:
            ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(corpus)])
            path = ""
        else:
            source = _parquet_datasource if paths[0].suffix == ".parquet" else _lines_datasource
            ds = ray.data.read_datasource(source(paths, options.batch_size), num_cpus=_READ_CPUS)
            path = str(paths[0])
        known = [ray.put(skip if skip is not None else np.empty(0, dtype=f"S{KEY_BYTES}"))]  # a reference, read by each actor
        ds = ds.map_batches(
            _EncodeActor,
            fn_constructor_kwargs={"spec": spec, "known": known, "text_field": text_field, "keep_blank": keep_blank,
                                   "path": path, "threads": int(round(cpus)) or 1},
            compute=ray.data.ActorPoolStrategy(size=actors), batch_size=options.batch_size,
            batch_format="numpy", num_cpus=cpus, num_gpus=gpus,
        )  # fmt: skip
        with progress_bar(desc="ray encode", unit="text", enabled=show_progress) as bar:
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    if len(batch["key"]):
                        block = EncodedBlock([str(i) for i in batch["id"]], np.asarray(batch["key"], dtype=np.uint8),
                                             np.asarray(batch["vector"], dtype=np.float32))  # fmt: skip
                        bar.update(len(block.ids))
                        yield block
            except ray.exceptions.RayError as exc:
                raise _user_error(exc) from None
    finally:
        if context is not None:
            context.enable_progress_bars, context.target_max_block_size = saved
        if started:
            ray.shutdown()


def _user_error(exc: BaseException) -> BaseException:
    """A `QembedError` raised in a worker (a bad corpus line) as a `QembedError` with its message (Ray passes
    it on as the text of the worker's traceback); anything else unchanged."""
    import re

    for text in (str(exc), str(getattr(exc, "cause", "") or "")):
        found = re.search(r"qembed\.errors\.\w*Error: (.+)", text)
        if found:
            return QembedError(found.group(1).strip())
    return exc


def fill_cache(encoder, corpus: str | Path | Sequence[str], options: RayOptions | None = None, *,
               text_field: str = "text", keep_blank: bool = False, show_progress: bool | None = None) -> int:  # fmt: skip
    """Encode on Ray every text of `corpus` that `encoder` (a `CachedEncoder`) has not cached yet, writing
    each block into its cache as it arrives; returns how many new texts were stored. They count as encoded
    in `encoder.stats` (the verb's pass over the corpus that follows finds them in the cache)."""
    cache = encoder.cache
    new = 0
    for block in encode_corpus(encoder.embedder, corpus, query_format=encoder.query_format,
                               batch_tokens=encoder.batch_tokens, text_field=text_field, keep_blank=keep_blank,
                               skip=cache.all_keys(), options=options, show_progress=show_progress):  # fmt: skip
        keys = block.key_list()
        new += sum(1 for key in set(keys) if key not in cache)
        cache.add(keys, block.vectors)
    encoder.stats.encoded += new
    encoder.stats.hits -= new
    return new


def corpus_of(dataset) -> str | Path | list[str]:
    """What `encode_corpus` reads for a loaded `RetrievalDataset`: its corpus file when it is read from disk
    (`CorpusFile`), else its texts."""
    path = getattr(dataset.corpus, "path", None)
    return path if path is not None else list(dataset.corpus.values())
