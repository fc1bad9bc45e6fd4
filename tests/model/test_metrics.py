"""Retrieval metrics against hand-computed cases, ties and the query-exclusion rule."""

from __future__ import annotations

import pytest
import torch

from model.evaluation import rank_all
from model.metrics import relevant_counts, retrieval_metrics
from model.network import Embedding


def test_hand_computed_single_query() -> None:
    # Query of class 1 with R = 2 relevant items; ranking (query excluded): 2, 1, 2, 1, 2, 2, 2, 2
    ranked = torch.tensor([[2, 1, 2, 1, 2, 2, 2, 2]])
    m = retrieval_metrics(ranked, torch.tensor([1]), torch.tensor([2]))
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == m["recall@4"] == m["recall@8"] == 100.0
    assert m["r_precision"] == pytest.approx(50.0)  # 1 of the first R = 2 is relevant
    # MAP@R = (1/R) * sum_{i <= R} P(i) rel(i) = (0 + 1/2) / 2; the hit at rank 4 is past R.
    assert m["map@r"] == pytest.approx(25.0)


def test_average_over_queries_and_perfect_ranking() -> None:
    ranked = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 2], [1, 2, 2, 2, 2, 2, 2, 2]])
    m = retrieval_metrics(ranked, torch.tensor([1, 2]), torch.tensor([3, 1]))
    # query 0: perfect (3 relevant first) -> R-P 1, MAP@R 1; query 1 (class 2, R = 1): rank 1
    # is class 1 -> R-P 0, MAP@R 0; recall@1 = 1/2, recall@2 = 1.
    assert m["recall@1"] == pytest.approx(50.0)
    assert m["recall@2"] == pytest.approx(100.0)
    assert m["r_precision"] == pytest.approx(50.0)
    assert m["map@r"] == pytest.approx(50.0)


def test_queries_with_nothing_to_find_are_left_out() -> None:
    ranked = torch.tensor([[1] * 8, [1] * 8])
    m = retrieval_metrics(ranked, torch.tensor([1, 3]), torch.tensor([2, 0]))
    assert m["recall@1"] == 100.0
    assert m["map@r"] == 100.0


def test_relevant_counts_exclude_the_query() -> None:
    labels = torch.tensor([4, 4, 7, 7, 7, 9])
    assert relevant_counts(labels).tolist() == [1, 1, 2, 2, 2, 0]


def test_counting_the_query_itself_would_inflate_map() -> None:
    # Two images per class, each query's one relevant image ranked 2nd: with R = 1 (ours)
    # MAP@R is 0; the published rule (R = 2, query at rank 1 counted) would give 50.
    ranked = torch.tensor([[2, 1] + [2] * 6])
    assert retrieval_metrics(ranked, torch.tensor([1]), torch.tensor([1]))["map@r"] == 0.0


def test_too_shallow_rankings_are_refused() -> None:
    with pytest.raises(ValueError, match="deep"):
        retrieval_metrics(torch.tensor([[1, 1, 1]]), torch.tensor([1]), torch.tensor([2]))


def test_ties_keep_the_data_set_order_and_the_query_is_never_ranked() -> None:
    # Items 1, 2, 3 have the same vector: tied global scores keep their index order.
    vectors = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8], [0.0, 1.0]])
    parts = vectors[:, None, :].expand(-1, 4, -1).contiguous()
    rankings = rank_all(Embedding(parts, vectors), depth=4, rerank_k=0)
    assert rankings.global_order[0].tolist() == [1, 2, 3, 4]
    assert rankings.global_order[2].tolist() == [1, 3, 4, 0]  # itself (2) left out
    assert (rankings.global_order != torch.arange(5)[:, None]).all()
