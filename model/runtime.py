"""The backbone through ONNX Runtime on the CPU: several times faster than eager PyTorch there.

The ONNX graph is exported from the loaded model itself (never shipped beside it, so it cannot
drift from the weights), cached under :func:`cache_dir` by a key of the model's fingerprint and
the library versions, and checked against PyTorch on every load: a graph whose features differ
by more than a tolerance is refused, and the caller falls back to PyTorch with a warning. The
head (a 1 x 1 convolution and pooling) stays in PyTorch. The runtime changes how the features
are computed, not the model: an index's fingerprint is the same under either.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from model.files import write_atomic

log = logging.getLogger(__name__)

Runtime = Literal["auto", "onnx", "torch"]
RUNTIMES: tuple[Runtime, ...] = ("auto", "onnx", "torch")
OPSET = 17
# Largest |ONNX - PyTorch| allowed, relative to the largest |PyTorch| feature (measured on the
# default MobileNetV2: about 1e-6 relative; reordered float32 sums, nothing more).
TOLERANCE = 1e-4


class RuntimeUnavailableError(RuntimeError):
    """ONNX Runtime cannot run this backbone here: not installed, not exportable, or its
    features differ from PyTorch's beyond the tolerance."""


def cache_dir() -> Path:
    """``$DIML_CACHE``, else ``$XDG_CACHE_HOME/diml``, else ``~/.cache/diml``."""
    if configured := os.environ.get("DIML_CACHE"):
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diml"


def choose(runtime: Runtime, device: torch.device) -> Literal["onnx", "torch"]:
    """``auto``: ONNX Runtime on the CPU when it is installed, PyTorch on CUDA, where the
    backbone keeps PyTorch's fp16 autocast (ONNX Runtime's CUDA provider has not been measured
    against it). An explicit ``onnx`` runs ONNX Runtime's CPU provider whatever the device."""
    if runtime == "auto":
        if device.type != "cpu":
            return "torch"
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "torch"
        return "onnx"
    return runtime


class OnnxBackbone:
    """``backbone`` (pixels (N, 3, S, S) -> feature map) run by ONNX Runtime on the CPU."""

    def __init__(
        self,
        backbone: nn.Module,
        key: str,
        size: int,
        threads: int | None = None,
        cache: Path | None = None,
    ) -> None:
        """``key``: what identifies the backbone's weights (the model's fingerprint); ``size``:
        the input's side. Raises :class:`RuntimeUnavailableError` when it cannot be used."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeUnavailableError("onnxruntime is not installed") from e
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = threads or torch.get_num_threads()
        self.options.inter_op_num_threads = 1
        path = self._cached_path(key, size, ort.__version__, cache or cache_dir())
        if path.is_file():
            try:
                self._load(ort, path.read_bytes(), backbone, size)
                return
            except RuntimeUnavailableError as e:  # damaged, or from another build: export anew
                log.warning("exporting the backbone again: the cached %s is unusable: %s", path, e)
                path.unlink(missing_ok=True)
        graph = self._export(backbone, size)
        self._load(ort, graph, backbone, size)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, graph)
        except OSError as e:  # a read-only home: export again next time
            log.info("not caching the ONNX graph at %s: %s", path, e)

    def _load(self, ort: Any, graph: bytes, backbone: nn.Module, size: int) -> None:
        try:
            self.session = ort.InferenceSession(
                graph, self.options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise RuntimeUnavailableError(f"ONNX Runtime refused the graph: {e}") from e
        self._check(backbone, size)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        (features,) = self.session.run(None, {"pixels": array})
        return torch.from_numpy(features)

    @staticmethod
    def _cached_path(key: str, size: int, ort_version: str, cache: Path) -> Path:
        versions = f"{key}|torch {torch.__version__}|onnxruntime {ort_version}|opset {OPSET}"
        name = hashlib.sha256(f"{versions}|{size}".encode()).hexdigest()[:32]
        return cache / "onnx" / f"backbone-{name}.onnx"

    @staticmethod
    def _export(backbone: nn.Module, size: int) -> bytes:
        buffer = io.BytesIO()
        example = torch.zeros(1, 3, size, size)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's notes on its own internals
                torch.onnx.export(
                    backbone.eval().cpu(),
                    (example,),
                    buffer,  # type: ignore[arg-type]  # the TorchScript exporter takes a file
                    input_names=["pixels"],
                    output_names=["features"],
                    dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
                    opset_version=OPSET,
                    dynamo=False,
                )
        except Exception as e:  # the exporter raises many kinds
            raise RuntimeUnavailableError(f"the backbone could not be exported: {e}") from e
        return buffer.getvalue()

    def _check(self, backbone: nn.Module, size: int) -> None:
        """The graph's features against PyTorch's on two fixed random images."""
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(2, 3, size, size, generator=generator)
        with torch.inference_mode():
            expected = backbone.eval().cpu()(pixels)
        got = self(pixels)
        if got.shape != expected.shape:
            raise RuntimeUnavailableError(
                f"ONNX features have shape {tuple(got.shape)}, PyTorch's {tuple(expected.shape)}"
            )
        error = float((got - expected).abs().max())
        scale = float(expected.abs().max()) or 1.0
        if error > TOLERANCE * scale:
            raise RuntimeUnavailableError(
                f"ONNX features differ from PyTorch's by {error:.3g} (largest feature "
                f"{scale:.3g}, tolerance {TOLERANCE:g} of it)"
            )
