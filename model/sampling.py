"""Class-balanced batches for metric learning: a few classes per batch, a few images per class."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch


class SamplingError(ValueError):
    """The labels cannot make the batches asked for; the message says why."""


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
            raise SamplingError("training needs at least two classes with two or more images")
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
