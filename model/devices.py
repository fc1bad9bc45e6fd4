"""Devices named by users (``--device``, ``DIML_DEVICE``): checked once, for every command."""

from __future__ import annotations

import torch


def parse_device(name: str) -> torch.device:
    """A torch device that exists here, or ValueError saying what does."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: use cpu, cuda or cuda:N")
    return device
