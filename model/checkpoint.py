"""Checkpoints: one ``.safetensors`` file holding the weights, the frozen config and a fingerprint.

The fingerprint is the sha256 of the canonical config JSON (less the fields that only present a
score: the verdict's bands) and every tensor's name, dtype, shape and bytes, so it identifies the
model itself, not the file it came in: the same weights saved twice, or the default model built
from the ImageNet file, give the same fingerprint. Index
manifests store it; the service refuses an index whose fingerprint differs from its model's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.backbones import WeightsArg
from model.config import ModelConfig, identity_json
from model.files import replacing
from model.network import EmbeddingNet, create_model, default_config

FORMAT = "diml-checkpoint"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit what was asked for."""


def fingerprint(model: EmbeddingNet) -> str:
    """sha256 hex of the config and all weights and buffers of ``model``."""
    return _fingerprint(model.config.to_json(), model.state_dict())


def _fingerprint(config_json: str, state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(identity_json(config_json).encode())
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    model: EmbeddingNet, path: str | os.PathLike[str], config: ModelConfig | None = None
) -> str:
    """Write ``model`` to ``path`` atomically (aside, fsync, rename); return its fingerprint.

    ``config`` replaces the model's own config in the file; it may differ only in its matching
    settings (e.g. a calibrated structural weight), which do not change the network.
    """
    config = config or model.config
    if dataclasses.replace(config, matching=model.config.matching) != model.config:
        raise ValueError(
            "save_checkpoint: the config may differ from the model's only in matching settings: "
            + "; ".join(config.differences(model.config))
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fp = _fingerprint(config.to_json(), state)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_json(),
        "fingerprint": fp,
    }
    with replacing(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return fp


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The config stored in a checkpoint, without loading its weights."""
    return ModelConfig.from_dict(json.loads(_metadata(Path(path))["config"]))


def load_checkpoint(
    path: str | os.PathLike[str],
    expected: ModelConfig | None = None,
    device: torch.device | str = "cpu",
) -> EmbeddingNet:
    """Rebuild the model saved at ``path`` (in eval mode) and verify its fingerprint.

    ``expected``: when given, the stored config must equal it; the error lists every field that
    differs.
    """
    path = Path(path)
    meta = _metadata(path)
    config = ModelConfig.from_dict(json.loads(meta["config"]))
    if expected is not None and expected != config:
        raise CheckpointError(
            f"{path}: the checkpoint's config differs from the one expected: "
            + "; ".join(config.differences(expected))
            + " (checkpoint value != expected value)"
        )
    state = load_file(str(path))
    model = create_model(config, weights=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).splitlines()[:4])
        raise CheckpointError(f"{path}: the weights do not fit the stored config: {detail}") from e
    # Verified against the config text as stored: a checkpoint written before a config field
    # was added (and so read with that field's default) still checks.
    computed = _fingerprint(meta["config"], model.state_dict())
    if computed != meta["fingerprint"]:
        raise CheckpointError(
            f"{path}: fingerprint mismatch (stored {meta['fingerprint'][:12]}, computed "
            f"{computed[:12]}): the file is corrupt or was edited; re-export it"
        )
    return model.to(device).eval()


def load_model(
    checkpoint: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    backbone_weights: WeightsArg = "imagenet",
) -> EmbeddingNet:
    """A checkpoint when given, else the training-free default (ImageNet MobileNetV2, head-less)."""
    if checkpoint is not None:
        return load_checkpoint(checkpoint, device=device)
    return create_model(default_config(), weights=backbone_weights).to(device).eval()


def _metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a safetensors checkpoint ({e}); give a file written by save_checkpoint"
        ) from e
    if meta.get("format") != FORMAT or "config" not in meta or "fingerprint" not in meta:
        raise CheckpointError(
            f"{path}: a safetensors file, but not a DIML checkpoint (no config or fingerprint in "
            "its metadata); give a file written by save_checkpoint"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')!r}; this release reads "
            f"version {FORMAT_VERSION}"
        )
    return meta
