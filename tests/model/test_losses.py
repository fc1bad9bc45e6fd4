"""The DIML losses against naive loops, and the structural distance they use."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytorch_metric_learning", reason="the train extra is not installed")

from model.losses import StructuralDistance, make_criterion, pack, unpack
from model.matching import match_pairs
from model.network import Embedding

D = 8


def batch(n: int = 8, r: int = 4, seed: int = 0) -> tuple[Embedding, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parts = F.normalize(torch.randn(n, r, D, generator=g), dim=-1).requires_grad_()
    vector = F.normalize(parts.mean(1), dim=-1)
    labels = torch.arange(n) // 2
    return Embedding(parts, vector), labels


def naive_scores(e: Embedding) -> torch.Tensor:
    """score[i, j] = SS + global, one pair at a time, row image as the query."""
    n = len(e)
    with torch.no_grad():
        return torch.stack(
            [torch.stack([match_pairs(e[i], e[j]).score[0, 0] for j in range(n)]) for i in range(n)]
        )


def test_pack_round_trip() -> None:
    e, _ = batch()
    back = unpack(pack(e), D)
    assert torch.equal(back.parts, e.parts)
    assert torch.equal(back.vector, e.vector)


def test_structural_distance_is_the_test_time_score() -> None:
    e, _ = batch()
    scores = naive_scores(e)
    similarity = StructuralDistance(D)(pack(e))
    distance = StructuralDistance(D, as_distance=True)(pack(e))
    # Sinkhorn stops within tol 1e-4 of the marginals, at its own iteration per batch.
    torch.testing.assert_close(similarity, scores / 2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        distance.square(), (2 - scores).clamp_min(1e-8), atol=1e-4, rtol=1e-4
    )
    # pairwise_distance matches row i with column i only: the diagonal.
    torch.testing.assert_close(
        StructuralDistance(D).pairwise_distance(pack(e), pack(e)), similarity.diagonal()
    )
    # Rows are queries: mu comes from the row image's parts against the column's vector,
    # so the matrix is the test-time one (and symmetric, as the transpose symmetry says).
    torch.testing.assert_close(similarity, similarity.T, atol=1e-5, rtol=1e-5)


def test_ms_diml_loss_against_a_naive_loop() -> None:
    e, labels = batch(seed=1)
    criterion = make_criterion("ms-diml", D)
    loss = criterion.loss(pack(e), labels)  # every pair, no miner
    s = naive_scores(e) / 2
    alpha, beta, base = 2.0, 40.0, 0.5
    total = 0.0
    for i in range(len(e)):
        pos = [s[i, j] for j in range(len(e)) if j != i and labels[j] == labels[i]]
        neg = [s[i, j] for j in range(len(e)) if labels[j] != labels[i]]
        total += math.log1p(sum(math.exp(-alpha * (float(v) - base)) for v in pos)) / alpha
        total += math.log1p(sum(math.exp(beta * (float(v) - base)) for v in neg)) / beta
    assert float(loss.detach()) == pytest.approx(total / len(e), rel=1e-4)


def test_margin_diml_loss_against_a_naive_loop() -> None:
    e, labels = batch(seed=2)
    criterion = make_criterion("margin-diml", D)
    loss = criterion.loss(pack(e), labels)
    d = (2 - naive_scores(e)).clamp_min(1e-8).sqrt()
    margin, beta = 0.2, 1.2
    terms = []
    for a in range(len(e)):
        for p in range(len(e)):
            for n in range(len(e)):
                if p != a and labels[p] == labels[a] and labels[n] != labels[a]:
                    terms.append(max(0.0, float(d[a, p]) - beta + margin))
                    terms.append(max(0.0, beta - float(d[a, n]) + margin))
    nonzero = sum(t > 0 for t in terms)
    assert float(loss.detach()) == pytest.approx(sum(terms) / nonzero, rel=1e-4)


@pytest.mark.parametrize(
    "name", ["ms-diml", "margin-diml", "ms", "margin", "contrastive", "triplet"]
)
def test_every_loss_gives_finite_gradients(name: str) -> None:
    e, labels = batch(n=16, seed=3)
    loss = make_criterion(name, D)(e, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert e.parts.grad is not None
    assert torch.isfinite(e.parts.grad).all()


def test_diml_gradients_reach_the_parts_with_the_plan_detached() -> None:
    e, labels = batch(seed=4)
    parts = e.parts
    loss = make_criterion("ms-diml", D).loss(pack(e), labels)
    (grad,) = torch.autograd.grad(loss, parts)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_unknown_loss_names_the_choices() -> None:
    with pytest.raises(ValueError, match="ms-diml"):
        make_criterion("arcface", D)
