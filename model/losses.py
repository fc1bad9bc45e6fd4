"""Training losses: the DIML losses on structural similarity, and the global baselines.

The losses and miners are pytorch-metric-learning's (installed with the ``train`` extra); DIML
plugs in as a *distance*: :class:`StructuralDistance` turns a batch of packed embeddings
(global vector, then the R part vectors) into the matrix of ranking scores
``SS + <q̄, ḡ>`` between all pairs, with the plan detached and the test-time marginals
(``mu`` from the row image's parts against the column image's vector), so that what is trained
is exactly what re-ranks at test time. The published training code swaps the two marginals.

Scales: the multi-similarity loss sees ``score / 2`` (in [-1, 1], like a cosine); the margin
loss sees ``sqrt(2 - score)``, which is the Euclidean distance of unit vectors when the
structural and global terms agree. The usual hyper-parameters of both losses then apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pytorch_metric_learning import distances, losses, miners

from model.config import LOSSES, MatchingConfig
from model.matching import match_all, match_pairs
from model.network import Embedding


def pack(embedding: Embedding) -> torch.Tensor:
    """Embedding -> (B, (1 + R) * D): the global vector, then the parts row by row."""
    return torch.cat([embedding.vector, embedding.parts.flatten(1)], dim=1)


def unpack(packed: torch.Tensor, dim: int) -> Embedding:
    """The inverse of :func:`pack` for part vectors of ``dim`` channels."""
    b = packed.shape[0]
    return Embedding(packed[:, dim:].reshape(b, -1, dim), packed[:, :dim])


class StructuralDistance(distances.BaseDistance):
    """All-pairs DIML ranking scores of packed embeddings, as a PML distance.

    ``as_distance=False``: similarity ``score / 2`` (inverted, larger is closer);
    ``as_distance=True``: ``sqrt(2 - score)``.
    """

    def __init__(
        self, dim: int, matching: MatchingConfig | None = None, as_distance: bool = False
    ) -> None:
        super().__init__(normalize_embeddings=False, is_inverted=not as_distance)
        self.dim = dim
        self.matching = matching
        self.as_distance = as_distance

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        score = match_all(
            unpack(query_emb, self.dim), unpack(ref_emb, self.dim), self.matching, True
        ).score
        return self._scale(score)

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        q, r = unpack(query_emb, self.dim), unpack(ref_emb, self.dim)
        return self._scale(match_pairs(q, r, self.matching, True).score[:, 0])

    def _scale(self, score: torch.Tensor) -> torch.Tensor:
        if self.as_distance:
            return (2.0 - score).clamp_min(1e-8).sqrt()
        return score / 2.0


@dataclass
class Criterion:
    """A loss on a batch: ``criterion(embedding, labels) -> scalar``."""

    name: str
    loss: torch.nn.Module
    miner: torch.nn.Module | None
    structural: bool

    def __call__(self, embedding: Embedding, labels: torch.Tensor) -> torch.Tensor:
        inputs = pack(embedding) if self.structural else embedding.vector
        pairs = None
        if self.miner is not None:
            # The miners use the global vectors: cheap, and the same hard pairs for all losses.
            pairs = self.miner(embedding.vector, labels)
        value: torch.Tensor = self.loss(inputs, labels, pairs)
        return value


def make_criterion(name: str, dim: int, matching: MatchingConfig | None = None) -> Criterion:
    """The loss ``name`` (one of :data:`LOSSES`) for parts and vectors of ``dim`` channels.

    Settings as in the DIML code base: multi-similarity (alpha 2, beta 40, base 0.5) with the
    multi-similarity miner (epsilon 0.1); margin (margin 0.2, beta 1.2) with distance-weighted
    sampling; contrastive (margins 0 and 1 on the Euclidean distance); triplet (margin 0.2,
    semi-hard triplets).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    base, diml = name.removesuffix("-diml"), name.endswith("-diml")
    factory: dict[str, Callable[[], tuple[torch.nn.Module, torch.nn.Module | None]]] = {
        "ms": lambda: (
            losses.MultiSimilarityLoss(
                alpha=2, beta=40, base=0.5, distance=_distance(diml, dim, matching, False)
            ),
            miners.MultiSimilarityMiner(epsilon=0.1),
        ),
        "margin": lambda: (
            losses.MarginLoss(margin=0.2, beta=1.2, distance=_distance(diml, dim, matching, True)),
            miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4),
        ),
        "contrastive": lambda: (losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0), None),
        "triplet": lambda: (
            losses.TripletMarginLoss(margin=0.2),
            miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
        ),
    }
    loss, miner = factory[base]()
    return Criterion(name, loss, miner, diml)


def _distance(
    structural: bool, dim: int, matching: MatchingConfig | None, as_distance: bool
) -> distances.BaseDistance:
    if structural:
        return StructuralDistance(dim, matching, as_distance)
    return distances.LpDistance() if as_distance else distances.CosineSimilarity()
