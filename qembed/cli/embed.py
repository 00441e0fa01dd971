"""`qembed embed`: texts from a file -> embeddings in `.npy` or `.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qembed.data.texts import read_texts
from qembed.errors import QembedError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("embed", help="embed texts from a .txt or .jsonl file")
    p.add_argument("--model", required=True, help="local folder or hub id")
    p.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl")
    p.add_argument("--field", default="text", help="text field of .jsonl records (default: text)")
    p.add_argument("--query", action="store_true", help="embed as queries (with the model's query instruction)")
    p.add_argument("--instruction", help="query instruction (implies --query)")
    p.add_argument("--dim", type=int, help="Matryoshka dimension (first N components, re-normalised)")
    p.add_argument("--output", required=True, help="FILE.npy or FILE.jsonl")
    p.add_argument("--device")
    p.add_argument("--dtype", help="fp32 | fp16 | bf16")
    p.add_argument("--quantize", choices=["int8"], help="int8 Linear layers on the CPU (faster, approximate)")
    p.set_defaults(func=run)


def run(args) -> int:
    from qembed.models.embedder import Embedder

    output = Path(args.output)
    if output.suffix not in (".npy", ".jsonl"):
        raise QembedError(f"--output must end in .npy or .jsonl, got {output.name}")
    texts = read_texts(args.input, field=args.field)
    embedder = Embedder.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    try:
        embedder._check_dim(args.dim)
    except ValueError as exc:
        raise QembedError(str(exc)) from None
    if args.instruction is not None:
        vectors = embedder.encode_queries(texts, instruction=args.instruction, dim=args.dim)
    elif args.query:
        vectors = embedder.encode_queries(texts, dim=args.dim)
    else:
        vectors = embedder.encode_documents(texts, dim=args.dim)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".npy":
        np.save(output, vectors)
    else:
        with output.open("w", encoding="utf-8") as f:
            for index, (text, vector) in enumerate(zip(texts, vectors)):
                f.write(json.dumps({"index": index, "text": text, "embedding": vector.tolist()}, ensure_ascii=False) + "\n")
    print(f"wrote {len(texts)} embeddings of dimension {vectors.shape[1]} to {output}")
    return 0
