"""Re-ranking, keypoint transfer (PCK) on synthetic flows, the deletion check, and the report."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from model.config import MatchingConfig
from model.datasets import read_dataset
from model.deletion import deletion_check
from model.evaluation import rank_all
from model.keypoints import cell_centres, keypoint_cells, same_class_pairs, transfer_keypoints
from model.matching import match_all
from model.network import Embedding
from service.cli import main

GRID = 2


def random_embedding(n: int, r: int = 4, d: int = 8, seed: int = 0) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    parts = F.normalize(torch.randn(n, r, d, generator=g), dim=-1)
    return Embedding(parts, F.normalize(parts.mean(1), dim=-1))


def test_reranking_sorts_the_top_k_by_the_structural_score_and_keeps_the_rest() -> None:
    e = random_embedding(30, seed=1)
    rankings = rank_all(e, depth=20, rerank_k=8, chunk=7)
    scores = match_all(e, e).score  # (30, 30), naive all pairs
    for q in range(30):
        top = rankings.global_order[q, :8]
        expected = top[torch.sort(scores[q, top], descending=True, stable=True).indices]
        assert rankings.reranked_order[q, :8].tolist() == expected.tolist()
        assert rankings.reranked_order[q, 8:].tolist() == rankings.global_order[q, 8:].tolist()
    sims = e.vector @ e.vector.T
    sims.fill_diagonal_(-2)
    assert rankings.global_order[:, 0].tolist() == sims.argmax(1).tolist()


@pytest.mark.parametrize("weight", [0.0, 0.3, 2.0])
def test_reranking_uses_the_models_structural_weight(weight: float) -> None:
    e = random_embedding(25, seed=2)
    matching = MatchingConfig(structural_weight=weight)
    rankings = rank_all(e, depth=12, rerank_k=6, matching=matching)
    full = match_all(e, e)
    for q in range(25):
        top = rankings.global_order[q, :6]
        score = full.global_similarity[q, top] + weight * full.structural_similarity[q, top]
        expected = top[torch.sort(score, descending=True, stable=True).indices]
        assert rankings.reranked_order[q, :6].tolist() == expected.tolist()
    if weight == 0.0:  # the global ranking, ties and all
        assert torch.equal(rankings.reranked_order, rankings.global_order)


def test_same_class_pairs_takes_the_first_three_of_the_class() -> None:
    labels = torch.tensor([0, 1, 0, 0, 0, 0])
    order = torch.tensor([[1, 2, 3, 4, 5], [0, 2, 3, 4, 5]] + [[1, 0, 2, 3, 4]] * 4)
    queries, candidates = same_class_pairs(order, labels, top=5, per_query=3)
    first = queries == 0
    queries, candidates = queries[first], candidates[first]
    assert queries.tolist() == [0, 0, 0]
    assert candidates.tolist() == [2, 3, 4]


def geometry(n: int, left: float = 0.0, top: float = 0.0, size: float = 100.0) -> torch.Tensor:
    return torch.tensor([[size, size, left, top, size]] * n)


def test_cells_and_centres() -> None:
    g = geometry(1, left=10, top=20, size=100)
    assert cell_centres(g, GRID)[0].tolist() == [[35, 45], [85, 45], [35, 95], [85, 95]]
    kp = torch.tensor([[[11.0, 21.0, 1], [109.0, 21.0, 1], [60.0, 71.0, 1], [5.0, 50.0, 1]]])
    assert keypoint_cells(kp, g, GRID).tolist() == [[0, 1, 3, -1]]  # the last is outside


def test_pck_with_a_known_flow() -> None:
    # Cell i of the query flows to cell perm[i] of the candidate; each query keypoint sits at
    # its cell's centre and the same part of the candidate at the centre of cell perm[i].
    perm = torch.tensor([1, 0, 3, 2])
    plan = torch.zeros(1, 4, 4)
    plan[0, torch.arange(4), perm] = 0.25
    similarity = torch.eye(4)[None]  # nearest features say "same cell"
    centres = cell_centres(geometry(1), GRID)[0]
    query_kp = torch.cat([centres, torch.ones(4, 1)], 1)[None]
    cand_kp = torch.cat([centres[perm], torch.ones(4, 1)], 1)[None]
    cand_kp[0, 3, 2] = 0  # part 3 not visible in the candidate: not counted
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    out = transfer_keypoints(
        plan, similarity, query_kp, geometry(1), cand_kp, geometry(1), boxes, GRID
    )
    assert out["n_keypoints"] == 3
    assert out["flow"] == [100.0, 100.0]
    assert out["flow_mean"] == [100.0, 100.0]
    assert out["nearest"] == out["identity"] == [0.0, 0.0]  # cells are 50 px = 0.5 box apart
    # A uniform flow: argmax takes cell 0 (right only for part 1, which went to cell 0); the
    # flow-weighted mean lands on the image centre, 35 px (0.35 box) from every true point.
    out = transfer_keypoints(
        torch.full((1, 4, 4), 1 / 16), similarity, query_kp, geometry(1), cand_kp, geometry(1),
        boxes, GRID,
    )  # fmt: skip
    assert out["flow"] == pytest.approx([100 / 3, 100 / 3])
    assert out["flow_mean"] == [0.0, 0.0]


def test_deletion_check_top_parts_matter_more_than_random_ones() -> None:
    # Each query shares 3 strong parts with its candidate; the others are noise.
    g = torch.Generator().manual_seed(0)
    n, r, d = 64, 16, 32
    shared = F.normalize(torch.randn(n, 3, d, generator=g), dim=-1)
    noise_q = F.normalize(torch.randn(n, r - 3, d, generator=g), dim=-1)
    noise_c = F.normalize(torch.randn(n, r - 3, d, generator=g), dim=-1)
    qp, cp = torch.cat([shared, noise_q], 1), torch.cat([noise_c, shared], 1)
    q = Embedding(qp, F.normalize(qp.mean(1), dim=-1))
    c = Embedding(cp, F.normalize(cp.mean(1), dim=-1))
    both = Embedding.cat([q, c])
    queries, candidates = torch.arange(n), torch.arange(n, 2 * n)
    drops = deletion_check(both, queries, candidates)
    assert drops["top_parts_drop"] > 5 * max(drops["random_parts_drop"], 1.0)
    assert drops == deletion_check(both, queries, candidates)  # seeded
    # Chunks add up (Sinkhorn stops per batch, within its tolerance).
    assert deletion_check(both, queries, candidates, chunk=5) == pytest.approx(drops, rel=1e-4)


def test_evaluate_cli_on_real_photos(cub_dev, tmp_path, capsys) -> None:
    out = tmp_path / "report.json"
    code = main(
        ["evaluate", "--data", str(cub_dev), "--classes", "21-22", "--rerank-k", "20",
         "--deletion-queries", "40", "--json", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    n = len(read_dataset(cub_dev, "cub", "21-22"))
    assert report["n_queries"] == n
    assert report["rerank_k"] == 20
    keys = {"recall@1", "recall@2", "recall@4", "recall@8", "r_precision", "map@r"}
    for section in ("global", "reranked", "reranked_published"):
        assert set(report[section]) == keys
        assert all(0 <= v <= 100 for v in report[section].values())
        assert report[section]["recall@1"] <= report[section]["recall@8"]
    # The default model's structural weight is 0: its re-ranked order is the global one.
    assert report["structural_weight"] == 0
    assert report["reranked"] == report["global"]
    assert report["dim"] == 1280
    # Two bird species: the ImageNet features already tell them apart most of the time.
    assert report["global"]["recall@1"] > 60
    pck = report["pck"]
    assert pck["alpha"] == [0.1, 0.2]
    assert pck["n_keypoints"] > 500
    for method in ("flow", "flow_mean", "nearest", "identity"):
        assert pck[method][0] <= pck[method][1]
    # What the flow adds: it carries keypoints better than the identity mapping.
    assert pck["flow"][1] > pck["identity"][1]
    assert report["deletion"]["top_parts_drop"] > report["deletion"]["random_parts_drop"]
    # The whole score's explanation, checked in the image: 40 queries and their top hits.
    greyed = report["deletion"]["ranking_score"]
    assert greyed["pairs"] == 40
    assert greyed["top_drop"] > greyed["random_drop"] > 0
    assert report["seconds"] > 0
    out = capsys.readouterr().out
    assert "PCK@0.1/0.2" in out
    assert "greying out the 3 top regions lowers the score by" in out


def test_evaluate_cli_names_a_missing_file(tmp_path, capsys) -> None:
    (tmp_path / "images.txt").write_text("1 a/b.jpg\n")
    assert main(["evaluate", "--data", str(tmp_path), "--dataset", "cub"]) == 2
    err = capsys.readouterr().err
    assert "image_class_labels.txt: missing" in err
    assert "expected" in err


def test_evaluate_grid_is_for_the_default_model_only(tmp_path, capsys) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    args = ["evaluate", "--data", str(tmp_path), "--grid", "7", "--checkpoint", "m.safetensors"]
    assert main(args) == 2
    assert "--grid is for the default model" in capsys.readouterr().err
