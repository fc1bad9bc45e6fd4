"""Training on cached feature maps: the frozen early backbone runs once per image and view.

The backbone body is a sequence of stages; :func:`last_stage_start` finds where its last stage
(the modules at the final stride) begins. The modules before it are frozen and run once: their
maps of every training image, for the test-time crop and for ``views`` random crops with flips
(the published augmentation), and of every validation image, are kept in memory as float16.
Training then runs only the rest (the last stage and the head) on those maps, which costs a
fraction of a whole forward and backward pass: most of fine-tuning's gain, minutes on a CPU.
The head can start from a PCA of the backbone's part features, so that training starts from
the ImageNet features' own geometry rather than a random projection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from model.backbones import Backbone
from model.config import Preprocessing
from model.datasets import Record
from model.loading import ImageFiles
from model.network import EmbeddingHead

PCA_POWER = 0.25


def body_sequence(backbone: Backbone) -> nn.Sequential:
    body = backbone.body
    if not isinstance(body, nn.Sequential):
        raise TypeError(f"{backbone.name}: its body is not an nn.Sequential; it cannot be split")
    return body


@torch.no_grad()
def last_stage_start(backbone: Backbone, size: int = 64) -> int:
    """Index of the first module of ``backbone.body`` whose output has the final stride."""
    body = body_sequence(backbone)
    param = next(body.parameters())
    x = torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device)
    was_training = body.training
    body.eval()
    sizes = []
    for module in body:
        x = module(x)
        sizes.append(x.shape[-1])
    body.train(was_training)
    return sizes.index(sizes[-1])


@torch.inference_mode()
def cache_maps(
    prefix: nn.Module,
    records: Sequence[Record],
    spec: Preprocessing,
    views: int,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    transform: Callable[[object], torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """maps: (1 + views, N, C, h, w) float16 on the CPU: ``prefix`` applied to the test-time
    crop of every record (view 0), then to ``views`` passes of ``transform`` (random crops)."""
    prefix = prefix.to(device).eval()
    out = []
    for view in range(1 + views):
        data = ImageFiles(records, spec, transform if view else None)
        maps = []
        for pixels, _ in DataLoader(data, batch_size=batch_size, num_workers=workers):
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                maps.append(prefix(pixels.to(device)).half().cpu())
            if progress is not None:
                progress(len(pixels))
        out.append(torch.cat(maps))
    return torch.stack(out)


@torch.no_grad()
def pca_init(
    head: EmbeddingHead, features: torch.Tensor, power: float = PCA_POWER, chunk: int = 256
) -> None:
    """Set ``head``'s 1x1 projection to a PCA of the part features it will see.

    features: (N, C, h, w), the maps that enter the head. Part vectors (grid-pooled, as the head
    pools) are centred and projected on their first D principal axes, each scaled by
    ``eigenvalue ** -power`` (0: plain PCA, 0.5: full whitening). The projection is affine, so
    it commutes with the head's average pooling and becomes the convolution's weight and bias.
    """
    proj = head.proj
    if not isinstance(proj, nn.Conv2d):
        raise ValueError("a head-less model has no projection to initialise")
    dim, channels = proj.out_channels, proj.in_channels
    if features.shape[1] != channels:
        raise ValueError(f"features must be (N, {channels}, h, w), got {tuple(features.shape)}")
    total = torch.zeros(channels, dtype=torch.float64)
    outer = torch.zeros(channels, channels, dtype=torch.float64)
    count = 0
    for start in range(0, len(features), chunk):
        pooled = F.adaptive_avg_pool2d(features[start : start + chunk].double(), head.grid)
        x = pooled.flatten(2).transpose(1, 2).reshape(-1, channels)  # (n * R, C)
        total += x.sum(0)
        outer += x.T @ x
        count += len(x)
    if count <= dim:
        raise ValueError(f"PCA to {dim} dimensions needs more than {dim} part vectors, got {count}")
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    values, vectors = values.flip(0)[:dim], vectors.flip(1)[:, :dim]
    scale = values.clamp_min(values[0] * 1e-6).pow(-power)
    weight = (vectors * scale).T  # (D, C)
    proj.weight.copy_(weight[:, :, None, None].to(proj.weight.dtype))
    if proj.bias is not None:
        proj.bias.copy_((-(weight @ mean)).to(proj.bias.dtype))
