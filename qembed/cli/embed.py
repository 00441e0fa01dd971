"""`qembed embed`: texts from a file -> embeddings in `.npy`, `.jsonl` or `.parquet`, streamed.

The texts go through the encode pipeline (`qembed.encode`) a chunk at a time and each chunk is appended to
the output and flushed, so memory stays bounded and a killed run loses one chunk. While a run is unfinished
a small state file `OUTPUT.qembed-embed.json` lies beside the output; the same command continues it without
duplicates (`.jsonl`: after its last complete line; `.npy`: after the rows the state file counts; `.parquet`
cannot be appended to, so it starts again). Without the state file an existing output is overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qembed.cli.common import (
    add_model_args,
    add_output_args,
    add_progress_args,
    add_quantize_arg,
    check_output,
)
from qembed.cli.engine import add_engine_args, engine_options
from qembed.data.corpus import iter_corpus
from qembed.errors import QembedError
from qembed.files import atomic_write_json

FORMATS = (".npy", ".jsonl", ".parquet")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("embed", help="embed texts from a .txt or .jsonl file")
    add_model_args(p, help="embedding model: local folder or hub id")
    p.add_argument("--input", required=True, help=".txt (one text per line), .jsonl or a BEIR folder")
    p.add_argument("--field", default="text", help="text field of .jsonl records (default: text)")
    p.add_argument("--queries", action="store_true", help="the texts are queries: embed them with the model's query instruction")
    p.add_argument("--instruction", help="query instruction (implies --queries; default: the model's own)")
    p.add_argument("--dim", type=int, help="Matryoshka dimension, first N components re-normalised (default: full)")
    p.add_argument("--chunk-size", type=int, default=1024, metavar="N",
                   help="texts encoded and written at a time (a kill loses at most one chunk; default 1024)")  # fmt: skip
    add_output_args(p, help="FILE.npy, FILE.jsonl or FILE.parquet (an unfinished run of the same command is "
                    "continued, anything else overwritten)")  # fmt: skip
    add_progress_args(p)
    add_quantize_arg(p)
    add_engine_args(p)
    p.add_argument("--cache-dir", metavar="DIR", help="embedding cache of --engine ray, which a rerun resumes from "
                   "(default: $QEMBED_CACHE or ~/.cache/qembed/embeddings)")  # fmt: skip
    p.set_defaults(func=run)


def state_path(output: Path) -> Path:
    return output.with_name(output.name + ".qembed-embed.json")


def _complete_jsonl_rows(output: Path) -> int:
    """Complete lines of an unfinished `.jsonl` output (a torn last line is cut off); their `index` fields
    must be 0, 1, 2, ..."""
    rows, keep = 0, 0
    with output.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            if record.get("index") != rows:
                raise QembedError(f"{output}:{rows + 1}: not the row this run expects: delete the file to start again")
            rows, keep = rows + 1, keep + len(line)
    with output.open("r+b") as f:
        f.truncate(keep)
    return rows


class _Sink:
    """Where the vectors go: appended and flushed chunk by chunk."""

    def __init__(self, output: Path, dim: int, total: int, done: int) -> None:
        self.output, self.dim, self.total, self.rows = output, dim, total, done
        kind = output.suffix
        if kind == ".jsonl":
            self._file = output.open("ab" if done else "wb")
        elif kind == ".npy":
            from numpy.lib.format import open_memmap

            if done:
                self._array = open_memmap(output, mode="r+")
                if self._array.shape != (total, dim):
                    raise QembedError(f"{output} holds {self._array.shape}, this run writes {(total, dim)}: "
                                      "delete it to start again")  # fmt: skip
            else:
                self._array = open_memmap(output, mode="w+", dtype=np.float32, shape=(total, dim))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self._schema = pa.schema([("index", pa.int64()), ("id", pa.string()), ("text", pa.string()),
                                      ("embedding", pa.list_(pa.float32(), dim))])  # fmt: skip
            self._writer = pq.ParquetWriter(output, self._schema)

    def write(self, docs, vectors: np.ndarray) -> None:
        start = self.rows
        if self.output.suffix == ".jsonl":
            lines = [json.dumps({"index": start + i, "id": doc.doc_id, "text": doc.text, "embedding": v.tolist()},
                                ensure_ascii=False) + "\n" for i, (doc, v) in enumerate(zip(docs, vectors))]  # fmt: skip
            self._file.write("".join(lines).encode("utf-8"))
            self._file.flush()
        elif self.output.suffix == ".npy":
            self._array[start : start + len(vectors)] = vectors
            self._array.flush()
        else:
            import pyarrow as pa

            embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), self.dim)
            table = pa.Table.from_arrays([pa.array(range(start, start + len(vectors)), pa.int64()),
                                          pa.array([d.doc_id for d in docs]), pa.array([d.text for d in docs]),
                                          embedding], schema=self._schema)  # fmt: skip
            self._writer.write_table(table)  # one row group per chunk
        self.rows += len(vectors)

    def close(self) -> None:
        if self.output.suffix == ".jsonl":
            self._file.close()
        elif self.output.suffix == ".npy":
            del self._array
        else:
            self._writer.close()


def run(args) -> int:
    from qembed.encode import CachedEncoder, NoCache
    from qembed.models.embedder import Embedder
    from qembed.models.prompts import MODEL_DEFAULT

    output = Path(args.output)
    if output.suffix not in FORMATS:
        raise QembedError(f"--output must end in .npy or .jsonl, or .parquet, got {output.name}")
    if args.chunk_size < 1:
        raise QembedError("--chunk-size must be at least 1")
    check_output(output, input=args.input)
    ray_options = engine_options(args)
    total = sum(1 for _ in iter_corpus(args.input, text_field=args.field, keep_blank=True))  # row i = document i
    embedder = Embedder.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    try:
        dim = embedder._check_dim(args.dim)
    except ValueError as exc:
        raise QembedError(str(exc)) from None
    if args.instruction is not None or args.queries:
        fmt = {"query_format": args.instruction if args.instruction is not None else MODEL_DEFAULT}
    else:
        fmt = {"prompt": embedder.document_prompt}
    # one process: no cache (the output itself is what a rerun continues); Ray: actors fill the embedding cache
    # (a killed job resumes from it), then the vectors stream out of it in file order below
    cache = {"cache": NoCache()} if ray_options is None else {"cache_dir": args.cache_dir}
    encoder = CachedEncoder(embedder, dim=args.dim, normalize=embedder.normalize, batch_tokens=args.batch_tokens,
                            **cache, **fmt)  # fmt: skip
    if ray_options is not None:
        from qembed.ray_engine import fill_cache

        fill_cache(encoder, args.input, ray_options, text_field=args.field, keep_blank=True)
    run_id = {"input": str(Path(args.input).resolve()), "field": args.field, "fingerprint": embedder.fingerprint,
              "prefix": encoder.query_format.prefix, "dim": dim, "rows": total}  # fmt: skip
    state = state_path(output)
    done = 0
    if state.is_file() and output.is_file() and json.loads(state.read_text(encoding="utf-8")).get("run") == run_id:
        saved = json.loads(state.read_text(encoding="utf-8"))
        done = _complete_jsonl_rows(output) if output.suffix == ".jsonl" else (
            saved.get("done", 0) if output.suffix == ".npy" else 0)  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, {"run": run_id, "done": done})
    sink = _Sink(output, dim, total, done)
    pending: list = []

    def texts():
        for number, doc in enumerate(iter_corpus(args.input, text_field=args.field, keep_blank=True)):
            if number >= done:
                pending.append(doc)
                yield doc.text

    try:
        for _, vectors in encoder.iter_chunks(texts(), chunk_size=args.chunk_size, total=total - done, desc="embed"):
            docs = pending[: len(vectors)]
            del pending[: len(vectors)]
            sink.write(docs, vectors)
            if output.suffix == ".npy":
                atomic_write_json(state, {"run": run_id, "done": sink.rows})
    finally:
        sink.close()
    state.unlink()
    resumed = f" ({done} from an earlier, interrupted run)" if done else ""
    print(f"wrote {total} embeddings of dimension {dim} to {output}{resumed}")
    return 0
