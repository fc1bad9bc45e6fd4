"""Calibration of the structural weight: solved once, each weight re-sorts, the best is kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.calibration import WEIGHTS, calibrate, objective
from model.checkpoint import load_checkpoint
from model.config import MatchingConfig
from model.evaluation import rank_all, ranking_depth, retrieval_report
from model.matching import match_pairs
from model.metrics import relevant_counts, retrieval_metrics
from model.network import Embedding
from service.cli import main


def clustered(
    n_classes: int, per_class: int, noise: float, seed: int
) -> tuple[Embedding, torch.Tensor]:
    """Images of a class share part vectors (each with its own noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, 4, 16, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    parts = centres[labels] + noise * torch.randn(len(labels), 4, 16, generator=g)
    parts = F.normalize(parts, dim=-1)
    return Embedding(parts, F.normalize(parts.mean(1), dim=-1)), labels


def test_each_weight_gives_the_metrics_of_that_ranking_rule() -> None:
    embedding, labels = clustered(6, 5, noise=1.5, seed=0)
    result = calibrate(embedding, labels, rerank_k=10, weights=(0.0, 0.5, 2.0))
    depth = ranking_depth(labels, 10)
    for weight, metrics in result.reranked.items():
        rankings = rank_all(embedding, depth, 10, MatchingConfig(structural_weight=weight))
        assert metrics == retrieval_report(rankings, labels)["reranked"]
    assert result.global_metrics == retrieval_report(rankings, labels)["global"]


def test_the_chosen_weight_maximises_the_objective_and_ties_go_to_the_smaller() -> None:
    embedding, labels = clustered(6, 5, noise=1.5, seed=1)
    result = calibrate(embedding, labels, rerank_k=10)
    assert set(result.reranked) == set(WEIGHTS)
    best = max(objective(m) for m in result.reranked.values())
    assert objective(result.best) == best
    assert result.weight == min(w for w, m in result.reranked.items() if objective(m) == best)
    # Weight 0 is the global ranking, so the chosen rule is never worse than it on these classes.
    assert objective(result.best) >= objective(result.global_metrics)


def test_a_useless_structural_term_gets_weight_zero() -> None:
    # Identical parts in every image: the structural term is the same constant for every pair,
    # so every weight gives the global ranking, and the tie goes to weight 0.
    embedding, labels = clustered(5, 4, noise=0.8, seed=2)
    parts = torch.ones_like(embedding.parts) / embedding.parts.shape[-1] ** 0.5
    flat = Embedding(parts, embedding.vector)
    result = calibrate(flat, labels, rerank_k=8)
    assert result.weight == 0.0
    r = relevant_counts(labels)
    ss = match_pairs(flat[:1], flat[1:2]).structural_similarity
    torch.testing.assert_close(ss, torch.ones_like(ss))
    assert result.best == retrieval_metrics(labels[rank_all(flat, 19, 8).global_order], labels, r)


def test_score_bands_are_quantiles_of_the_closest_impostors() -> None:
    from model.calibration import CLOSE_QUANTILE, RELATED_QUANTILE, score_bands
    from model.evaluation import head_scores, verdict_rates

    embedding, labels = clustered(8, 6, noise=1.2, seed=4)
    scores = head_scores(embedding, ranking_depth(labels, 10), 10)
    related, close = score_bands(scores, labels, 0.0)
    # Naively: each query's best-scoring candidate of another class, by a loop.
    sims = embedding.vector @ embedding.vector.T
    impostors = []
    for q in range(len(labels)):
        candidates = scores.order[q, :10].tolist()
        others = [float(sims[q, c]) for c in candidates if labels[c] != labels[q]]
        if others:
            impostors.append(max(others))
    best = torch.tensor(impostors, dtype=torch.float64)
    assert close == pytest.approx(float(best.quantile(CLOSE_QUANTILE)), abs=1e-6)
    assert related == pytest.approx(float(best.quantile(RELATED_QUANTILE)), abs=1e-6)
    assert related <= close
    rates = verdict_rates(scores, labels, MatchingConfig(structural_weight=0.0).with_bands(
        related, close))  # fmt: skip
    assert sum(r["hits"] for r in rates.values()) == pytest.approx(100.0, abs=0.05)
    assert rates["close"]["of_query_class"] > rates["unrelated"]["of_query_class"]
    # A set whose queries see no impostor calls nothing close.
    one_class = torch.zeros_like(labels)
    alone = head_scores(embedding, 10, 10)
    assert score_bands(alone, one_class, 0.5) == (1.5, 1.5)


def test_calibration_refuses_negative_weights() -> None:
    embedding, labels = clustered(3, 3, noise=1.0, seed=3)
    with pytest.raises(ValueError, match=">= 0"):
        calibrate(embedding, labels, weights=(-1.0, 1.0))


def test_cli_prints_every_weight_and_saves_the_chosen_one(
    cub_dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibrated.safetensors"
    args = ["calibrate", "--data", str(cub_dev), "--classes", "5-6", "--rerank-k", "10"]
    assert main([*args, "--grid", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for weight in WEIGHTS:
        assert f"w = {weight:<8g}" in printed
    chosen = float(printed.split("structural weight: ")[1].split()[0])
    model = load_checkpoint(out)
    assert model.config.matching.structural_weight == chosen
    assert model.config.grid == 2
    assert model.config.dim is None  # the default model, saved with its new weight
    assert main([*args, "--checkpoint", str(tmp_path / "absent.safetensors")]) == 2
    assert "absent.safetensors: no such checkpoint" in capsys.readouterr().err
