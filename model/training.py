"""Training: class-balanced batches, a DIML or global loss, Adam, validation-based selection.

Two modes:

- full fine-tuning: RandomResizedCrop + horizontal flip (the published augmentations), the
  whole network trained (batch-norm statistics frozen, as usual in metric learning), mixed
  precision on CUDA;
- ``freeze_backbone``: the backbone's feature maps of every training and validation image are
  computed once (test-time preprocessing) and kept in memory; only the 1x1 head trains, with
  horizontal flips of the cached maps as augmentation. Minutes on a CPU.

After each epoch the model is evaluated on the *validation* classes (never the test classes)
and the best epoch by re-ranked MAP@R is kept. A run folder holds ``last.safetensors`` and
``state.pt`` (optimiser, epoch, random states: ``--resume`` continues from them),
``best.safetensors`` (the selected model, which ``diml evaluate/explain/index --checkpoint``
take), ``run.json`` (the settings) and ``log.jsonl`` (one JSON line per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig, Preprocessing
from model.datasets import ImageSet, Record
from model.evaluation import ImageFiles, batches, embed_records, evaluate_embeddings
from model.network import Embedding, EmbeddingNet, create_model

log = logging.getLogger(__name__)

SELECT_METRIC = ("reranked", "map@r")
# The DIML losses on structural similarity, then the global baselines (model.losses).
LOSSES = ("ms-diml", "margin-diml", "ms", "margin", "contrastive", "triplet")


class TrainingError(ValueError):
    """A run cannot start or resume as asked; the message says why and what to do."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run (saved as ``run.json``; a resumed run must match it)."""

    loss: str = "ms-diml"
    epochs: int = 20
    batch_size: int = 64
    per_class: int = 4
    lr: float = 1e-5
    head_lr: float = 1e-3
    weight_decay: float = 4e-4
    freeze_backbone: bool = False
    seed: int = 0
    rerank_k: int = 100
    batches_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise TrainingError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.per_class < 2 or self.batch_size < 2 * self.per_class:
            raise TrainingError(
                "a batch needs at least two classes of at least two images each: "
                f"got --batch-size {self.batch_size} --per-class {self.per_class}"
            )
        if self.epochs < 1:
            raise TrainingError(f"--epochs must be >= 1, got {self.epochs}")


class ClassBalancedBatches:
    """Batches of ``batch_size // per_class`` random classes with ``per_class`` images each.

    Each class's images are drawn from a shuffled queue that refills when empty, so an epoch
    sees every image about once; an epoch has ``len(labels) // batch_size`` batches unless told.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        batch_size: int,
        per_class: int,
        seed: int = 0,
        batches_per_epoch: int | None = None,
    ) -> None:
        # A class with one image has no positive pair: it is left out of the batches.
        members = [
            (labels == c).nonzero().flatten().tolist() for c in torch.unique(labels).tolist()
        ]
        self.by_class = [m for m in members if len(m) >= 2]
        if len(self.by_class) < 2:
            raise TrainingError("training needs at least two classes with two or more images")
        self.classes_per_batch = min(batch_size // per_class, len(self.by_class))
        self.per_class = per_class
        self.length = batches_per_epoch or max(1, len(labels) // batch_size)
        self.rng = random.Random(seed)
        self.queues: list[list[int]] = [[] for _ in self.by_class]

    def __len__(self) -> int:
        return self.length

    def _draw(self, c: int) -> list[int]:
        out: list[int] = []
        while len(out) < self.per_class:
            if not self.queues[c]:
                self.queues[c] = self.rng.sample(self.by_class[c], len(self.by_class[c]))
            pick = self.queues[c].pop()
            if pick not in out or len(self.by_class[c]) < self.per_class:
                out.append(pick)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.length):
            classes = self.rng.sample(range(len(self.by_class)), self.classes_per_batch)
            yield [i for c in classes for i in self._draw(c)]

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "queues": self.queues}

    def restore(self, state: dict[str, Any]) -> None:
        rng = state["rng"]
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self.queues = [list(q) for q in state["queues"]]


def train_transform(spec: Preprocessing) -> Callable[[Any], torch.Tensor]:
    """The published training augmentation: RandomResizedCrop(crop) + horizontal flip."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(spec.crop, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec.mean), list(spec.std)),
        ]
    )


@torch.inference_mode()
def feature_maps(
    model: EmbeddingNet,
    records: Sequence[Record],
    device: torch.device,
    batch_size: int,
    workers: int,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Backbone feature maps (N, C, h, w) in float16 on the CPU, at test-time preprocessing."""
    maps = []
    backbone = model.backbone.to(device).eval()
    for pixels, _ in batches(records, model.config.preprocessing, batch_size, workers):
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            maps.append(backbone(pixels.to(device)).half().cpu())
        if progress is not None:
            progress(len(pixels))
    return torch.cat(maps)


def progress_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar counting images (a no-op when not ``enabled``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled)


def freeze_batch_norm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@dataclass
class Run:
    """A training run's folder and what it holds."""

    folder: Path

    @property
    def last(self) -> Path:
        return self.folder / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.folder / "best.safetensors"

    @property
    def state(self) -> Path:
        return self.folder / "state.pt"

    @property
    def settings(self) -> Path:
        return self.folder / "run.json"

    @property
    def log(self) -> Path:
        return self.folder / "log.jsonl"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class Trainer:
    """Trains ``model_config`` on ``train`` and selects epochs on ``val``; see the module doc."""

    def __init__(
        self,
        model_config: ModelConfig,
        config: TrainConfig,
        train: ImageSet,
        val: ImageSet,
        out: Path,
        device: torch.device,
        backbone_weights: str | Path | None = "imagenet",
        workers: int = 0,
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        if model_config.dim is None:
            raise TrainingError("training needs a head: give --dim (e.g. 128)")
        if set(train.classes) & set(val.classes):
            overlap = sorted(set(train.classes) & set(val.classes))
            raise TrainingError(f"training and validation share classes {overlap[:10]}")
        self.config, self.train_set, self.val_set = config, train, val
        self.device, self.workers, self.show_progress = device, workers, progress
        self.run = Run(Path(out))
        settings = {
            "model": dataclasses.asdict(model_config),
            "train": dataclasses.asdict(config),
            "train_classes": train.classes,
            "val_classes": val.classes,
            "dataset": train.name,
        }
        self.epoch = 0
        self.best_value = -math.inf
        if resume:
            self._check_resumable(settings)
            self.model = load_checkpoint(self.run.last, device=device)
        else:
            if self.run.state.exists() or self.run.settings.exists():
                raise TrainingError(
                    f"{self.run.folder} already holds a run; pass --resume to continue it or "
                    "choose another --out"
                )
            self.run.folder.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(config.seed)
            self.model = create_model(model_config, backbone_weights).to(device)
            _write_json_atomic(self.run.settings, settings)
        from model.losses import make_criterion  # pytorch-metric-learning: the train extra

        self.criterion = make_criterion(config.loss, self.model.dim, model_config.matching)
        self.criterion.loss.to(device)
        if config.freeze_backbone:
            self.model.backbone.requires_grad_(False)
        groups = [{"params": self.model.head.parameters(), "lr": config.head_lr}]
        if not config.freeze_backbone:
            groups.append({"params": self.model.backbone.parameters(), "lr": config.lr})
        self.optimizer = torch.optim.Adam(groups, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
        self.sampler = ClassBalancedBatches(
            train.labels, config.batch_size, config.per_class, config.seed, config.batches_per_epoch
        )
        if resume:
            self._restore()
        self._cache: dict[str, torch.Tensor] = {}

    def _check_resumable(self, settings: dict[str, Any]) -> None:
        if not (self.run.state.exists() and self.run.last.exists() and self.run.settings.exists()):
            raise TrainingError(
                f"nothing to resume in {self.run.folder}: it needs run.json, state.pt and "
                "last.safetensors; start without --resume"
            )
        saved = json.loads(self.run.settings.read_text())
        mine = json.loads(json.dumps(settings))
        saved["train"].pop("epochs", None)
        mine["train"].pop("epochs", None)
        if saved != mine:
            changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise TrainingError(
                f"{self.run.settings} was made with other settings ({', '.join(changed)} differ); "
                "resume with the same settings (only --epochs may change)"
            )

    def _restore(self) -> None:
        state = torch.load(self.run.state, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.restore(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch = int(state["epoch"])
        self.best_value = float(state["best_value"])

    def _save(self) -> None:
        save_checkpoint(self.model, self.run.last)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "best_value": self.best_value,
        }
        tmp = self.run.state.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.run.state)

    def _maps(self, name: str, records: Sequence[Record]) -> torch.Tensor:
        if name not in self._cache:
            desc = f"caching {name} features"
            with progress_bar(len(records), desc, self.show_progress) as bar:
                self._cache[name] = feature_maps(
                    self.model, records, self.device, 64, self.workers, bar.update
                )
        return self._cache[name]

    def fit(self, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train up to ``config.epochs``; returns the last epoch's log entry."""
        entry: dict[str, Any] = {}
        if self.config.freeze_backbone:  # cache before the clock starts
            self._maps("train", self.train_set.records)
            self._maps("val", self.val_set.records)
        while self.epoch < self.config.epochs:
            started = time.perf_counter()
            loss, seen = self._train_epoch()
            seconds = time.perf_counter() - started
            val = self.validate()
            self.epoch += 1
            value = val[SELECT_METRIC[0]][SELECT_METRIC[1]]
            improved = value > self.best_value
            if improved:
                self.best_value = value
                save_checkpoint(self.model, self.run.best)
            self._save()
            entry = {
                "epoch": self.epoch,
                "loss": loss,
                "train_seconds": round(seconds, 2),
                "images_per_second": round(seen / seconds, 1),
                "val": val,
                "selected": improved,
            }
            with self.run.log.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            if on_epoch is not None:
                on_epoch(entry)
        return entry

    def _train_epoch(self) -> tuple[float, int]:
        self.model.train()
        freeze_batch_norm(self.model)
        if self.config.freeze_backbone:
            self.model.backbone.eval()
            maps = self._maps("train", self.train_set.records)
            steps: Iterator[tuple[torch.Tensor, torch.Tensor]] = (
                (maps[index].to(self.device), index) for index in map(torch.tensor, self.sampler)
            )
        else:
            steps = self._image_batches()
        labels = self.train_set.labels
        total, count, seen = torch.zeros((), device=self.device), 0, 0
        desc = f"epoch {self.epoch + 1}/{self.config.epochs}"
        with progress_bar(len(self.sampler), desc, self.show_progress) as bar:
            for inputs, index in steps:
                loss = self._step(inputs, labels[index].to(self.device))
                total += loss.detach()
                count += 1
                seen += len(index)
                bar.update(1)
        return round(float(total) / max(count, 1), 5), seen

    def _image_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = ImageFiles(
            self.train_set.records,
            self.model.config.preprocessing,
            train_transform(self.model.config.preprocessing),
        )
        order = list(self.sampler)
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=order, num_workers=self.workers, pin_memory=False
        )
        for (pixels, _), index in zip(loader, order, strict=True):
            yield pixels.to(self.device, non_blocking=True), torch.tensor(index)

    def _step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=cuda):
            if self.config.freeze_backbone:
                flip = torch.rand(len(inputs), device=inputs.device) < 0.5
                inputs = torch.where(flip[:, None, None, None], inputs.flip(-1), inputs)
                embedding: Embedding = self.model.head(inputs.float())
            else:
                embedding = self.model(inputs)
        loss = self.criterion(Embedding(embedding.parts.float(), embedding.vector.float()), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss

    @torch.inference_mode()
    def validate(self) -> dict[str, Any]:
        """Global and re-ranked retrieval metrics on the validation classes."""
        self.model.eval()
        if self.config.freeze_backbone:
            maps = self._maps("val", self.val_set.records)
            parts, vectors = [], []
            for start in range(0, len(maps), 256):
                e = self.model.head(maps[start : start + 256].to(self.device).float())
                parts.append(e.parts.half().cpu())
                vectors.append(e.vector.cpu())
            embedding = Embedding(torch.cat(parts), torch.cat(vectors))
        else:
            embedding, _ = embed_records(
                self.model, self.val_set.records, self.device, 64, self.workers
            )
        report = evaluate_embeddings(
            embedding,
            self.val_set,
            None,
            self.model.config.grid,
            self.config.rerank_k,
            self.model.config.matching,
            self.device,
            keypoints=False,
            deletion=False,
        )
        return {k: report[k] for k in ("global", "reranked")}
