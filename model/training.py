"""Training: class-balanced batches, a DIML or global loss, Adam, validation-based selection.

What trains (``TrainConfig.train``):

- ``all`` (the default, 30 epochs): the whole network on freshly augmented images each epoch
  (RandomResizedCrop + flip, as published; batch-norm statistics frozen; mixed precision:
  float16 on CUDA, bfloat16 on a CPU that has it). About 17 minutes for 837 photos on 2 cores;
- ``tail`` (20 epochs): the backbone's last stage and the head, on cached maps of the frozen
  earlier stages (``model.feature_cache``): the test-time crop and ``views`` random crops with
  flips of every training image. A few minutes on a CPU;
- ``head`` (20 epochs): only the 1x1 head, on cached maps of the whole frozen backbone.

The head starts from a PCA of the backbone's part features (``head_init="pca"``), or at random.

Selection never trusts the training classes and never sees the test classes. Before the first
epoch, the model the run starts from (the backbone's own features, head-less) is evaluated on
the *validation* classes; after each epoch, the trained model is. Each evaluation calibrates the
structural weight of the ranking score on those classes (``model.calibration``) and is scored by
``Recall@1 + MAP@R`` of the calibrated ranking. ``best.safetensors`` always holds the best so
far, starting with the start itself, so it is never worse on the validation classes than the
model the run started from. A run folder also holds ``last.safetensors`` and ``state.pt``
(optimiser, epoch, random states: ``--resume`` continues from them), ``run.json`` (the settings)
and ``log.jsonl`` (one JSON line per evaluation, epoch 0 being the start).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.calibration import calibrate, objective
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import LOSSES, ModelConfig, Preprocessing
from model.datasets import ImageSet
from model.devices import autocast_dtype
from model.feature_cache import body_sequence, cache_maps, last_stage_start, pca_init
from model.files import replacing, write_atomic
from model.loading import ImageFiles, embed_records
from model.network import Embedding, EmbeddingHead, EmbeddingNet, create_model
from model.sampling import ClassBalancedBatches

log = logging.getLogger(__name__)

TRAINABLE = ("tail", "head", "all")
HEAD_INITS = ("pca", "random")
# The whole network keeps improving on the validation classes for longer than the cached recipes.
DEFAULT_EPOCHS = {"all": 30, "tail": 20, "head": 20}
PRECISIONS = ("mixed", "fp32")  # mixed: model.devices.autocast_dtype's, where the device has one


class TrainingError(ValueError):
    """A run cannot start or resume as asked; the message says why and what to do."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run (saved as ``run.json``; a resumed run must match it).

    ``lr`` is the backbone's learning rate (its last stage for ``train="tail"``), ``head_lr`` the
    head's; ``views`` is how many random crops of each training image are cached; ``epochs`` 0
    takes the recipe's own (``DEFAULT_EPOCHS``).
    """

    loss: str = "ms-diml"
    epochs: int = 0
    batch_size: int = 64
    per_class: int = 4
    lr: float = 1e-5
    head_lr: float = 1e-4
    weight_decay: float = 4e-4
    train: str = "all"
    views: int = 6
    precision: str = "mixed"
    head_init: str = "pca"
    seed: int = 0
    rerank_k: int = 100
    batches_per_epoch: int | None = None

    def __post_init__(self) -> None:
        for name, value, known in (
            ("loss", self.loss, LOSSES),
            ("train", self.train, TRAINABLE),
            ("head-init", self.head_init, HEAD_INITS),
            ("precision", self.precision, PRECISIONS),
        ):
            if value not in known:
                raise TrainingError(f"unknown --{name} {value!r}; choose one of {', '.join(known)}")
        if self.per_class < 2 or self.batch_size < 2 * self.per_class:
            raise TrainingError(
                "a batch needs at least two classes of at least two images each: "
                f"got --batch-size {self.batch_size} --per-class {self.per_class}"
            )
        if self.epochs < 0:
            raise TrainingError(
                f"--epochs must be >= 1 (or 0: the recipe's own), got {self.epochs}"
            )
        if self.epochs == 0:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS[self.train])
        if self.views < 0:
            raise TrainingError(f"--views must be >= 0, got {self.views}")

    @property
    def cached(self) -> bool:
        """Whether training runs on cached maps (``tail`` and ``head``) rather than images."""
        return self.train != "all"


def train_transform(spec: Preprocessing) -> Callable[[Any], torch.Tensor]:
    """The published training augmentation: RandomResizedCrop(crop) + horizontal flip.

    torchvision is imported here, not with the module: serving and indexing run without it."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(spec.crop, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec.mean), list(spec.std)),
        ]
    )


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
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


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
        body = body_sequence(self.model.backbone)
        split = {"tail": last_stage_start(self.model.backbone), "head": len(body), "all": 0}
        self.prefix, self.rest = body[: split[config.train]], body[split[config.train] :]
        self.prefix.requires_grad_(False)
        groups = [{"params": self.model.head.parameters(), "lr": config.head_lr}]
        if len(self.rest):
            groups.append({"params": self.rest.parameters(), "lr": config.lr})
        self.optimizer = torch.optim.Adam(groups, weight_decay=config.weight_decay)
        self.autocast = autocast_dtype(device)
        # Only float16 needs its gradients scaled; bfloat16 has float32's range.
        float16 = config.precision == "mixed" and self.autocast == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=float16)
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
        with replacing(self.run.state) as tmp:
            torch.save(state, tmp)

    def _maps(self, name: str) -> torch.Tensor:
        """(1 + views, N, C, h, w) cached prefix maps of the training images; (1, N, ...) of the
        validation images."""
        if name not in self._cache:
            train = name == "train"
            images = self.train_set if train else self.val_set
            views = self.config.views if train else 0
            spec = self.model.config.preprocessing
            desc = f"caching {name} features"
            with progress_bar(len(images) * (1 + views), desc, self.show_progress) as bar:
                self._cache[name] = cache_maps(
                    self.prefix,
                    images.records,
                    spec,
                    views,
                    self.device,
                    workers=self.workers,
                    transform=train_transform(spec),
                    progress=bar.update,
                )
        return self._cache[name]

    def fit(self, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train up to ``config.epochs``; returns the last log entry."""
        if self.config.cached and self.epoch < self.config.epochs:  # before the clock starts
            self._maps("train")
            self._maps("val")
        entry: dict[str, Any] = {}
        if self.epoch == 0 and not self.run.state.exists():
            entry = self._start(on_epoch)
        while self.epoch < self.config.epochs:
            started = time.perf_counter()
            loss, seen = self._train_epoch()
            seconds = time.perf_counter() - started
            self.epoch += 1
            speed = {
                "train_seconds": round(seconds, 2),
                "images_per_second": round(seen / seconds, 1),
            }
            entry = self._select(self.model, on_epoch, loss=loss, **speed)
            self._save()
        return entry

    def _start(self, on_epoch: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        """Epoch 0: the start (the backbone's own features, head-less) becomes the first best;
        then the head is initialised."""
        config = dataclasses.replace(self.model.config, dim=None)
        start = create_model(config, weights=None).to(self.device)
        start.backbone.load_state_dict(self.model.backbone.state_dict())
        entry = self._select(start, on_epoch, start=True)
        if self.config.head_init == "pca":
            pca_init(self.model.head, self._train_features())
        self._save()
        return entry

    def _select(
        self,
        model: EmbeddingNet,
        on_epoch: Callable[[dict[str, Any]], None] | None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Validate ``model``, keep it as best if it is, log the result."""
        val, weight = self.validate(model)
        value = objective(val["reranked"])
        improved = value > self.best_value
        if improved:
            self.best_value = value
            config = model.config.with_structural_weight(weight, tuple(val["score_bands"]))
            save_checkpoint(model, self.run.best, config)
        entry = {"epoch": self.epoch, **fields, "val": val, "selected": improved}
        with self.run.log.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if on_epoch is not None:
            on_epoch(entry)
        return entry

    @torch.inference_mode()
    def _train_features(self) -> torch.Tensor:
        """(N, C, h, w): what enters the head for the training images' test-time crops."""
        if self.config.cached:
            rest = self.rest.eval()
            maps = self._maps("train")[0].split(64)
            return torch.cat([rest(m.to(self.device).float()).cpu() for m in maps])
        backbone = self.model.backbone.eval()
        data = ImageFiles(self.train_set.records, self.model.config.preprocessing)
        loader = torch.utils.data.DataLoader(data, batch_size=64, num_workers=self.workers)
        return torch.cat([backbone(pixels.to(self.device)).float().cpu() for pixels, _ in loader])

    def _train_epoch(self) -> tuple[float, int]:
        self.model.train()
        freeze_batch_norm(self.model)
        self.prefix.eval()
        steps = self._cached_batches() if self.config.cached else self._image_batches()
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

    def _cached_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each image of a batch in one of its cached views, drawn at random."""
        maps = self._maps("train")
        for batch in self.sampler:
            index = torch.tensor(batch)
            view = torch.randint(0, len(maps), (len(index),))
            yield maps[view, index].to(self.device, non_blocking=True), index

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
        dtype = self.autocast if self.config.precision == "mixed" else None
        with torch.autocast(
            self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            embedding: Embedding = self.model.head(self.rest(inputs.float()))
        loss = self.criterion(Embedding(embedding.parts.float(), embedding.vector.float()), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss

    @torch.inference_mode()
    def validate(self, model: EmbeddingNet | None = None) -> tuple[dict[str, Any], float]:
        """Global and calibrated re-ranked metrics of ``model`` (default: the one training) on
        the validation classes, the calibrated structural weight and the verdict's score bands
        (``score_bands``: related, close), and the weight again."""
        model = (model or self.model).eval()
        if self.config.cached:
            maps = self._maps("val")[0]
            rest = body_sequence(model.backbone)[len(self.prefix) :]
            head: EmbeddingHead = model.head
            parts, vectors = [], []
            for start in range(0, len(maps), 256):
                e = head(rest(maps[start : start + 256].to(self.device).float()))
                parts.append(e.parts.half().cpu())
                vectors.append(e.vector.cpu())
            embedding = Embedding(torch.cat(parts), torch.cat(vectors))
        else:
            embedding, _ = embed_records(model, self.val_set.records, self.device, 64, self.workers)
        result = calibrate(
            embedding, self.val_set.labels, self.config.rerank_k, model.config.matching, self.device
        )
        val = {"global": result.global_metrics, "reranked": result.best}
        bands = list(result.bands)
        return {**val, "structural_weight": result.weight, "score_bands": bands}, result.weight
