"""Would an int8 backbone be good enough? Static quantisation measured on real photos.

    .venv/bin/python bench/int8_check.py --cub ../shared/data/cub-dev [--method MinMax]

Exports the default model's backbone (as the service does), quantises it with ONNX Runtime
(QDQ, per-channel int8 weights, uint8 activations) calibrated on photos of CUB classes 1-20,
then compares it with the float32 graph on the test classes 21-30: Recall@1 and MAP@R of the
global ranking (the default model's ranking) and milliseconds per image at batch 1 and 16.
The service would offer int8 only if both metrics dropped by at most 0.3 points.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from model import Embedding, load_model
from model.datasets import Record, read_dataset
from model.evaluation import rank_all, ranking_depth, retrieval_report
from model.loading import batches
from model.network import EmbeddingNet
from model.runtime import OnnxBackbone


class Photos(CalibrationDataReader):
    def __init__(self, records: list[Record], model: EmbeddingNet) -> None:
        spec = model.config.preprocessing
        self.pixels: Iterator[tuple[torch.Tensor, torch.Tensor]] = batches(records, spec, 16)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.pixels, None)
        return None if batch is None else {"pixels": batch[0].numpy()}


def measure(graph: Path, model: EmbeddingNet, cub: Path) -> tuple[dict[str, float], list[float]]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    test = read_dataset(cub, None, "21-30")
    parts, vectors = [], []
    with torch.inference_mode():
        for pixels, _ in batches(test.records, model.config.preprocessing, 32):
            features = torch.from_numpy(session.run(None, {"pixels": pixels.numpy()})[0])
            embedding = model.head(features)
            parts.append(embedding.parts)
            vectors.append(embedding.vector)
    embedding = Embedding(torch.cat(parts), torch.cat(vectors))
    depth = ranking_depth(test.labels, 100)
    rankings = rank_all(embedding, depth, 100, model.config.matching)
    metrics = retrieval_report(rankings, test.labels)["global"]
    speeds = []
    for n in (1, 16):
        x = np.random.default_rng(0).standard_normal((n, 3, 224, 224)).astype(np.float32)
        session.run(None, {"pixels": x})
        start = time.perf_counter()
        for _ in range(5):
            session.run(None, {"pixels": x})
        speeds.append((time.perf_counter() - start) / 5 / n * 1000)
    return metrics, speeds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cub", type=Path, required=True)
    parser.add_argument("--method", choices=["MinMax", "Percentile", "Entropy"], default="MinMax")
    parser.add_argument("--calibration-images", type=int, default=160)
    args = parser.parse_args()
    model = load_model().eval()
    calibration = read_dataset(args.cub, None, "1-20").records
    step = max(1, len(calibration) // args.calibration_images)
    records = calibration[::step][: args.calibration_images]
    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared, int8 = (Path(tmp) / f"{n}.onnx" for n in ("fp32", "prepared", "int8"))
        fp32.write_bytes(OnnxBackbone._export(model.backbone, model.config.preprocessing.crop))
        quant_pre_process(str(fp32), str(prepared))
        start = time.perf_counter()
        quantize_static(
            str(prepared),
            str(int8),
            Photos(records, model),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, args.method),
        )
        print(
            f"int8 calibrated ({args.method}) on {len(records)} photos of classes 1-20 in "
            f"{time.perf_counter() - start:.0f} s; tested on classes 21-30, global ranking"
        )
        print(
            f"  {'graph':6} {'R@1':>7} {'MAP@R':>7} {'ms/img b1':>10} {'ms/img b16':>11} {'MB':>5}"
        )
        results = {}
        for name, graph in (("fp32", prepared), ("int8", int8)):
            metrics, (b1, b16) = measure(graph, model, args.cub)
            results[name] = metrics
            size = graph.stat().st_size / 1e6
            print(
                f"  {name:6} {metrics['recall@1']:7.2f} {metrics['map@r']:7.2f} {b1:10.2f} "
                f"{b16:11.2f} {size:5.1f}"
            )
    drops = [results["fp32"][m] - results["int8"][m] for m in ("recall@1", "map@r")]
    verdict = "within" if max(drops) <= 0.3 else "beyond"
    print(f"  drop: R@1 {drops[0]:.2f}, MAP@R {drops[1]:.2f} points: {verdict} the 0.3 allowed")


if __name__ == "__main__":
    main()
