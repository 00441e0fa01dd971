"""Two CPU processes on gloo: gathered-embedding loss and averaged gradients equal one process on the global batch."""

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
