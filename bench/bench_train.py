"""Real-effect training benchmark: fine-tune all-MiniLM-L6-v2 on the agri-zh train questions and compare, on the
disjoint test questions, `qembed train embedder` (mined hard negatives + Qwen3 loss options) with a
sentence-transformers MultipleNegativesRankingLoss run on the same data, epochs and batch size.

    python bench/bench_train.py [--work /tmp/qembed-bench-train] [--epochs 1] [--batch-size 32]

Phases run as subprocesses (so each one's peak memory is its own): prepare (qa-to-beir + mining with the base
model), eval of the base model, the ST run, the qembed run, and a GradCache memory check (one step at
effective batch 512, plain vs chunked). Prints figures and writes WORK/results.json.

The ST baseline uses `SentenceTransformer` and `losses.MultipleNegativesRankingLoss` (scale 20, in-batch
negatives, (query, positive) pairs) in a plain loop with SentenceTransformerTrainer's defaults (AdamW, lr 5e-5,
no weight decay, linear decay, no warm-up, clipping at 1.0): `datasets`, which the Trainer needs, is not a
dependency of this project.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "agri-zh"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def evaluate(model_dir: str, work: Path) -> dict:
    from qembed import Embedder
    from qembed.data.beir import RetrievalDataset
    from qembed.train.embedder import evaluate_embedder

    emb = Embedder.from_pretrained(model_dir, device="cpu")
    metrics = evaluate_embedder(emb, RetrievalDataset.load(work / "agri", split="test"), ks=(5, 10))
    return {"recall@5": metrics["recall@5"], "ndcg@10": metrics["ndcg@10"]}


def phase_prepare(args, work: Path) -> None:
    from qembed.data.qa_to_beir import qa_to_beir
    from qembed.mine import mine_hard_negatives
    from qembed.testing import minilm_dir

    qa_to_beir([DATA / "rice_dqa_zh.json", DATA / "corn_dqa_zh.json"], work / "agri",
               question_field="instruction", answer_field="output")  # fmt: skip
    started = time.perf_counter()
    mine_hard_negatives(
        str(minilm_dir()),
        work / "agri",
        work / "mined.jsonl",
        split="train",
        num_negatives=5,  # as in the recorded run (the default is now 3)
        overwrite=True,
        cache_dir=work / "cache",
        show_progress=False,
    )
    emit({"phase": "prepare", "mining_s": time.perf_counter() - started})


def phase_eval_base(args, work: Path) -> None:
    from qembed.testing import minilm_dir

    emit({"phase": "base", **evaluate(str(minilm_dir()), work)})


def phase_st(args, work: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer, losses
    from transformers import get_linear_schedule_with_warmup

    from qembed.testing import minilm_dir

    torch.manual_seed(args.seed)
    records = [json.loads(line) for line in (work / "mined.jsonl").read_text().splitlines()]
    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    model.max_seq_length = args.max_length
    loss_fn = losses.MultipleNegativesRankingLoss(model)
    steps_per_epoch = (len(records) + args.batch_size - 1) // args.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps_per_epoch * args.epochs)
    model.train()
    rng = random.Random(args.seed)
    tokens = samples = 0
    started = time.perf_counter()
    for _ in range(args.epochs):
        order = list(range(len(records)))
        rng.shuffle(order)
        for start in range(0, len(order), args.batch_size):
            batch = [records[i] for i in order[start : start + args.batch_size]]
            features = [
                model.tokenize([r["query"] for r in batch]),
                model.tokenize([r["pos"][0] for r in batch]),
            ]
            tokens += sum(int(f["attention_mask"].sum()) for f in features)
            samples += len(batch)
            loss = loss_fn(features, None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    elapsed = time.perf_counter() - started
    model.save(str(work / "st-model"))
    emit({"phase": "st", "train_s": elapsed, "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
          "peak_rss_mb": peak_rss_mb(), **evaluate(str(work / "st-model"), work)})  # fmt: skip


def phase_qembed(args, work: Path) -> None:
    import shutil

    from qembed.testing import minilm_dir
    from qembed.train.embedder import train_embedder
    from qembed.train.loop import TrainConfig

    out = work / "qembed-model"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(model=str(minilm_dir()), data=[str(work / "mined.jsonl")], output=str(out), epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, num_negatives=args.num_negatives, seed=args.seed,
                      max_length=args.max_length, save_steps=0, progress=False)  # fmt: skip
    started = time.perf_counter()
    train_embedder(cfg)
    elapsed = time.perf_counter() - started
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    emit({"phase": "qembed", "train_s": elapsed, "num_negatives": args.num_negatives,
          "samples_per_s": sum(r["samples_per_s"] for r in steps) / len(steps),
          "tokens_per_s": sum(r["tokens_per_s"] for r in steps) / len(steps),
          "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
          "peak_rss_mb": peak_rss_mb(), **evaluate(str(out), work)})  # fmt: skip


def phase_memory(args, work: Path) -> None:
    """One optimizer step at batch 512 (no hard negatives), plain or GradCache with chunks of 32."""
    import tempfile

    from qembed.testing import minilm_dir
    from qembed.train.embedder import train_embedder
    from qembed.train.loop import TrainConfig

    records = [json.loads(line) for line in (work / "mined.jsonl").read_text().splitlines()][:512]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        cfg = TrainConfig(model=str(minilm_dir()), data=[str(data)], output=str(Path(tmp) / "out"), batch_size=512,
                          num_negatives=0, max_length=args.memory_max_length, save_steps=0, progress=False,
                          grad_cache_chunk=32 if args.cached else None)  # fmt: skip
        before = peak_rss_mb()
        started = time.perf_counter()
        train_embedder(cfg)
        emit({"phase": "memory", "cached": args.cached, "step_s": time.perf_counter() - started,
              "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()})  # fmt: skip


def phase_qwen3(args, work: Path) -> None:
    """Throughput and peak GPU memory of LoRA training on a random-weight Qwen3-Embedding-0.6B architecture
    (bf16 autocast), plain and with GradCache; meant for a GPU machine (`--only qwen3`)."""
    import tempfile

    import torch

    from qembed.testing import QWEN3_EMBEDDING_0_6B, build_qwen3_embedding
    from qembed.train.embedder import train_embedder
    from qembed.train.loop import TrainConfig

    if not (work / "agri").is_dir():
        from qembed.data.qa_to_beir import qa_to_beir

        qa_to_beir([DATA / "rice_dqa_zh.json", DATA / "corn_dqa_zh.json"], work / "agri",
                   question_field="instruction", answer_field="output")  # fmt: skip
    from qembed.data.beir import RetrievalDataset

    train = RetrievalDataset.load(work / "agri", split="train")
    records = [{"query": train.queries[q], "pos": [train.doc_text(d) for d in judged]}
               for q, judged in list(train.qrels.items())[: args.qwen3_steps * args.batch_size]]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model = build_qwen3_embedding(Path(tmp) / "qwen3-0.6b", **QWEN3_EMBEDDING_0_6B)
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        for chunk in (None, 16):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            out = Path(tmp) / f"out-{chunk}"
            cfg = TrainConfig(model=str(model), data=[str(data)], output=str(out), batch_size=args.batch_size,
                              lora=True, max_length=args.max_length, save_steps=0, progress=False,
                              grad_cache_chunk=chunk, precision="bf16")  # fmt: skip
            train_embedder(cfg)
            log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()][1:]
            emit({"phase": "qwen3", "grad_cache_chunk": chunk, "batch_size": args.batch_size,
                  "samples_per_s": sum(r["samples_per_s"] for r in log) / max(1, len(log)),
                  "tokens_per_s": sum(r["tokens_per_s"] for r in log) / max(1, len(log)),
                  "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                  "peak_rss_mb": peak_rss_mb()})  # fmt: skip


PHASES = {"prepare": phase_prepare, "base": phase_eval_base, "st": phase_st, "qembed": phase_qembed,
          "memory": phase_memory, "qwen3": phase_qwen3}  # fmt: skip


def start_phase(name: str, args, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--phase", name, "--work", str(args.work), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--num-negatives", str(args.num_negatives),
           "--seed", str(args.seed), "--memory-max-length", str(args.memory_max_length),
           "--max-length", str(args.max_length), "--threads", str(args.threads),
           "--qwen3-steps", str(args.qwen3_steps), *extra]  # fmt: skip
    print(f"== {name} {' '.join(extra)}", flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(name: str, proc: subprocess.Popen) -> list[dict]:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        print(stdout[-3000:], stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"phase {name} failed")
    results = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    for r in results:
        print(json.dumps(r), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/qembed-bench-train"))
    parser.add_argument("--phase", choices=list(PHASES), default=None, help="run one phase (internal)")
    parser.add_argument(
        "--only", default="prepare,base,st,qembed,memory", help="phases to run, comma-separated"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--num-negatives", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=128, help="token limit per text while training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per phase")
    parser.add_argument("--memory-max-length", type=int, default=32)
    parser.add_argument("--cached", action="store_true", help="(memory phase) use GradCache")
    parser.add_argument("--qwen3-steps", type=int, default=20, help="(qwen3 phase) training steps")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase:
        import torch

        torch.set_num_threads(args.threads)
        PHASES[args.phase](args, args.work)
        return
    # st and qembed train side by side (one process each), the other phases one at a time
    results, phases = [], args.only.split(",")
    for name in ("prepare", "base"):
        if name in phases:
            results += collect(name, start_phase(name, args))
    running = [(name, start_phase(name, args)) for name in ("st", "qembed") if name in phases]
    for name, proc in running:
        results += collect(name, proc)
    if "memory" in phases:
        results += collect("memory", start_phase("memory", args))
        results += collect("memory", start_phase("memory", args, ["--cached"]))
    if "qwen3" in phases:
        results += collect("qwen3", start_phase("qwen3", args))
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
