"""`qembed adapt` with its default configuration on agri-zh (all-MiniLM-L6-v2): the quality target of the
recipe (test recall@5 >= 90) and its end-to-end time.

    python bench/bench_adapt.py [--output /tmp/qembed-bench-adapt] [--threads 2] [-- extra qembed adapt flags]

Runs the CLI as a subprocess, then prints the wall time, the CPU time of the run (user + system, which does
not depend on what else the machine runs), the time per stage and the test table of `OUTPUT/report.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "agri-zh"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="/tmp/qembed-bench-adapt")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads")
    parser.add_argument("extra", nargs="*", help="more qembed adapt flags (after --)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from qembed.testing import minilm_dir

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}  # fmt: skip
    command = [sys.executable, "-m", "qembed", "adapt", "--model", str(minilm_dir()), "--output", args.output,
               "--qa", str(DATA / "rice_dqa_zh.json"), "--qa", str(DATA / "corn_dqa_zh.json"),
               "--question-field", "instruction", "--answer-field", "output", "--no-progress", *args.extra]  # fmt: skip
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((Path(args.output) / "summary.json").read_text())
    choice = summary["recommendation"]
    print(f"wall time {wall / 60:.1f} min; CPU time {(usage.ru_utime + usage.ru_stime) / 60:.1f} min "
          f"({args.threads} thread(s)); load average at the end {os.getloadavg()}")  # fmt: skip
    for stage, s in summary["seconds"].items():
        print(f"  {stage:<10} wall {s['seconds']:8.1f} s   CPU {s['cpu_seconds']:8.1f} s")
    print(f"recommended: {choice['variant']}; test recall@5 {100 * choice['test']['recall@5']:.2f}, "
          f"nDCG@10 {100 * choice['test']['ndcg@10']:.2f}")  # fmt: skip
    report = (Path(args.output) / "report.md").read_text()
    print(report.split("## Test results", 1)[1].split("## Recommendation", 1)[0])


if __name__ == "__main__":
    main()
