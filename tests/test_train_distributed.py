"""Two CPU processes on gloo: gathered-embedding loss and averaged gradients equal one process on the global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qembed.train import distributed
from qembed.train.contrastive import LossConfig, contrastive_backward

CFG = LossConfig(temperature=0.05, qq_dd=True, fn_margin=0.1, mrl_dims=[8])


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))


def _global_batch():
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(5, 12, generator=g)
    # records own 3, 2, 2, 1, 2 documents (first one each is the positive)
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 4, 4])
    docs = torch.randn(len(owner), 12, generator=g)
    pos_index = torch.tensor([0, 3, 5, 7, 8])
    same = torch.zeros(5, 10, dtype=torch.bool)
    same[0, 9] = True
    return queries, docs, owner, pos_index, same


def _shard(rank, world):
    queries, docs, owner, pos_index, same = _global_batch()
    start, end = distributed.shard_bounds(len(queries), world, rank)
    doc_rows = [j for j in range(len(owner)) if start <= owner[j] < end]
    return list(queries[start:end]), list(docs[doc_rows]), owner, pos_index, same


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for cached in (False, True):
        net = _net()
        queries, docs, owner, pos_index, same = _shard(rank, world)
        loss = contrastive_backward(
            lambda c, net=net: net(torch.stack(list(c))), queries, docs, pos_index, owner, CFG,
            same_text=same, chunk_size=2, cached=cached,
        )  # fmt: skip
        distributed.average_gradients(net.parameters())
        results[cached] = {"loss": loss, "grads": [p.grad for p in net.parameters()]}
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


def test_two_rank_gloo_equals_single_process(tmp_path):
    out_file = tmp_path / "rank0.pt"
    mp.start_processes(
        _worker,
        args=(2, str(tmp_path / "init"), str(out_file)),
        nprocs=2,
        start_method="spawn",
        join=True,
    )
    results = torch.load(out_file)

    net = _net()
    queries, docs, owner, pos_index, same = _global_batch()
    want = contrastive_backward(
        lambda c: net(torch.stack(list(c))), list(queries), list(docs), pos_index, owner, CFG, same_text=same
    )
    for cached in (False, True):  # plain and gradient-cached on two ranks
        got = results[cached]
        assert got["loss"] == pytest.approx(want, rel=1e-6)
        for g, p in zip(got["grads"], net.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)  # grads are O(1)


def test_shard_bounds_cover_everything_once():
    for n in range(1, 12):
        for parts in range(1, 5):
            spans = [distributed.shard_bounds(n, parts, i) for i in range(parts)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


# ---------------------------------------------------------------- the user's path: torchrun -m qembed train
ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["rice", "maize", "wheat", "soybean", "potato", "tomato", "cotton", "barley"]
ASPECTS = ["disease", "fertiliser", "irrigation"]


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> tuple[Path, Path]:
    """24 training records and a BEIR folder with a dev split (queries not among the training ones)."""
    from qembed.data.beir import write_beir

    root = tmp_path_factory.mktemp("ddp-data")
    records = [{"query": f"how to manage {t} {a}", "pos": [f"{a} guidance for {t} growers"],
                "neg": [f"{a} guidance for {TOPICS[(i + 1) % len(TOPICS)]} growers", f"{t} market prices"]}
               for i, t in enumerate(TOPICS) for a in ASPECTS]  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    corpus = {f"d{i}": {"text": f"pest guidance for {t} growers"} for i, t in enumerate(TOPICS)}
    queries = {f"q{i}": f"{t} pests" for i, t in enumerate(TOPICS)}
    write_beir(root / "beir", corpus, queries, {"dev": {f"q{i}": {f"d{i}": 1} for i in range(len(TOPICS))}})
    return root / "train.jsonl", root / "beir"


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = str(torchrun) if torchrun.exists() else shutil.which("torchrun")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    cmd = [launcher, "--standalone", "--nproc_per_node", "2", "-m", "qembed", "train", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _log(out: Path) -> tuple[list[float], list[dict]]:
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))  # each step logged once (rank 0)
    return [r["loss"] for r in steps], [r for r in lines if "eval" in r]


def _copy_first_checkpoint(src: Path, dst: Path) -> None:
    """`dst` as `src` was after its first checkpoint (the log's later lines are dropped on resuming)."""
    first = sorted((src / "checkpoints").glob("step-*"))[0]
    shutil.copytree(first, dst / "checkpoints" / first.name)
    for name in ("train_config.json", "train_log.jsonl"):
        shutil.copy(src / name, dst / name)


@pytest.mark.parametrize("what", ["embedder", "reranker"])
def test_torchrun_two_ranks_match_one_process_and_resume(what, ddp_data, tiny_embedder_path, tiny_reranker_path,
                                                         tmp_path, one_torch_thread):  # fmt: skip
    from qembed import Embedder, Reranker
    from qembed.cli import main

    data, beir = ddp_data
    model = tiny_embedder_path if what == "embedder" else tiny_reranker_path
    # 24 records, global batch 6: 4 steps, a checkpoint after step 2; LoRA without dropout is deterministic
    args = [what, "--model", str(model), "--data", str(data), "--batch-size", "6", "--lr", "1e-3", "--lora",
            "--lora-r", "4", "--lora-dropout", "0", "--save-steps", "2", "--num-negatives", "1", "--max-length",
            "128", "--eval-dataset", str(beir), "--seed", "5"]  # fmt: skip
    ddp = tmp_path / "ddp"
    proc = _torchrun([*args, "--output", str(ddp)], tmp_path)
    assert proc.stdout.count("trained 4 steps") == 1  # rank 0 reports and exports
    assert (ddp / "model.safetensors").is_file() and not list(tmp_path.glob("*.safetensors"))
    ddp_losses, ddp_evals = _log(ddp)
    assert len(ddp_losses) == 4 and [(e["step"], e["split"]) for e in ddp_evals] == [(4, "dev")]

    single = tmp_path / "single"
    assert main(["train", *args, "--output", str(single)]) == 0
    single_losses, _ = _log(single)
    np.testing.assert_allclose(ddp_losses, single_losses, rtol=1e-3)
    if what == "embedder":
        texts = ["rice pests", "pest guidance for maize growers"]
        a, b = (Embedder.from_pretrained(p, device="cpu").encode(texts) for p in (ddp, single))
        np.testing.assert_allclose(a, b, atol=1e-3)
    else:
        a, b = (Reranker.from_pretrained(p, device="cpu").score("rice pests", ["rice guidance"]) for p in (ddp, single))
        np.testing.assert_allclose(a, b, atol=1e-3)

    # the two-rank checkpoint resumes (under torchrun for the embedder, in one process for the reranker)
    resumed = tmp_path / "resumed"
    _copy_first_checkpoint(ddp, resumed)
    if what == "embedder":
        _torchrun([*args, "--output", str(resumed), "--resume"], tmp_path)
    else:
        assert main(["train", *args, "--output", str(resumed), "--resume"]) == 0
    resumed_losses, resumed_evals = _log(resumed)
    assert len(resumed_losses) == 4 and [e["step"] for e in resumed_evals] == [4]
    np.testing.assert_allclose(resumed_losses, ddp_losses, rtol=1e-3)
