"""`qembed embed`: texts from a file -> embeddings in `.npy` or `.jsonl`."""

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


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("embed", help="embed texts from a .txt or .jsonl file")
    add_model_args(p, help="embedding model: local folder or hub id")
    p.add_argument("--input", required=True, help=".txt (one text per line), .jsonl or a BEIR folder")
    p.add_argument("--field", default="text", help="text field of .jsonl records (default: text)")
    p.add_argument("--queries", action="store_true", help="the texts are queries: embed them with the model's query instruction")
    p.add_argument("--instruction", help="query instruction (implies --queries; default: the model's own)")
    p.add_argument("--dim", type=int, help="Matryoshka dimension, first N components re-normalised (default: full)")
    add_output_args(p, help="FILE.npy or FILE.jsonl (overwritten)")
    add_progress_args(p)
    add_quantize_arg(p)
    add_engine_args(p)
    p.add_argument("--cache-dir", metavar="DIR", help="embedding cache of --engine ray, which a rerun resumes from "
                   "(default: $QEMBED_CACHE or ~/.cache/qembed/embeddings)")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.models.embedder import Embedder

    output = Path(args.output)
    if output.suffix not in (".npy", ".jsonl"):
        raise QembedError(f"--output must end in .npy or .jsonl, got {output.name}")
    check_output(output, input=args.input)
    ray_options = engine_options(args)
    docs = list(iter_corpus(args.input, text_field=args.field, keep_blank=True))  # row i = document i
    texts = [doc.text for doc in docs]
    embedder = Embedder.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    try:
        embedder._check_dim(args.dim)
    except ValueError as exc:
        raise QembedError(str(exc)) from None
    options = {"dim": args.dim, "batch_tokens": args.batch_tokens}
    if ray_options is not None:
        vectors = _encode_on_ray(embedder, args, texts, ray_options)
    elif args.instruction is not None:
        vectors = embedder.encode_queries(texts, instruction=args.instruction, **options)
    elif args.queries:
        vectors = embedder.encode_queries(texts, **options)
    else:
        vectors = embedder.encode_documents(texts, **options)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".npy":
        np.save(output, vectors)
    else:
        with output.open("w", encoding="utf-8") as f:
            for index, (doc, vector) in enumerate(zip(docs, vectors)):
                record = {"index": index, "id": doc.doc_id, "text": doc.text, "embedding": vector.tolist()}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(texts)} embeddings of dimension {vectors.shape[1]} to {output}")
    return 0


def _encode_on_ray(embedder, args, texts: list[str], options) -> np.ndarray:
    """The vectors `Embedder.encode` gives, encoded on Ray into the embedding cache (so a killed run resumes),
    then read back in file order."""
    from qembed.eval.cache import CachedEncoder
    from qembed.models.prompts import MODEL_DEFAULT
    from qembed.ray_engine import fill_cache

    queries = args.queries or args.instruction is not None
    fmt = (args.instruction if args.instruction is not None else MODEL_DEFAULT) if queries else None
    encoder = CachedEncoder(embedder, query_format=fmt, prompt="" if queries else embedder.document_prompt,
                            dim=args.dim, normalize=embedder.normalize, cache_dir=args.cache_dir,
                            batch_tokens=args.batch_tokens)  # fmt: skip
    fill_cache(encoder, args.input, options, text_field=args.field, keep_blank=True)
    return encoder(texts)
