"""``diml train``, ``diml evaluate`` and ``diml calibrate``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from model.backbones import BackboneWeightsError
from model.calibration import WEIGHTS
from model.checkpoint import CheckpointError, load_model, save_checkpoint
from model.cli import EXIT_USAGE, add_inference_argument
from model.config import ModelConfig
from model.datasets import READERS, DatasetError, ImageSet, read_dataset
from model.devices import parse_device
from model.images import ImageLoadError
from model.network import EmbeddingNet, create_model, default_config

KNOWN_ERRORS = (
    DatasetError,
    CheckpointError,
    BackboneWeightsError,
    ImageLoadError,
    ValueError,
    FileNotFoundError,
)


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="the data set's root folder")
    p.add_argument(
        "--dataset",
        choices=sorted(READERS),
        help="its layout (default: guessed from its files; a folder per class otherwise)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument(
        "--workers", type=int, default=0, help="image decoding processes (default 0: in-process)"
    )
    p.add_argument(
        "--rerank-k",
        type=int,
        default=100,
        help="how many of the global top candidates structural matching re-ranks (default 100)",
    )


def add_training(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_train(commands)
    add_evaluate(commands)
    add_calibrate(commands)


def add_calibrate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "calibrate",
        help="choose the weight of the structural term in the score on validation classes",
        description="Ranks every image of the given (validation) classes against the others, "
        "re-ranks each global top-K with score = global + w x structural for each w of "
        f"{', '.join(f'{w:g}' for w in WEIGHTS)}, and prints Recall@1 and MAP@R for each. The "
        "chosen w maximises Recall@1 + MAP@R (the smaller w on a tie); --out writes the model "
        "with it. diml train calibrates its checkpoints itself; never calibrate on test classes.",
    )
    _data_arguments(p)
    p.add_argument("--classes", required=True, help="validation class range, e.g. 16-20")
    _model_arguments(p)
    p.add_argument("--out", type=Path, help="write the model with the chosen weight here")
    p.set_defaults(run=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from model.calibration import calibrate
    from model.loading import embed_records
    from model.training import progress_bar

    try:
        device, images, model = _model_and_images(args)
        with progress_bar(len(images), "embedding", sys.stderr.isatty()) as bar:
            embedding, _ = embed_records(
                model,
                images.records,
                device,
                args.batch_size,
                args.workers,
                bar.update,
                args.inference,
            )
        result = calibrate(embedding, images.labels, args.rerank_k, model.config.matching, device)
    except KNOWN_ERRORS as e:
        print(f"diml calibrate: {e}", file=sys.stderr)
        return EXIT_USAGE
    g = result.global_metrics
    print(f"{images.name} classes {args.classes}: {len(images)} images, top {args.rerank_k}")
    print(f"  {'global':>12}  R@1 {g['recall@1']:6.2f}  MAP@R {g['map@r']:6.2f}")
    for weight, m in result.reranked.items():
        mark = "  <- chosen" if weight == result.weight else ""
        print(f"  w = {weight:<8g}  R@1 {m['recall@1']:6.2f}  MAP@R {m['map@r']:6.2f}{mark}")
    print(
        f"structural weight: {result.weight:g} "
        f"(the model had {model.config.matching.structural_weight:g})"
    )
    related, close = result.bands
    print(f"verdict bands: close at score >= {close:.4f}, related at >= {related:.4f}")
    if args.out is not None:
        config = model.config.with_structural_weight(result.weight, result.bands)
        save_checkpoint(model, args.out, config)
        print(f"wrote {args.out}")
    return 0


def add_evaluate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "evaluate",
        help="retrieval metrics, keypoint transfer and a deletion check on a labelled set",
        description="Every image queries all the others. Prints Recall@1/2/4/8, R-Precision and "
        "MAP@R for the global ranking and after structural re-ranking of the top-K; on CUB also "
        "PCK@0.1/0.2 of keypoints carried by the flow, by nearest features and by the identity; "
        "and how much dropping the 3 most contributing query parts lowers the structural "
        "similarity, against 3 random parts; and how much greying out the 3 query regions that "
        "contribute most to the whole score of each query's top hit (the explanation's totals) "
        "lowers that score, against 3 random regions.",
    )
    _data_arguments(p)
    p.add_argument("--classes", help="class range, e.g. 21-30 (default: all classes)")
    _model_arguments(p)
    p.add_argument(
        "--deletion-queries",
        type=int,
        help="run the greying-out check on this many queries, evenly spaced (default: every "
        "image; 0: skip it)",
    )
    p.add_argument("--json", type=Path, dest="json_out", help="also write the report here")
    p.set_defaults(run=run_evaluate)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """The model that ``evaluate`` and ``calibrate`` embed the images with."""
    p.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: default model)")
    p.add_argument(
        "--grid",
        type=int,
        help="parts per side of the default model (default 4; a checkpoint fixes its own)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    add_inference_argument(p)


def run_evaluate(args: argparse.Namespace) -> int:
    from model.evaluation import evaluate
    from model.training import progress_bar

    try:
        device, images, model = _model_and_images(args)
        with progress_bar(len(images), "embedding", sys.stderr.isatty()) as bar:
            report = evaluate(
                model,
                images,
                rerank_k=args.rerank_k,
                device=device,
                batch_size=args.batch_size,
                workers=args.workers,
                progress=bar.update,
                runtime=args.inference,
                deletion_queries=args.deletion_queries,
            )
    except KNOWN_ERRORS as e:
        print(f"diml evaluate: {e}", file=sys.stderr)
        return EXIT_USAGE
    report = rounded(report)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report, images.name, args.classes))
    return 0


def _model_and_images(args: argparse.Namespace) -> tuple[torch.device, ImageSet, EmbeddingNet]:
    """The device, the images of ``--classes`` and the model that ``evaluate`` and
    ``calibrate`` work on."""
    device = parse_device(args.device)
    images = read_dataset(args.data, args.dataset, args.classes)
    return device, images, _evaluated_model(args.checkpoint, args.grid, device)


def _evaluated_model(
    checkpoint: Path | None, grid: int | None, device: torch.device
) -> EmbeddingNet:
    if grid is None:
        return load_model(checkpoint, device=device)
    if checkpoint is not None:
        raise ValueError("--grid is for the default model; a checkpoint has its own grid")
    config = dataclasses.replace(default_config(), grid=grid)
    return create_model(config).to(device).eval()


def rounded(value: Any, digits: int = 2) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def format_report(report: dict[str, Any], name: str, classes: str | None) -> str:
    """The report as a short table (percentages)."""
    metrics = list(report["global"])
    lines = [
        f"{name} classes {classes or 'all'}: {report['n_queries']} queries, re-ranking the top "
        f"{report['rerank_k']} by global + {report.get('structural_weight', 1):g} x structural, "
        f"grid {report.get('grid', '?')}",
        "  " + " " * 9 + "".join(f"{m:>12}" for m in metrics),
    ]
    for section in ("global", "reranked", "reranked_published"):
        if section in report:
            row = "".join(f"{report[section][m]:12.2f}" for m in metrics)
            name = "w = 1" if section == "reranked_published" else section
            lines.append(f"  {name:<9}{row}")
    if "pck" in report:
        pck = report["pck"]
        alphas = "/".join(f"{a:g}" for a in pck["alpha"])
        lines.append(f"  PCK@{alphas} over {pck['n_keypoints']} keypoints:")
        for method in ("flow", "flow_mean", "nearest", "identity"):
            values = " / ".join(f"{v:.2f}" for v in pck[method])
            lines.append(f"    {method:<10} {values}")
    if "deletion" in report:
        d = report["deletion"]
        lines.append(
            f"  deletion: dropping the 3 top parts lowers SS by {d['top_parts_drop']:.2f}%, "
            f"3 random parts by {d['random_parts_drop']:.2f}%"
        )
        if "ranking_score" in d:
            g = d["ranking_score"]
            lines.append(
                f"  deletion: greying out the 3 top regions lowers the score by "
                f"{g['top_drop']:.2f}%, 3 random regions by {g['random_drop']:.2f}% "
                f"({g['pairs']} queries and their top hit)"
            )
    lines.append(f"  {report['seconds']:.1f} s")
    return "\n".join(lines)


def add_train(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from model.config import LOSSES
    from model.training import HEAD_INITS, PRECISIONS, TRAINABLE, TrainConfig

    defaults = TrainConfig()
    p = commands.add_parser(
        "train",
        help="train the embedding head (or the whole network) with a DIML or global loss",
        description="Train on one class range and select epochs on another (never the test "
        "classes). Writes OUT/best.safetensors (the selected model), last.safetensors and "
        "state.pt (for --resume), run.json and log.jsonl (one JSON line per epoch).",
    )
    _data_arguments(p)
    p.add_argument("--classes", required=True, help="training class range, e.g. 1-20")
    p.add_argument("--val-classes", required=True, help="validation class range, e.g. 21-25")
    p.add_argument("--out", type=Path, required=True, help="the run folder")
    p.add_argument("--loss", choices=LOSSES, default=defaults.loss)
    p.add_argument(
        "--train",
        choices=TRAINABLE,
        default=defaults.train,
        help="what trains: all = the whole network on freshly augmented images (default; about "
        "17 minutes for 837 photos on 2 CPU cores with bfloat16), tail = the backbone's last "
        "stage and the head on cached maps of the frozen rest (a few minutes), head = the head "
        "alone on cached maps",
    )
    p.add_argument(
        "--freeze-backbone",
        action="store_const",
        const="head",
        dest="train",
        help="the same as --train head",
    )
    p.add_argument(
        "--views",
        type=int,
        default=defaults.views,
        help=f"random crops cached per training image for tail/head (default {defaults.views})",
    )
    p.add_argument(
        "--head-init",
        choices=HEAD_INITS,
        default=defaults.head_init,
        help="pca: the head starts from a PCA of the backbone's part features (default)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="mixed (default): float16 autocast on CUDA, bfloat16 on a CPU with native bfloat16 "
        "(AVX512-BF16 or AMX), float32 elsewhere; fp32: float32 everywhere",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="default: 30 for --train all, 20 for tail and head",
    )
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--per-class", type=int, default=defaults.per_class, help="images per class")
    p.add_argument("--lr", type=float, default=defaults.lr, help="backbone learning rate")
    p.add_argument("--head-lr", type=float, default=defaults.head_lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--batches-per-epoch", type=int, help="default: images // batch size")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--backbone", choices=("mobilenet_v2", "resnet50"), default="mobilenet_v2")
    p.add_argument(
        "--backbone-weights",
        type=Path,
        help="ImageNet weights file for the backbone (default: the offline MobileNetV2 file, or "
        "torchvision's download for resnet50)",
    )
    p.add_argument(
        "--dim",
        type=int,
        default=ModelConfig.dim,
        help="part and global vector dimension (default %(default)s: 12.9 KB an index keeps per "
        "photo at 4 x 4; 128 for a compact model, 3.7 KB, 1.8 points of MAP@R lower)",
    )
    p.add_argument(
        "--grid", type=int, default=ModelConfig.grid, help="parts per side (default %(default)s)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from model.training import TrainConfig, Trainer, TrainingError

    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        print(
            "diml train: the training losses need pytorch-metric-learning; install it with "
            "pip install 'diml-retrieval[train]' (or scripts/setup.sh, which does)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        device = parse_device(args.device)
        train = read_dataset(args.data, args.dataset, args.classes)
        val = read_dataset(args.data, args.dataset, args.val_classes)
        config = TrainConfig(
            loss=args.loss,
            epochs=args.epochs,
            batch_size=args.batch_size,
            per_class=args.per_class,
            lr=args.lr,
            head_lr=args.head_lr,
            weight_decay=args.weight_decay,
            train=args.train,
            views=args.views,
            head_init=args.head_init,
            precision=args.precision,
            seed=args.seed,
            rerank_k=args.rerank_k,
            batches_per_epoch=args.batches_per_epoch,
        )
        model_config = ModelConfig(backbone=args.backbone, dim=args.dim, grid=args.grid)
        trainer = Trainer(
            model_config,
            config,
            train,
            val,
            args.out,
            device,
            backbone_weights=args.backbone_weights or "imagenet",
            workers=args.workers,
            resume=args.resume,
            progress=not args.quiet and sys.stderr.isatty(),
        )
        print(
            f"training {args.loss} on {train.name} classes {args.classes} ({len(train)} images), "
            f"selecting on classes {args.val_classes} ({len(val)} images), "
            f"training: {WHAT_TRAINS[args.train]}, on {device}",
            file=sys.stderr,
        )
        trainer.fit(on_epoch=_print_epoch)
    except (TrainingError, *KNOWN_ERRORS) as e:
        print(f"diml train: {e}", file=sys.stderr)
        return EXIT_USAGE
    best = _best_entry(trainer.run.log)
    if best.get("start"):
        print(
            "no epoch beat the starting model on the validation classes; "
            f"{trainer.run.best} is the start (the backbone's own features, head-less)"
        )
    else:
        print(
            f"best: epoch {best['epoch']} by validation R@1 + MAP@R (re-ranked, structural "
            f"weight {best['val']['structural_weight']:g}): {trainer.run.best}"
        )
    return 0


def _best_entry(log: Path) -> dict[str, Any]:
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [e for e in entries if e["selected"]][-1]


WHAT_TRAINS = {
    "tail": "the backbone's last stage and the head, on cached maps",
    "head": "the head only, on cached maps",
    "all": "the whole network",
}


def _print_epoch(entry: dict[str, Any]) -> None:
    val = entry["val"]
    g, r = val["global"], val["reranked"]
    what = (
        "start (the backbone's own features, head-less)"
        if entry.get("start")
        else f"epoch {entry['epoch']}: loss {entry['loss']:.4f}, {entry['images_per_second']} img/s"
    )
    print(
        f"{what}; val R@1 {g['recall@1']:.2f} -> {r['recall@1']:.2f} re-ranked, "
        f"MAP@R {g['map@r']:.2f} -> {r['map@r']:.2f} (structural weight "
        f"{val['structural_weight']:g}){'  (kept)' if entry['selected'] else ''}",
        flush=True,
    )
