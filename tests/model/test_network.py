from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from model.config import ModelConfig
from model.network import Embedding, EmbeddingHead, create_model


@pytest.mark.parametrize("grid", [4, 7])
def test_head_gives_unit_parts_and_the_normalised_mean_of_the_map_as_global(grid: int) -> None:
    head = EmbeddingHead(in_channels=24, dim=16, grid=grid)
    features = torch.randn(3, 24, 7, 7)
    emb = head(features)
    assert emb.parts.shape == (3, grid * grid, 16)
    assert emb.vector.shape == (3, 16)
    assert_close(emb.parts.norm(dim=-1), torch.ones(3, grid * grid))
    raw = head.proj(features)
    assert_close(emb.vector, F.normalize(raw.mean(dim=(2, 3)), dim=-1))
    cells = F.adaptive_avg_pool2d(raw, grid).flatten(2).transpose(1, 2)
    if grid == 7:  # cells of one position each: the map's mean is the mean of the cells
        assert_close(emb.vector, F.normalize(cells.mean(1), dim=-1))
    else:  # 4 x 4 cells over 7 x 7 overlap: their mean would count some positions twice
        assert not torch.allclose(emb.vector, F.normalize(cells.mean(1), dim=-1), atol=1e-3)


def test_projecting_then_pooling_equals_pooling_then_projecting() -> None:
    head = EmbeddingHead(in_channels=24, dim=16, grid=4)
    features = torch.randn(2, 24, 7, 7)
    pooled = F.adaptive_avg_pool2d(features, 4)  # the published order: pool, then project
    assert_close(
        head.proj(pooled), F.adaptive_avg_pool2d(head.proj(features), 4), atol=1e-6, rtol=0
    )


def test_cells_are_row_major() -> None:
    head = EmbeddingHead(in_channels=1, dim=None, grid=2)
    features = torch.tensor([[[[1.0, -1.0], [-1.0, 1.0]]]])
    emb = head(features)  # D = 1: each part is +1 or -1 after normalisation
    assert emb.parts.flatten().tolist() == [1.0, -1.0, -1.0, 1.0]


def test_headless_mode_keeps_the_backbone_channels() -> None:
    model = create_model(ModelConfig(dim=None), weights=None)
    emb = model(torch.zeros(2, 3, 224, 224))
    assert emb.parts.shape == (2, 16, 1280)
    assert model.dim == 1280


def test_same_config_builds_the_same_head() -> None:
    a = create_model(ModelConfig(dim=32), weights=None)
    b = create_model(ModelConfig(dim=32), weights=None)
    assert torch.equal(a.head.proj.weight, b.head.proj.weight)


def test_input_and_embedding_shapes_are_checked() -> None:
    model = create_model(ModelConfig(dim=8), weights=None)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="disagree"):
        Embedding(torch.zeros(2, 16, 8), torch.zeros(3, 8))


def test_config_round_trips_and_validates() -> None:
    config = ModelConfig(backbone="resnet50", dim=None, grid=7)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.differences(ModelConfig()) == [
        "backbone: 'resnet50' != 'mobilenet_v2'",
        "dim: None != 512",
        "grid: 7 != 4",
    ]
    with pytest.raises(ValueError, match="not a model configuration"):
        ModelConfig.from_dict({"colour": "blue"})
    with pytest.raises(ValueError, match="epsilon"):
        ModelConfig.from_dict({"matching": {"epsilon": 0}})
