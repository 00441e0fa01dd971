"""Memory an int8 OpenVINO model keeps per input shape: run one shape after another (each twice) and read
glibc's bytes in use (`mallinfo2`) and the resident set before and after each run.

The shapes are those a corpus meets: for every width of the ladder, the rows a chunk's last batch is padded
to (`steady_rows`), then two full batches of the model family's token budget. A second run of a shape should
add nothing; a new shape adds what OpenVINO keeps for it (docs/scale.md).

    python bench/bench_shape_memory.py --model-dir /tmp/qembed-bench-qwen3-0.6b-st   # built by bench_embed.py
    python bench/bench_shape_memory.py [--precision bf16]                             # all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags_line, resident_bytes  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def malloc_in_use() -> float:
    """MiB glibc has handed out (arena blocks in use plus mapped blocks)."""
    info = _LIBC.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def resident() -> float:
    """MiB resident (VmRSS)."""
    return resident_bytes() / 2**20


def main() -> None:
    from qembed import Embedder
    from qembed.models.batching import bucket_up, full_rows, steady_rows
    from qembed.testing import minilm_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=None, help="an embedding model folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--max-width", type=int, default=256)
    parser.add_argument("--precision", choices=("f32", "bf16"), default="f32",
                        help="OpenVINO's precision for the operations outside int8 (qembed runs f32)")
    args = parser.parse_args()
    print(cpu_flags_line())
    embedder = Embedder.from_pretrained(args.model_dir or str(minilm_dir()), quantize="int8")
    if args.precision != "f32":  # the kept model, compiled again as OpenVINO's default would on a bf16 CPU
        import openvino as ov
        import torch

        from qembed.models.openvino import openvino_cache_dir

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                  "INFERENCE_PRECISION_HINT": args.precision}  # fmt: skip
        model_xml = openvino_cache_dir() / embedder.inference_model.key / "model.xml"
        embedder.inference_model.compiled = ov.Core().compile_model(model_xml, "CPU", config)
    print(f"precision {args.precision}")
    print(f"loaded: resident {resident():.0f} MiB, malloc in use {malloc_in_use():.0f} MiB", flush=True)
    budget, least = embedder.batching.batch_tokens, embedder.batching.min_batch_tokens
    widths = sorted({bucket_up(n) for n in range(8, args.max_width + 1)})
    shapes = [(steady_rows(width, budget, least), width) for width in widths]
    shapes += [(full_rows(width, budget), width) for width in (64, args.max_width)]
    model = embedder.inference_model
    for rows, width in shapes:
        batch = embedder.collate([[100 + i % 50 for i in range(width)]] * rows)
        before = malloc_in_use(), resident()
        runs = []
        for _ in range(2):
            start = time.perf_counter()
            model(**batch)
            runs.append((time.perf_counter() - start, malloc_in_use(), resident()))
        (first, m1, r1), (again, m2, r2) = runs
        print(f"({rows:4d}, {width:4d}) {rows * width:6d} tokens: first run +{m1 - before[0]:7.1f} MiB malloc, "
              f"+{r1 - before[1]:7.1f} MiB resident ({first:.2f} s); again +{m2 - m1:.1f} / +{r2 - r1:.1f} "
              f"({again:.2f} s)", flush=True)  # fmt: skip
    print(f"end: resident {resident():.0f} MiB, malloc in use {malloc_in_use():.0f} MiB")


if __name__ == "__main__":
    main()
