import math

import pytest
import torch

from qembed.train.losses import info_nce, matryoshka_info_nce


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_two_orthogonal_pairs_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    docs = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # norms must not matter: cosine similarity
    loss = info_nce(q, docs, torch.tensor([0, 1]), torch.tensor([0, 1]), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_hard_negative_and_temperature_by_hand():
    # one query: positive at 0°, its hard negative at 60° (cos .5), another record's positive at 90° (cos 0)
    q = torch.tensor([_unit(0), _unit(90)])
    docs = torch.tensor([_unit(0), _unit(60), _unit(90)])
    pos, owner = torch.tensor([0, 2]), torch.tensor([0, 0, 1])
    tau = 0.5
    loss = info_nce(q, docs, pos, owner, temperature=tau)
    e = math.exp
    l0 = -math.log(e(1 / tau) / (e(1 / tau) + e(0.5 / tau) + e(0 / tau)))
    # query 1 (at 90°): positive cos 1, doc 0 cos 0, doc 1 (60°) cos sin60
    c = math.cos(math.radians(30))
    l1 = -math.log(e(1 / tau) / (e(1 / tau) + e(0) + e(c / tau)))
    assert loss.item() == pytest.approx((l0 + l1) / 2, abs=1e-5)


def test_false_negative_margin_drops_only_too_similar_candidates():
    # query 0 at 0°, its positive at 40° (cos .766); another record's doc at 10° (cos .985 > .766 + .1): dropped;
    # a doc at 35° (cos .819 < .866): kept
    q = torch.tensor([_unit(0), _unit(180)])
    docs = torch.tensor([_unit(40), _unit(10), _unit(35), _unit(180)])
    pos, owner = torch.tensor([0, 3]), torch.tensor([0, 1, 1, 1])
    tau = 0.1
    masked = info_nce(q, docs, pos, owner, temperature=tau, fn_margin=0.1)
    e, cos = math.exp, lambda a: math.cos(math.radians(a))
    l0 = -math.log(e(cos(40) / tau) / (e(cos(40) / tau) + e(cos(35) / tau)))
    # query 1 at 180°: positive cos 1; others cos(140), cos(170), cos(145), none above 1.1
    l1 = -math.log(e(1 / tau) / (e(1 / tau) + e(cos(140) / tau) + e(cos(170) / tau) + e(cos(145) / tau)))
    assert masked.item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    unmasked = info_nce(q, docs, pos, owner, temperature=tau)
    assert unmasked.item() > masked.item() + 0.5


def test_same_text_mask_and_positive_never_masked():
    q = torch.tensor([_unit(0), _unit(90)])
    docs = torch.tensor([_unit(20), _unit(90)])
    pos, owner = torch.tensor([0, 1]), torch.tensor([0, 1])
    same = torch.tensor([[True, True], [False, True]])  # own positive flagged too: must be ignored
    tau = 1.0
    loss = info_nce(q, docs, pos, owner, temperature=tau, same_text=same)
    e, cos = math.exp, lambda a: math.cos(math.radians(a))
    l0 = 0.0  # only the positive remains in Z
    l1 = -math.log(e(1) / (e(1) + e(cos(70))))
    assert loss.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)


def test_qq_dd_terms_by_hand():
    # queries at 0° and 90°, positives at 30° and 100°, no hard negatives
    q = torch.tensor([_unit(0), _unit(90)])
    docs = torch.tensor([_unit(30), _unit(100)])
    pos, owner = torch.tensor([0, 1]), torch.tensor([0, 1])
    tau = 0.5
    e, cos = math.exp, lambda a: math.cos(math.radians(a))
    t = lambda deg: e(cos(deg) / tau)  # noqa: E731
    # query 0: pos 30°, q-d to doc1 100°, q-q 90°, d-d between positives 70°
    l0 = -math.log(t(30) / (t(30) + t(100) + t(90) + t(70)))
    # query 1: pos 10°, q-d to doc0 60°, q-q 90°, d-d 70°
    l1 = -math.log(t(10) / (t(10) + t(60) + t(90) + t(70)))
    loss = info_nce(q, docs, pos, owner, temperature=tau, qq_dd=True)
    assert loss.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    # with margin 0.1: for query 1 s_pos = cos10 = .985; nothing exceeds 1.085. For query 0, s_pos = cos30 = .866:
    # the d-d term cos70 = .342 is kept; q-q cos90 = 0 kept -> same value
    assert info_nce(q, docs, pos, owner, temperature=tau, qq_dd=True, fn_margin=0.1).item() == pytest.approx(
        loss.item(), abs=1e-6
    )
    # margin 0: for query 0 nothing exceeds s_pos = .866; a negative margin has no meaning and is refused
    assert info_nce(q, docs, pos, owner, temperature=tau, qq_dd=True, fn_margin=0.0).item() == pytest.approx(
        loss.item(), abs=1e-6
    )
    with pytest.raises(ValueError, match="None turns the mask off"):
        info_nce(q, docs, pos, owner, temperature=tau, qq_dd=True, fn_margin=-0.9)


def _reference(q, docs, pos, owner, tau, qq_dd, margin, same):
    """Straightforward per-query loops over the formula in the docstring."""
    qn = torch.nn.functional.normalize(q, dim=-1)
    dn = torch.nn.functional.normalize(docs, dim=-1)
    total = 0.0
    for i in range(len(q)):
        sp = float(qn[i] @ dn[pos[i]])
        z = math.exp(sp / tau)

        def add(s, masked_text=False, sp=sp):
            if masked_text or (margin is not None and s > sp + margin):
                return 0.0
            return math.exp(s / tau)

        for j in range(len(docs)):
            if j != pos[i]:
                z += add(float(qn[i] @ dn[j]), bool(same[i, j]) if same is not None else False)
        if qq_dd:
            for k in range(len(q)):
                if k != i:
                    z += add(float(qn[i] @ qn[k]))
            for j in range(len(docs)):
                if owner[j] != i:
                    z += add(float(dn[pos[i]] @ dn[j]), bool(same[i, j]) if same is not None else False)
        total += -math.log(math.exp(sp / tau) / z)
    return total / len(q)


@pytest.mark.parametrize("qq_dd", [False, True])
@pytest.mark.parametrize("margin", [None, 0.1, 0.0])
def test_matches_loop_reference_on_random_batch(qq_dd, margin):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, generator=g, dtype=torch.float64)
    docs = torch.randn(10, 8, generator=g, dtype=torch.float64)
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    pos = torch.tensor([0, 3, 5, 8])
    same = torch.rand(4, 10, generator=g) > 0.8
    got = info_nce(q, docs, pos, owner, temperature=0.3, qq_dd=qq_dd, fn_margin=margin, same_text=same)
    want = _reference(q.float(), docs.float(), pos.tolist(), owner.tolist(), 0.3, qq_dd, margin, same)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_matryoshka_is_weighted_mean_of_truncated_losses():
    g = torch.Generator().manual_seed(1)
    q, docs = torch.randn(3, 16, generator=g), torch.randn(6, 16, generator=g)
    pos, owner = torch.tensor([0, 2, 4]), torch.tensor([0, 0, 1, 1, 2, 2])
    parts = [info_nce(q[:, :d], docs[:, :d], pos, owner, temperature=0.1).item() for d in (4, 8, 16)]
    got = matryoshka_info_nce(q, docs, pos, owner, dims=[4, 8, 16], weights=[1, 1, 2], temperature=0.1)
    assert got.item() == pytest.approx((parts[0] + parts[1] + 2 * parts[2]) / 4, rel=1e-6)
    assert parts[0] != pytest.approx(parts[2])
    with pytest.raises(ValueError):
        matryoshka_info_nce(q, docs, pos, owner, dims=[4], weights=[1, 2])


def test_gradient_flows_to_queries_and_documents():
    q = torch.randn(3, 5, requires_grad=True)
    docs = torch.randn(6, 5, requires_grad=True)
    loss = info_nce(
        q, docs, torch.tensor([0, 2, 4]), torch.tensor([0, 0, 1, 1, 2, 2]), qq_dd=True, fn_margin=0.1
    )
    loss.backward()
    assert q.grad.abs().sum() > 0 and docs.grad.abs().sum() > 0
