from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from model.config import MatchingConfig, ModelConfig
from model.matching import match_all, match_pairs, part_weights, structural_match
from model.network import Embedding, EmbeddingHead
from tests.model.reference import match_reference, unit, weights_reference

TIGHT = MatchingConfig(tol=1e-6, max_iter=1000)


def _embedding(n: int, r: int = 16, d: int = 32) -> Embedding:
    raw = torch.randn(n, r, d)
    return Embedding(
        torch.nn.functional.normalize(raw, dim=-1),
        torch.nn.functional.normalize(raw.mean(1), dim=-1),
    )


def test_matches_the_naive_per_pair_computation() -> None:
    queries, gallery = _embedding(2), _embedding(3)
    result = match_all(queries, gallery, TIGHT)
    assert result.plan.shape == (2, 3, 16, 16)
    for b in range(2):
        for k in range(3):
            ref = match_reference(
                queries.parts[b], queries.vector[b], gallery.parts[k], gallery.vector[k], 0.05
            )
            assert_close(result.similarity[b, k].double(), ref["similarity"], atol=1e-6, rtol=0)
            assert_close(result.query_weights[b, k].double(), ref["mu"], atol=1e-6, rtol=0)
            assert_close(result.candidate_weights[b, k].double(), ref["nu"], atol=1e-6, rtol=0)
            assert_close(result.plan[b, k].double(), ref["plan"], atol=2e-6, rtol=1e-3)
            assert_close(
                result.structural_similarity[b, k].double(), ref["structural"], atol=1e-5, rtol=0
            )
            assert_close(result.score[b, k].double(), ref["score"], atol=1e-5, rtol=0)


def test_contributions_decompose_the_score_exactly() -> None:
    result = match_all(_embedding(3), _embedding(5))
    assert_close(
        result.contributions.sum((-2, -1)), result.structural_similarity, atol=1e-5, rtol=0
    )
    assert_close(result.score, result.structural_similarity + result.global_similarity)


def test_swapping_query_and_candidate_transposes_everything() -> None:
    # Entropic OT is symmetric: the plan for (nu, mu, C^T) is the transpose of the plan for
    # (mu, nu, C), and the two marginals swap roles; so SS and the score are symmetric.
    a, b = _embedding(4), _embedding(4)
    ab, ba = match_pairs(a, b, TIGHT), match_pairs(b, a, TIGHT)
    assert_close(ab.similarity, ba.similarity.transpose(-2, -1))
    assert_close(ab.query_weights, ba.candidate_weights)
    assert_close(ab.plan, ba.plan.transpose(-2, -1), atol=1e-6, rtol=1e-4)
    assert_close(ab.score, ba.score, atol=1e-6, rtol=0)


def test_an_image_matched_with_itself_keeps_its_parts_in_place() -> None:
    # Well-separated parts: each part's highest flow goes to itself, and SS beats any other image.
    parts = torch.nn.functional.normalize(torch.eye(16, 32) + 0.05 * torch.randn(16, 32), dim=-1)
    vector = torch.nn.functional.normalize(parts.mean(0), dim=-1)
    me = Embedding(parts.unsqueeze(0), vector.unsqueeze(0))
    result = match_pairs(me, me, TIGHT)
    assert torch.equal(result.plan[0, 0].argmax(-1), torch.arange(16))
    assert float(result.global_similarity[0, 0]) == pytest.approx(1.0, abs=1e-6)
    other = match_pairs(me, _embedding(1, d=32), TIGHT)
    assert float(result.structural_similarity[0, 0]) > float(other.structural_similarity[0, 0])


def test_weights_fall_back_to_uniform_when_no_part_correlates_positively() -> None:
    parts = unit(16, 8)
    away = -torch.nn.functional.normalize(parts.sum(0), dim=-1)  # negative with most parts
    corr = torch.einsum("rd,d->r", parts, away)
    weights = part_weights(corr)
    assert_close(weights, weights_reference(parts, away).float())
    assert_close(weights.sum(), torch.tensor(1.0))
    negative = part_weights(-torch.rand(3, 16))
    assert_close(negative, torch.full((3, 16), 1 / 16))


def test_all_negative_correlations_still_give_a_finite_flow() -> None:
    # Parts clustered around one direction, and a candidate around the opposite one: every
    # <q_i, ḡ> and <g_j, q̄> is negative.
    parts = torch.nn.functional.normalize(
        torch.ones(1, 16, 32) + 0.1 * torch.randn(1, 16, 32), dim=-1
    )
    q = Embedding(parts, torch.nn.functional.normalize(parts.mean(1), dim=-1))
    g = Embedding(-q.parts, -q.vector)
    result = match_pairs(q, g)
    assert_close(result.query_weights, torch.full((1, 1, 16), 1 / 16))
    assert torch.isfinite(result.plan).all()
    assert_close(result.plan.sum((-2, -1)), torch.ones(1, 1), atol=1e-5, rtol=0)


def test_batched_queries_equal_one_query_at_a_time() -> None:
    queries, gallery = _embedding(3), _embedding(7)
    together = match_all(queries, gallery)
    for b in range(3):
        alone = match_all(queries[b], gallery)
        # The batch stops when its worst pair converges, so a lone query may stop sooner.
        assert_close(together.score[b], alone.score[0], atol=1e-5, rtol=0)


def test_gradients_reach_the_head_through_similarity_with_the_plan_detached() -> None:
    head = EmbeddingHead(in_channels=24, dim=16, grid=4)
    features = torch.randn(4, 24, 7, 7)
    emb = head(features)
    result = match_pairs(emb[:2], emb[2:], detach_plan=True)
    assert not result.plan.requires_grad
    result.score.sum().backward()
    assert head.proj.weight.grad is not None
    assert float(head.proj.weight.grad.abs().sum()) > 0


def test_gradients_flow_through_the_plan_when_asked() -> None:
    a, b = _embedding(2), _embedding(2)
    parts = a.parts.clone().requires_grad_(True)
    result = match_pairs(Embedding(parts, a.vector), b, detach_plan=False)
    assert result.plan.requires_grad
    result.structural_similarity.sum().backward()
    assert parts.grad is not None
    assert torch.isfinite(parts.grad).all()


def test_grids_of_seven_and_unequal_sizes() -> None:
    result = match_all(_embedding(2, r=49), _embedding(3, r=49), ModelConfig(grid=7).matching)
    assert result.plan.shape == (2, 3, 49, 49)
    unequal = structural_match(unit(1, 16, 8), unit(1, 8), unit(1, 2, 9, 8), unit(1, 2, 8))
    assert unequal.plan.shape == (1, 2, 16, 9)


def test_shape_errors_name_the_expected_shapes() -> None:
    with pytest.raises(ValueError, match=r"candidate_parts \(B, K, P, D\)"):
        structural_match(unit(1, 16, 8), unit(1, 8), unit(1, 16, 8), unit(1, 8))
    with pytest.raises(ValueError, match="as many"):
        match_pairs(_embedding(2), _embedding(3))


def test_matching_is_fp32_for_half_inputs() -> None:
    a, b = _embedding(2), _embedding(2)
    half = match_pairs(a.to("cpu", torch.float16), b.to("cpu", torch.float16))
    assert half.plan.dtype == torch.float32
    assert half.score.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    queries, gallery = _embedding(2), _embedding(50)
    cpu = match_all(queries, gallery)
    gpu = match_all(queries.to("cuda"), gallery.to("cuda"))
    assert_close(gpu.score.cpu(), cpu.score, atol=1e-5, rtol=0)
    moved = gpu.to("cpu")  # packed in one transfer: every field as a transfer of its own gives
    for f in dataclasses.fields(gpu):
        value = getattr(gpu, f.name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(moved, f.name), value.cpu()), f.name


def test_a_match_moves_packed_and_unchanged_and_picks_pairs() -> None:
    match = match_all(_embedding(3), _embedding(7))
    moved = match._packed_to(torch.device("cpu"))  # the path a GPU result takes to the host
    picked = match.pick(torch.tensor([2, 0, 2]), torch.tensor([5, 1, 0]))
    for f in dataclasses.fields(match):
        value = getattr(match, f.name)
        if isinstance(value, torch.Tensor):
            assert getattr(moved, f.name).dtype == value.dtype
            assert torch.equal(getattr(moved, f.name), value), f.name
            got = getattr(picked, f.name)
            assert got.shape == (1, 3, *value.shape[2:])
            assert torch.equal(got[0], value[[2, 0, 2], [5, 1, 0]]), f.name
        else:
            assert getattr(moved, f.name) == value
    assert match.converged.dtype == torch.bool
    assert match.to("cpu") is match  # already there: nothing moves


def test_rerank_positions_is_the_two_stage_rule() -> None:
    from model.matching import rerank_positions

    score = torch.tensor([[0.2, 0.9, 0.2, float("-inf"), 0.7, 0.1], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    order = rerank_positions(score, rerank_k=4)
    # Head re-sorted by score (ties keep the global order, -inf last); tail untouched.
    assert order[0].tolist() == [1, 0, 2, 3, 4, 5]
    assert order[1].tolist() == [0, 1, 2, 3, 4, 5]
    assert rerank_positions(score, 0)[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert rerank_positions(score, 99)[0].tolist() == [1, 4, 0, 2, 5, 3]
