"""The model's configuration: frozen dataclasses saved inside every checkpoint.

Deployment settings (paths, limits, keys) do not belong here; they live in ``service/``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The training losses by name (model.losses builds them): the DIML losses on structural
# similarity, then the global baselines. Here rather than beside them, so that naming a loss
# (the CLI, TrainConfig) does not import pytorch-metric-learning, the optional train extra.
LOSSES = ("ms-diml", "margin-diml", "ms", "margin", "contrastive", "triplet")


@dataclass(frozen=True)
class Preprocessing:
    """Test-time preprocessing that travels with the weights.

    The image is resized so that its shorter side is ``resize`` pixels (aspect kept), centre-cropped
    to ``crop`` x ``crop`` and normalised with ``mean``/``std`` (RGB, values in [0, 1]).
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop < 32 or self.resize < self.crop:
            raise ValueError(
                f"preprocessing needs 32 <= crop <= resize, got crop={self.crop}, "
                f"resize={self.resize}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("preprocessing mean and std need three values each, std > 0")


@dataclass(frozen=True)
class MatchingConfig:
    """Entropic optimal transport between two part grids (see ``model.optimal_transport``).

    ``epsilon`` is the entropic regularisation on the cost ``1 - S``; ``max_iter`` caps the
    Sinkhorn iterations; the loop stops early once the L1 error of the plan's row marginals is
    below ``tol`` for every pair, checked once per ``check_every`` iterations (one host-device
    synchronisation per check, none per iteration).

    The ranking score of a pair is ``global + structural_weight * structural``: the published
    rule has weight 1; a model stores the weight chosen on its validation classes
    (``model.calibration``), so that re-ranking does not undo a better global ranking.

    ``close_score`` and ``related_score`` are the score bands of a verdict on each hit
    (``close`` at or above the first, ``related`` at or above the second, else ``unrelated``),
    calibrated on the data the model was selected on (:func:`model.calibration.score_bands`);
    None for a model calibrated before bands existed. They change no vector, so they are not
    part of the model's fingerprint (:data:`PRESENTATION_FIELDS`).
    """

    epsilon: float = 0.05
    max_iter: int = 100
    tol: float = 1e-4
    check_every: int = 10
    structural_weight: float = 1.0
    close_score: float | None = None
    related_score: float | None = None

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.max_iter < 1 or self.check_every < 1:
            raise ValueError("max_iter and check_every must be >= 1")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if not 0 <= self.structural_weight < float("inf"):
            raise ValueError(f"structural_weight must be >= 0, got {self.structural_weight}")
        bands = (self.related_score, self.close_score)
        if (bands[0] is None) != (bands[1] is None):
            raise ValueError("close_score and related_score are given together, or neither")
        if bands[0] is not None and bands[1] is not None and not bands[0] <= bands[1]:
            raise ValueError(f"related_score {bands[0]} must be <= close_score {bands[1]}")

    def with_bands(self, related: float, close: float) -> MatchingConfig:
        """The same settings with the verdict's score bands."""
        return dataclasses.replace(self, related_score=related, close_score=close)


# Matching fields that only say how to present a score, never how it is computed: left out of the
# text a model's fingerprint covers, so that calibrating them keeps every index built with it.
PRESENTATION_FIELDS = ("close_score", "related_score")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network and use it the way it was trained.

    ``dim=None`` is the head-less mode: no projection, the part vectors are the backbone's own
    channels (training-free use with ImageNet weights). The default width, 512, is what
    ``diml train`` trains unless told otherwise (128 makes the compact model).
    """

    backbone: str = "mobilenet_v2"
    dim: int | None = 512
    grid: int = 4
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    matching: MatchingConfig = field(default_factory=MatchingConfig)

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be >= 1 or None (head-less), got {self.dim}")

    @property
    def regions(self) -> int:
        """R, the number of parts per image (grid x grid)."""
        return self.grid * self.grid

    def with_structural_weight(
        self, weight: float, bands: tuple[float, float] | None = None
    ) -> ModelConfig:
        """The same model with ``weight`` as the structural weight of its ranking score, and
        the verdict's ``bands`` (related, close) when given."""
        matching = dataclasses.replace(self.matching, structural_weight=weight)
        if bands is not None:
            matching = matching.with_bands(*bands)
        return dataclasses.replace(self, matching=matching)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): the same config always gives the same text."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        data = dict(data)
        try:
            pre = Preprocessing(**_tuples(data.pop("preprocessing", {})))
            matching = MatchingConfig(**data.pop("matching", {}))
            return cls(**data, preprocessing=pre, matching=matching)
        except TypeError as e:
            raise ValueError(f"not a model configuration: {e}") from e

    def differences(self, other: ModelConfig) -> list[str]:
        """Human-readable ``field: mine != other`` lines, nested fields dotted."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return [
            f"{key}: {mine.get(key)!r} != {theirs.get(key)!r}"
            for key in sorted(mine.keys() | theirs.keys())
            if mine.get(key) != theirs.get(key)
        ]


def identity_json(config_json: str) -> str:
    """The canonical text of a config's JSON without its :data:`PRESENTATION_FIELDS`: what a
    fingerprint covers (a config saved before those fields existed gives its own text back)."""
    data = json.loads(config_json)
    for name in PRESENTATION_FIELDS:
        data.get("matching", {}).pop(name, None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat
