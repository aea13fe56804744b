"""Margin losses against an explicit per-sample float64 loop (math.acos, math.cos, log-sum-exp by hand) and against
pytorch-metric-learning where the definitions coincide; margin schedules against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from guie.losses import ArcFaceLoss, MarginSchedule, create_loss, dynamic_margins

D, C, B = 5, 4, 7


def naive_loss(kind: str, emb: torch.Tensor, weight: torch.Tensor, labels, margins, scale: float, k: int) -> float:
    """Mean margin loss, one sample and one class at a time, in Python floats (float64).

    cos_c = max over the class's k sub-centres (rows c*k .. c*k+k-1 of weight) of the cosine similarity;
    own class y: ArcFace cos(acos(cos_y) + m) while theta + m <= pi, else cos_y - m sin m; CosFace cos_y - m.
    """
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    W = [unit(row) for row in weight.double().tolist()]
    total = 0.0
    for e, y in zip(emb.double().tolist(), labels.tolist()):
        e = unit(e)
        logits = []
        for c in range(len(W) // k):
            cos = max(sum(a * b for a, b in zip(e, W[c * k + j])) for j in range(k))
            if c == y:
                m = float(margins[c])
                if kind == "cosface":
                    cos = cos - m
                else:
                    theta = math.acos(cos)
                    cos = math.cos(theta + m) if theta + m <= math.pi else cos - m * math.sin(m)
            logits.append(scale * cos)
        top = max(logits)
        total += top + math.log(sum(math.exp(z - top) for z in logits)) - logits[y]
    return total / len(labels)


def make_batch(seed: int = 0, dtype=torch.float64, n: int = B, c: int = C):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, D, generator=g, dtype=dtype) * 3  # not normalised: the loss must normalise
    labels = torch.randint(0, c, (n,), generator=g)
    return emb, labels


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize("k", [1, 3])
def test_matches_naive_loop_float64(kind, k):
    torch.manual_seed(1)
    loss = create_loss(kind, D, C, scale=30.0, margin=0.5, sub_centers=k)
    emb, labels = make_batch()
    got = loss(emb, labels)
    assert got.dtype == torch.float64
    want = naive_loss(kind, emb, loss.weight.detach(), labels, loss.margins.tolist(), 30.0, k)
    assert got.item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_float32_close_to_float64_loop(kind):
    torch.manual_seed(2)
    loss = create_loss(kind, D, C, scale=64.0, margin=0.3, sub_centers=2)
    emb, labels = make_batch(3, dtype=torch.float32)
    want = naive_loss(kind, emb, loss.weight.detach(), labels, loss.margins.tolist(), 64.0, 2)
    assert loss(emb, labels).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize("k", [1, 3])
def test_per_class_margins_match_naive_loop(kind, k):
    torch.manual_seed(4)
    loss = create_loss(kind, D, C, scale=30.0, sub_centers=k)
    margins = dynamic_margins([1, 16, 81, 10000])  # 0.5, 0.25, 0.1667, 0.05
    loss.set_margin(margins)
    emb, labels = make_batch(5, n=16)
    want = naive_loss(kind, emb, loss.weight.detach(), labels, margins.tolist(), 30.0, k)
    assert loss(emb, labels).item() == pytest.approx(want, rel=1e-10)
    # and differs from a single shared margin, so the per-class values are really used
    loss.set_margin(0.25)
    assert loss(emb, labels).item() != pytest.approx(want, rel=1e-3)


def _at_angle(theta: float) -> torch.Tensor:
    """An embedding at angle theta from the class-0 centre [1, 0] in the plane of both centres."""
    return torch.tensor([[math.cos(theta), math.sin(theta)]], dtype=torch.float64)


def test_arcface_branch_past_pi():
    """theta + m > pi: the target logit is s*(cos theta - m sin m), not cos(theta + m) (which would rise again)."""
    m, s = 0.5, 10.0
    loss = ArcFaceLoss(2, 2, scale=s, margin=m)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    y = torch.tensor([0])
    theta = math.pi - 0.2  # past pi - m
    logit = loss.logits(_at_angle(theta), y)[0, 0].item()
    assert logit == pytest.approx(s * (math.cos(theta) - m * math.sin(m)), rel=1e-9)
    assert logit != pytest.approx(s * math.cos(theta + m), rel=1e-3)
    assert loss(_at_angle(theta), y).item() == pytest.approx(
        naive_loss("arcface", _at_angle(theta), loss.weight.detach(), y, [m, m], s, 1), rel=1e-10)
    # below pi - m it is cos(theta + m)
    theta = 1.0
    assert loss.logits(_at_angle(theta), y)[0, 0].item() == pytest.approx(s * math.cos(theta + m), rel=1e-9)
    # the target logit decreases monotonically in theta over the whole range, across the branch switch
    thetas = torch.linspace(0.01, math.pi - 0.01, 400, dtype=torch.float64)
    embs = torch.stack([thetas.cos(), thetas.sin()], 1)
    target = loss.logits(embs, torch.zeros(400, dtype=torch.long))[:, 0]
    assert (target.diff() < 0).all()


def pml_pair(kind: str, k: int, margin: float, scale: float):
    """Ours and pytorch-metric-learning's loss with the same centres (pml's W is [d, C*k]: ours transposed)."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(6)
    ours = create_loss(kind, D, C, scale=scale, margin=margin, sub_centers=k)
    if kind == "cosface":
        theirs = pml.CosFaceLoss(num_classes=C, embedding_size=D, margin=margin, scale=scale)
    elif k == 1:
        theirs = pml.ArcFaceLoss(num_classes=C, embedding_size=D, margin=math.degrees(margin), scale=scale)
    else:
        theirs = pml.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, margin=math.degrees(margin),
                                          scale=scale, sub_centers=k)
    theirs.W.data = ours.weight.detach().double().t().clone()
    ours.double()
    return ours, theirs


@pytest.mark.parametrize("kind,k", [("arcface", 1), ("cosface", 1), ("arcface", 3)])
def test_equals_pytorch_metric_learning(kind, k):
    """Same value and same gradients (embeddings and centres) as pml's ArcFaceLoss / CosFaceLoss /
    SubCenterArcFaceLoss, which compute the same thing: cosine to L2-normalised centres (sub-centres max-pooled,
    class-major columns c*k+j, as ours), the margin on the own class only, scale, cross-entropy, MeanReducer (mean
    over the batch). Differences that do not change the values: pml's ArcFace margin is in degrees (converted
    here); pml takes acos of cos clamped to [-1, 1] (gradient infinite at exactly +-1) where ours uses
    cos*cos(m) - sin*sin(m) with |cos| <= 1 - 1e-7; its branch test is theta <= pi - m, ours the strict cosine
    form (they differ only on a set of measure zero). pml also casts W to the embeddings' dtype in place, and has
    no sub-centre CosFace and no per-class margins (those are checked against the loop only)."""
    ours, theirs = pml_pair(kind, k, margin=0.375, scale=30.0)  # exact in our float32 margin buffer
    emb, labels = make_batch(7, n=32)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    a, b = ours(e1, labels), theirs(e2, labels)
    assert a.item() == pytest.approx(b.item(), rel=1e-10)
    a.backward()
    b.backward()
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(ours.weight.grad, theirs.W.grad.t(), rtol=1e-8, atol=1e-12)


def test_gradients_reach_embeddings_and_centres_but_not_locked_centres():
    loss = create_loss("arcface", D, C, margin=0.5, sub_centers=3)
    emb, labels = make_batch(8, dtype=torch.float32)
    emb.requires_grad_()
    loss(emb, labels).backward()
    assert emb.grad.abs().sum() > 0 and torch.isfinite(emb.grad).all()
    assert loss.weight.grad is not None and loss.weight.grad.abs().sum() > 0

    emb.grad, loss.weight.grad = None, None
    loss.lock_centers()
    assert not any(p.requires_grad for p in loss.parameters())
    loss(emb, labels).backward()
    assert loss.weight.grad is None
    assert emb.grad.abs().sum() > 0

    loss.lock_centers(False)
    loss(emb, labels).backward()
    assert loss.weight.grad is not None and loss.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_bf16_autocast_computes_in_float32(kind):
    """Training runs the loss under bf16 autocast: cosines must still be float32 (bf16 cos * s=30 is noise)."""
    torch.manual_seed(9)
    loss = create_loss(kind, D, C, margin=0.5, sub_centers=2)
    emb, labels = make_batch(10, dtype=torch.float32)
    ref = loss(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(emb, labels)
        assert loss.cosine(emb).dtype == torch.float32
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_set_margin_validation_and_units():
    loss = create_loss("arcface", D, C)
    loss.set_margin(0.3)
    assert torch.equal(loss.margins, torch.full((C,), 0.3))
    with pytest.raises(ValueError, match="shape"):
        loss.set_margin(torch.ones(C + 1) * 0.1)
    with pytest.raises(ValueError, match="radians"):  # pml-style degrees
        create_loss("arcface", D, C, margin=28.6)
    with pytest.raises(ValueError, match="radians"):
        loss.set_margin(-0.1)
    assert create_loss("CosFace", D, C, margin=0.65).margins[0].item() == pytest.approx(0.65)
    with pytest.raises(ValueError, match="unknown loss"):
        create_loss("softmax", D, C)
    with pytest.raises(ValueError, match="unknown option"):
        create_loss("arcface", D, C, margins=0.3)
    with pytest.raises(ValueError, match="labels must be"):
        loss(torch.randn(4, D), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"embeddings must be \[B, 5\]"):
        loss(torch.randn(4, D + 1), torch.zeros(4, dtype=torch.long))


def test_state_dict_keeps_per_class_margins_and_centres():
    a = create_loss("cosface", D, C, sub_centers=2)
    a.set_margin(dynamic_margins([3, 5, 8, 13]))
    b = create_loss("cosface", D, C, sub_centers=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.margins, b.margins) and torch.equal(a.weight, b.weight)
    emb, labels = make_batch(11, dtype=torch.float32)
    assert a(emb, labels).item() == b(emb, labels).item()


def test_dynamic_margins_hand_computed():
    # n^-1/4 = 1, 1/2, 1/3, 1/10 -> minmax = 1, 4/9, 7/27, 0 -> 0.05 + 0.45 * that
    got = dynamic_margins([1, 16, 81, 10000])
    torch.testing.assert_close(got, torch.tensor([0.5, 0.25, 0.05 + 0.45 * 7 / 27, 0.05]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(dynamic_margins([16, 1], a=0.1, b=0.2), torch.tensor([0.1, 0.3]))
    torch.testing.assert_close(dynamic_margins([7, 7, 7]), torch.full((3,), 0.05))
    with pytest.raises(ValueError, match="positive"):
        dynamic_margins([3, 0, 2])


def test_margin_schedule_ramp_fixed_and_class_size():
    ramp = MarginSchedule(start=0.3, step=0.1, max=0.8)  # 2nd place
    assert [ramp.margin(e) for e in range(8)] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8]
    assert [MarginSchedule(start=0.55).margin(e) for e in (0, 3, 50)] == [0.55, 0.55, 0.55]
    assert MarginSchedule(start=0.9).margin(4) == 0.9  # a fixed margin is not capped by the ramp's max
    sized = MarginSchedule(class_size_a=0.05, class_size_b=0.45)
    torch.testing.assert_close(sized.margin(2, [1, 16, 81, 10000]), dynamic_margins([1, 16, 81, 10000]))
    with pytest.raises(ValueError, match="class counts"):
        sized.margin(0)
    with pytest.raises(ValueError, match="not both"):
        MarginSchedule(step=0.1, class_size_a=0.05, class_size_b=0.45)
    with pytest.raises(ValueError, match="together"):
        MarginSchedule(class_size_a=0.05)
    with pytest.raises(ValueError, match="above its cap"):
        MarginSchedule(start=0.9, step=0.1, max=0.8)
