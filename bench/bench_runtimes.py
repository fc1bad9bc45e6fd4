"""The default backbone's forward pass on the CPU, by runtime: milliseconds per image.

    .venv/bin/python bench/bench_runtimes.py [--compile]

Eager PyTorch, TorchScript traced and frozen (oneDNN fusions), ONNX Runtime (the service's
default on a CPU, model.runtime), OpenVINO on the same exported graph when it is installed
(``pip install openvino``; not a dependency), and with ``--compile`` torch.compile (about a
minute of compilation first). Random pixels, batch 1 and 16, threads as torch has them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from model import load_model
from model.runtime import OnnxBackbone


def ms_per_image(forward: Callable[[torch.Tensor], object], batch: int) -> float:
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        forward(pixels)
        forward(pixels)
        start = time.perf_counter()
        for _ in range(5):
            forward(pixels)
    return (time.perf_counter() - start) / 5 / batch * 1000


def _openvino(backbone: torch.nn.Module) -> dict[str, Callable[[torch.Tensor], object]]:
    """OpenVINO at full float32 precision and at its CPU default (a lower-precision hint)."""
    try:
        import openvino
    except ImportError:
        return {}
    graph = OnnxBackbone._export(backbone, 224)
    core = openvino.Core()
    threads = torch.get_num_threads()
    out: dict[str, Callable[[torch.Tensor], object]] = {}
    for name, hint in (("OpenVINO, f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("OpenVINO", {})):
        compiled = core.compile_model(
            core.read_model(graph), "CPU", {"INFERENCE_NUM_THREADS": threads, **hint}
        )
        out[name] = _numpy_call(compiled)
    return out


def _numpy_call(compiled: Any) -> Callable[[torch.Tensor], object]:
    def forward(pixels: torch.Tensor) -> object:
        return compiled(pixels.numpy())[0]

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--compile", action="store_true", help="also torch.compile")
    args = parser.parse_args()
    model = load_model().eval()
    backbone = model.backbone
    example = torch.zeros(1, 3, 224, 224)
    with torch.inference_mode():
        frozen = torch.jit.freeze(torch.jit.trace(backbone, example))
    runtimes: dict[str, Callable[[torch.Tensor], object]] = {
        "PyTorch eager": backbone,
        "TorchScript, frozen": frozen,
        "ONNX Runtime": OnnxBackbone(backbone, "bench", 224),
    }
    runtimes.update(_openvino(backbone))
    if args.compile:
        runtimes["torch.compile"] = torch.compile(backbone)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MobileNetV2 features")
    print(f"  {'runtime':22} {'batch 1':>9} {'batch 16':>9}   ms per image")
    for name, forward in runtimes.items():
        print(f"  {name:22} {ms_per_image(forward, 1):9.2f} {ms_per_image(forward, 16):9.2f}")


if __name__ == "__main__":
    main()
