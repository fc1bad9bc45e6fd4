"""The image-domain deletion check of the whole ranking score (model.deletion), on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.backbones import Backbone
from model.config import MatchingConfig, ModelConfig, Preprocessing
from model.datasets import read_dataset
from model.deletion import grey_cells, pixel_cells, query_region_totals, ranking_score_deletion
from model.evaluation import evaluate
from model.matching import match_pairs
from model.network import EmbeddingNet
from model.pipeline import Embedder, explain_embeddings
from model.preprocessing import ImageGeometry

CROP = 32


class PooledColours(nn.Module):
    """A backbone whose features are local: each 8 x 8 block of pixels -> one map position.

    ``mixed``: a seeded 3 x 3 convolution first (receptive fields cross cell borders a little,
    features vary more); else each position holds its block's mean colour split into positive
    and negative parts, plus a constant channel (so no map is all zeros)."""

    def __init__(self, mixed: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        with torch.no_grad():
            if mixed:
                self.conv.weight.copy_(torch.randn(6, 3, 3, 3, generator=generator) / 3)
                self.conv.bias.copy_(torch.randn(6, generator=generator) / 3)
            else:
                self.conv.weight.zero_()
                self.conv.weight[:3, :, 1, 1] = torch.eye(3)
                self.conv.weight[3:, :, 1, 1] = -torch.eye(3)
                self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.avg_pool2d(torch.relu(self.conv(x)), 8)  # (B, 6, S/8, S/8)
        return torch.cat([f, torch.ones_like(f[:, :1])], dim=1)


def tiny_embedder(grid: int = 4, weight: float = 0.0, mixed: bool = False) -> Embedder:
    config = ModelConfig(
        dim=None,
        grid=grid,
        preprocessing=Preprocessing(resize=CROP, crop=CROP),
        matching=MatchingConfig(structural_weight=weight),
    )
    model = EmbeddingNet(config, Backbone(config.backbone, PooledColours(mixed)))
    return Embedder(model.eval(), runtime="torch")


def crop_geometry(size: int = CROP) -> ImageGeometry:
    return ImageGeometry(width=size, height=size, left=0.0, top=0.0, size=float(size))


@pytest.mark.parametrize(("grid", "size"), [(4, 32), (4, 30), (7, 224), (3, 32)])
def test_grey_cells_greys_exactly_the_chosen_cells(grid: int, size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, size, size, generator=generator) + 5  # never 0 by chance
    chosen = torch.randperm(grid * grid, generator=generator)[:9].reshape(3, 3)
    masked = grey_cells(pixels, chosen, grid)
    boxes = crop_geometry(size).cell_boxes(grid)  # the explanation's regions, in crop pixels
    centre = torch.arange(size) + 0.5
    for b in range(3):
        expected = torch.zeros(size, size, dtype=torch.bool)
        for cell in chosen[b].tolist():
            x0, y0, x1, y1 = boxes[cell]
            rows = (centre >= y0) & (centre < y1)
            cols = (centre >= x0) & (centre < x1)
            expected |= rows[:, None] & cols[None, :]
        assert expected.sum() > 0
        assert bool((masked[b][:, expected] == 0).all())  # the mean colour, all channels
        assert torch.equal(masked[b][:, ~expected], pixels[b][:, ~expected])
    # Every pixel lies in exactly one cell, and the cells are those of cell_boxes' order.
    cells = pixel_cells(grid, size)
    assert cells.unique().tolist() == list(range(grid * grid))
    assert cells[0, -1] == grid - 1
    assert cells[-1, 0] == grid * (grid - 1)


def batches_of(pixels: torch.Tensor, hits: torch.Tensor, size: int):
    return zip(pixels.split(size), hits.split(size), strict=True)


def random_pixels(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=generator)  # a colour per cell, and noise
    return F.interpolate(coarse, size=CROP) + 0.3 * torch.randn(
        n, 3, CROP, CROP, generator=generator
    )


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_ranking_score_deletion_matches_a_per_pair_reference(weight: float) -> None:
    embedder = tiny_embedder(grid=4, weight=weight, mixed=True)
    config = embedder.model.config
    n, batch, parts = 7, 3, 3
    queries = random_pixels(n, seed=2)
    results = embedder.embed_pixels(random_pixels(5, seed=3))  # stored: no maps
    hits = torch.tensor([4, 0, 3, 1, 1, 2, 0])
    out = ranking_score_deletion(
        batches_of(queries, hits, batch), embedder.embed_pixels, results, config.grid,
        config.matching, parts=parts, seed=5,
    )  # fmt: skip

    # The reference: explain() per pair, greying by the explanation's boxes, one pair at a time.
    generator = torch.Generator().manual_seed(5)
    base, top, rand = [], [], []
    boxes = crop_geometry().cell_boxes(config.grid)
    for start in range(0, n, batch):  # the random regions are drawn batch by batch
        drawn = torch.rand(min(batch, n - start), config.regions, generator=generator)
        for offset, row in enumerate(drawn):
            i = start + offset
            query = embedder.embed_pixels(queries[i : i + 1], True)
            hit = results[int(hits[i])]
            e = explain_embeddings(query, crop_geometry(), hit, crop_geometry(), config)
            assert sum(e.query.total) == pytest.approx(e.score, abs=1e-5)
            totals, score = query_region_totals(query, hit, config.grid, config.matching)
            assert totals[0].tolist() == pytest.approx(e.query.total, abs=1e-6)
            assert float(score[0]) == pytest.approx(e.score, abs=1e-6)
            base.append(e.score)
            order = sorted(range(config.regions), key=lambda r: -e.query.total[r])
            for cells, scores in ((order[:parts], top), (row.argsort()[:parts].tolist(), rand)):
                masked = queries[i].clone()
                for cell in cells:
                    x0, y0, x1, y1 = (round(v) for v in boxes[cell])
                    masked[:, y0:y1, x0:x1] = 0.0
                again = embedder.embed_pixels(masked[None])
                scores.append(float(match_pairs(again, hit, config.matching).score[0, 0]))
    expected_top = 100 * (sum(base) - sum(top)) / sum(base)
    expected_random = 100 * (sum(base) - sum(rand)) / sum(base)
    assert out["pairs"] == n
    assert out["top_drop"] == pytest.approx(expected_top, abs=1e-3)
    assert out["random_drop"] == pytest.approx(expected_random, abs=1e-3)
    # Batching does not change the top regions (only the random draws follow the batches).
    again = ranking_score_deletion(
        batches_of(queries, hits, n), embedder.embed_pixels, results, config.grid,
        config.matching, parts=parts, seed=5,
    )  # fmt: skip
    assert again["top_drop"] == pytest.approx(out["top_drop"], abs=1e-3)


def red_cells(n: int, cells: torch.Tensor, seed: int) -> torch.Tensor:
    """(n, 3, CROP, CROP) normalised pixels: faint noise around the mean colour, and a strong
    red in the given cells (n, k) of the 4 x 4 grid."""
    generator = torch.Generator().manual_seed(seed)
    pixels = 0.2 * torch.randn(n, 3, CROP, CROP, generator=generator)
    where = pixel_cells(4, CROP)
    for b in range(n):
        inside = torch.isin(where, cells[b])
        pixels[b, 0][inside] = 2.0
    return pixels


def test_top_regions_cost_more_than_random_ones_when_the_score_depends_on_them() -> None:
    # Query and hit share a red patch in 3 of 16 cells; the rest is faint noise. The red cells
    # carry the match: greying them out must cost far more than greying out 3 random cells.
    embedder = tiny_embedder(grid=4, weight=0.5)
    config = embedder.model.config
    n = 12
    generator = torch.Generator().manual_seed(7)
    cells = torch.stack([torch.randperm(16, generator=generator)[:3] for _ in range(n)])
    queries = red_cells(n, cells, seed=8)
    shifted = torch.stack([torch.randperm(16, generator=generator)[:3] for _ in range(n)])
    results = embedder.embed_pixels(red_cells(n, shifted, seed=9))
    out = ranking_score_deletion(
        batches_of(queries, torch.arange(n), 5), embedder.embed_pixels, results, config.grid,
        config.matching,
    )  # fmt: skip
    assert out["pairs"] == n
    assert out["top_drop"] > 2 * out["random_drop"] > 0
    # And the top regions are the red cells themselves.
    query = embedder.embed_pixels(queries, True)
    totals, _ = query_region_totals(query, results, config.grid, config.matching)
    top = totals.argsort(dim=1, descending=True)[:, :3].sort(dim=1).values
    assert torch.equal(top, cells.sort(dim=1).values)


def test_evaluate_reports_the_check_on_a_subset_of_queries(tmp_path) -> None:
    generator = torch.Generator().manual_seed(11)
    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(4):
            colours = torch.randint(0, 256, (4, 4, 3), generator=generator, dtype=torch.uint8)
            picture = Image.fromarray(colours.numpy()).resize((40, 36), Image.NEAREST)
            picture.save(tmp_path / f"class{c}" / f"{i}.png")
    images = read_dataset(tmp_path, "folder")
    embedder = tiny_embedder(grid=4, weight=0.5, mixed=True)
    report = evaluate(embedder.model, images, rerank_k=5, batch_size=4, deletion_queries=5,
                      runtime="torch")  # fmt: skip
    deletion = report["deletion"]
    assert {"top_parts_drop", "random_parts_drop"} <= set(deletion)
    assert deletion["ranking_score"]["pairs"] == 5
    assert {"top_drop", "random_drop", "seconds"} <= set(deletion["ranking_score"])
    everyone = evaluate(embedder.model, images, rerank_k=5, batch_size=5, runtime="torch")
    assert everyone["deletion"]["ranking_score"]["pairs"] == len(images) == 12
    skipped = evaluate(embedder.model, images, rerank_k=5, deletion_queries=0, runtime="torch")
    assert "ranking_score" not in skipped["deletion"]
