import pytest
import torch

from qembed.train.contrastive import LossConfig, contrastive_backward
from qembed.train.gradcache import encode_and_backward

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(32, 16)
    ).train()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    queries = list(torch.randn(6, 12, generator=g))
    docs = list(torch.randn(14, 12, generator=g))
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5])
    pos_index = torch.tensor([0, 3, 5, 7, 10, 12])
    same = torch.zeros(6, 14, dtype=torch.bool)
    same[1, 8] = True
    return queries, docs, owner, pos_index, same


def _run(cached, chunk_size, cfg, dropout=0.1):
    net = _net(dropout=dropout)
    queries, docs, owner, pos_index, same = _batch()
    torch.manual_seed(123)  # dropout stream
    loss = contrastive_backward(
        lambda chunk: net(torch.stack(list(chunk))),
        queries,
        docs,
        pos_index,
        owner,
        cfg,
        same_text=same,
        chunk_size=chunk_size,
        cached=cached,
    )
    return loss, {n: p.grad.clone() for n, p in net.named_parameters()}, torch.rand(1)


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(temperature=0.05, qq_dd=False, fn_margin=None),
        LossConfig(temperature=0.05, qq_dd=True, fn_margin=0.1, mrl_dims=[4, 8]),
    ],
)
def test_gradcache_equals_plain_loss_and_gradients_with_dropout(cfg):
    loss_plain, grads_plain, rng_plain = _run(False, 4, cfg)
    loss_cached, grads_cached, rng_cached = _run(True, 4, cfg)
    assert loss_cached == pytest.approx(loss_plain, rel=1e-6)
    for name in grads_plain:
        torch.testing.assert_close(grads_cached[name], grads_plain[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(rng_plain, rng_cached)  # RNG stream continues as without caching
    # chunking itself does not change the result without dropout
    loss_whole, grads_whole, _ = _run(False, None, cfg, dropout=0.0)
    loss_small, grads_small, _ = _run(True, 3, cfg, dropout=0.0)
    assert loss_small == pytest.approx(loss_whole, rel=1e-6)
    for name in grads_whole:
        torch.testing.assert_close(grads_small[name], grads_whole[name], rtol=1e-5, atol=1e-6)


def test_gradcache_without_rng_restore_would_differ():
    """Guard that the dropout check above is meaningful: different masks give different gradients."""
    cfg = LossConfig(temperature=0.05)
    _, g1, _ = _run(False, 4, cfg)
    net = _net()
    queries, docs, owner, pos_index, same = _batch()
    torch.manual_seed(999)
    contrastive_backward(
        lambda c: net(torch.stack(list(c))), queries, docs, pos_index, owner, cfg, chunk_size=4
    )
    assert not torch.allclose(net[0].weight.grad, g1["0.weight"])


def test_encode_and_backward_generic_groups():
    net = _net(dropout=0.0)
    x = torch.randn(10, 12)
    loss = encode_and_backward(lambda c: net(c), [[x[:5], x[5:]]], lambda r: (r**2).sum(), cached=True)
    g = net[0].weight.grad.clone()
    net.zero_grad()
    want = (net(x) ** 2).sum()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(g, net[0].weight.grad, rtol=1e-5, atol=1e-6)


def test_gradcache_on_tiny_qwen3_through_forward_features(tiny_embedder_path):
    from qembed import Embedder

    queries = ["what is rice blast", "maize planting depth", "fertiliser for wheat", "水稻病害"]
    docs = [
        "Rice blast is a fungal disease.",
        "Plant maize 5 cm deep.",
        "Use nitrogen fertiliser.",
        "稻瘟病是真菌病害。",
        "Unrelated text about cars.",
        "Another distractor",
    ]
    owner = torch.tensor([0, 1, 2, 3, 0, 2])
    pos_index = torch.tensor([0, 1, 2, 3])
    cfg = LossConfig(temperature=0.01, qq_dd=True, fn_margin=0.1)
    results = []
    for cached in (False, True):
        emb = Embedder.from_pretrained(tiny_embedder_path, device="cpu")
        emb.model.train()
        q_ids = emb.prepare(queries, instruction=emb.default_instruction)
        d_ids = emb.prepare(docs)
        torch.manual_seed(0)
        loss = contrastive_backward(
            lambda c, emb=emb: emb.forward_features(emb.collate(c)),
            q_ids,
            d_ids,
            pos_index,
            owner,
            cfg,
            chunk_size=2,
            cached=cached,
        )
        grads = {n: p.grad.clone() for n, p in emb.model.named_parameters() if p.grad is not None}
        results.append((loss, grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 5
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)
