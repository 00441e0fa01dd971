"""Helpers shared by the benchmark scripts: realistic text mixes, timing, machine facts."""

from __future__ import annotations

import json
import os
import platform
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def machine_line() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")  # fmt: skip


def realistic_texts(tokenizer, count: int = 27, shortest: int = 12, longest: int = 473) -> list[str]:
    """Real texts (NFCorpus queries/abstracts, Chinese agriculture QA) whose token lengths are spread evenly
    from `shortest` to `longest`: for each target length, the real text closest to it."""
    from qembed.data.corpus import iter_corpus

    pool: list[str] = []
    pool += [doc.text for doc in islice(iter_corpus(SHARED / "data/nfcorpus/queries.jsonl"), 400)]
    pool += [doc.text for doc in islice(iter_corpus(SHARED / "data/nfcorpus/corpus.jsonl"), 1500)]
    for name in ("rice_dqa_zh.json", "corn_dqa_zh.json"):
        for row in json.loads((SHARED / "data/agri-zh" / name).read_text(encoding="utf-8"))[:400]:
            pool += [row["instruction"], row["output"], row["input"].strip("（）")]
    lengths = [len(ids) for ids in tokenizer(pool, add_special_tokens=True)["input_ids"]]
    chosen, used = [], set()
    for step in range(count):
        target = shortest + (longest - shortest) * step / (count - 1)
        best = min((i for i in range(len(pool)) if i not in used), key=lambda i: abs(lengths[i] - target))
        used.add(best)
        chosen.append(pool[best])
    return chosen


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak_flops(size: int = 4096, repeats: int = 5) -> float:
    """The machine's fp32 matrix-product throughput (FLOP/s) on large square products."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    return 2 * size**3 / best_of(lambda: torch.mm(a, b), repeats)


def cpu_flags_line() -> str:
    """The CPU model and which of avx2 / avx512f / avx512_vnni / avx_vnni / avx512_bf16 / amx it reports."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return f"cpu: {model}; flags: " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)


def resident_bytes(pid: int | None = None) -> int:
    """A process's resident set (VmRSS; this process by default), 0 once it is gone."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0
