"""The frozen prefix / trainable last stage split, cached views, and the PCA head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.backbones import create_backbone
from model.config import Preprocessing
from model.datasets import read_dataset
from model.feature_cache import body_sequence, cache_maps, last_stage_start, pca_init
from model.loading import batches
from model.network import EmbeddingHead
from model.training import train_transform


@pytest.mark.parametrize(("name", "start"), [("mobilenet_v2", 14), ("resnet50", 7)])
def test_the_last_stage_starts_where_the_final_stride_begins(name: str, start: int) -> None:
    backbone = create_backbone(name, weights=None)
    body = body_sequence(backbone)
    assert last_stage_start(backbone) == start  # MobileNetV2 features[14:], ResNet layer4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        backbone.eval()
        before = body[:start](x)
        assert before.shape[-1] == 2 * backbone(x).shape[-1]  # one stride step earlier
        torch.testing.assert_close(body[start:](before), backbone(x))


def test_pca_head_projects_centred_parts_on_their_principal_axes() -> None:
    g = torch.Generator().manual_seed(0)
    # Maps whose pooled parts vary mostly along a few channel directions.
    basis = torch.linalg.qr(torch.randn(12, 12, generator=g)).Q
    scales = torch.tensor([5.0, 3.0, 2.0] + [0.1] * 9)
    coords = torch.randn(40, 12, 4, 4, generator=g) * scales[None, :, None, None]
    maps = torch.einsum("ck,nkhw->nchw", basis, coords) + 7.0
    head = EmbeddingHead(12, dim=3, grid=2)
    pca_init(head, maps, power=0.0, chunk=7)
    parts = F.adaptive_avg_pool2d(maps.double(), 2).flatten(2).transpose(1, 2).reshape(-1, 12)
    mean = parts.mean(0)
    _values, vectors = torch.linalg.eigh(torch.cov((parts - mean).T, correction=0))
    expected = (parts - mean) @ vectors[:, -3:].flip(1)  # naive: top 3 axes, largest first
    with torch.no_grad():
        z = head.proj(maps).double()
    got = F.adaptive_avg_pool2d(z, 2).flatten(2).transpose(1, 2).reshape(-1, 3)
    signs = torch.sign((got * expected).sum(0))  # eigenvectors are defined up to sign
    torch.testing.assert_close(got * signs, expected, atol=1e-4, rtol=1e-4)
    # Whitening (power 0.5) gives the projected parts unit variance on every axis.
    pca_init(head, maps, power=0.5)
    with torch.no_grad():
        white = F.adaptive_avg_pool2d(head.proj(maps).double(), 2).flatten(2)
    variance = white.transpose(1, 2).reshape(-1, 3).var(0, correction=0)
    torch.testing.assert_close(variance, torch.ones(3, dtype=torch.float64), atol=1e-3, rtol=1e-3)


def test_pca_init_refuses_a_head_less_model_and_wrong_channels() -> None:
    with pytest.raises(ValueError, match="head-less"):
        pca_init(EmbeddingHead(8, dim=None, grid=2), torch.randn(4, 8, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, 8, h, w\)"):
        pca_init(EmbeddingHead(8, dim=2, grid=2), torch.randn(4, 5, 4, 4))


def test_cached_views_are_the_test_crop_then_random_crops(cub_dev: Path) -> None:
    images = read_dataset(cub_dev, "cub", "1").records[:3]
    spec = Preprocessing(resize=80, crop=64)
    backbone = create_backbone("mobilenet_v2", weights=None).eval()
    prefix = body_sequence(backbone)[:4]
    torch.manual_seed(0)
    maps = cache_maps(prefix, images, spec, 2, torch.device("cpu"), 2, 0, train_transform(spec))
    assert maps.shape[:2] == (3, 3)
    assert maps.dtype == torch.float16
    pixels, _ = next(iter(batches(images, spec, 3)))
    with torch.no_grad():
        torch.testing.assert_close(maps[0].float(), prefix(pixels), atol=2e-2, rtol=1e-2)
    assert not torch.equal(maps[1], maps[0])
    assert not torch.equal(maps[2], maps[1])
