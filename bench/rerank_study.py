"""When does structural re-ranking pay? Embed labelled classes once, then try ranking rules on them.

    .venv/bin/python bench/rerank_study.py --data ../shared/data/cub-dev \
        [--checkpoint runs/cub/best.safetensors] [--classes 16-20 21-30] [--cache out/study]

Each class range is ranked on its own, as `diml evaluate` ranks it (every image queries the
others; the global top 100 re-ranked). For every structural weight of
``model.calibration.WEIGHTS`` (and 3, 5) it prints Recall@1 / MAP@R under:

- ``balanced``: the shipped rule (entropic transport with the cross-correlation marginals);
- ``uniform``: the same with uniform marginals (every part weighs the same);
- ``unbalanced tau``: KL-relaxed marginals (mass that matches badly need not be moved, as for
  clutter and crops), tau 0.1 and 0.3;
- ``window d``: the shipped score, but only the candidates within ``d`` of the query's best
  global score are re-sorted (re-rank only where the global top is close together).

Embeddings are cached under --cache, keyed by the model's fingerprint.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from model.calibration import WEIGHTS
from model.checkpoint import fingerprint, load_model
from model.config import MatchingConfig
from model.datasets import read_dataset
from model.evaluation import ranking_depth
from model.loading import embed_records
from model.matching import part_weights, rerank_positions
from model.metrics import relevant_counts, retrieval_metrics
from model.network import Embedding, EmbeddingNet
from model.optimal_transport import sinkhorn

STUDY_WEIGHTS = (*WEIGHTS, 3.0, 5.0)
Plan = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def embedded(
    model: EmbeddingNet, data: Path, classes: str, cache: Path, stored: bool = True
) -> tuple[Embedding, torch.Tensor]:
    """The classes' embeddings, parts as the index stores them (``stored=False``: float16)."""
    images = read_dataset(data, classes=classes)
    path = cache / f"{fingerprint(model)[:12]}-{classes}{'' if stored else '-float16'}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return Embedding(saved["parts"], saved["vector"]), images.labels
    embedding, _ = embed_records(model, images.records, torch.device("cpu"), stored=stored)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"parts": embedding.parts, "vector": embedding.vector}, path)
    return embedding, images.labels


def balanced(matching: MatchingConfig) -> Plan:
    def plan(similarity: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        return sinkhorn(1 - similarity, mu, nu, epsilon=matching.epsilon).plan

    return plan


def uniform(matching: MatchingConfig) -> Plan:
    def plan(similarity: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        return balanced(matching)(similarity, torch.ones_like(mu) / mu.shape[-1],
                                  torch.ones_like(nu) / nu.shape[-1])  # fmt: skip

    return plan


def unbalanced(matching: MatchingConfig, tau: float, iterations: int = 200) -> Plan:
    """Entropic transport with KL-relaxed marginals (Chizat et al., 2018), log domain."""
    eps = matching.epsilon
    rho = tau / (tau + eps)

    def plan(similarity: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        cost = 1 - similarity
        log_mu, log_nu = mu.clamp_min(1e-30).log(), nu.clamp_min(1e-30).log()
        f, g = torch.zeros_like(mu), torch.zeros_like(nu)
        for _ in range(iterations):
            f = rho * eps * (log_mu - torch.logsumexp((g.unsqueeze(-2) - cost) / eps, -1))
            g = rho * eps * (log_nu - torch.logsumexp((f.unsqueeze(-1) - cost) / eps, -2))
        return torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps)

    return plan


def terms(
    embedding: Embedding, order: torch.Tensor, k: int, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global and structural similarity (N, k) of every query and its global top k."""
    n = len(embedding)
    global_sim, structural = torch.zeros(n, k), torch.zeros(n, k)
    for start in range(0, n, 64):
        q = torch.arange(start, min(start + 64, n))
        c = order[q, :k]
        qp, qv = embedding.parts[q].float(), embedding.vector[q].float()
        gp, gv = embedding.parts[c].float(), embedding.vector[c].float()
        similarity = torch.einsum("brd,bkpd->bkrp", qp, gp)
        mu = part_weights(torch.einsum("brd,bkd->bkr", qp, gv))
        nu = part_weights(torch.einsum("bkpd,bd->bkp", gp, qv))
        global_sim[q] = torch.einsum("bd,bkd->bk", qv, gv)
        structural[q] = (plan(similarity, mu, nu) * similarity).sum((-2, -1))
    return global_sim, structural


def reranked(
    order: torch.Tensor, score: torch.Tensor, inside: torch.Tensor | None = None
) -> torch.Tensor:
    """``order`` with its first k re-sorted by ``score``; with ``inside`` (a prefix of each row),
    only those candidates are re-sorted and the rest keep their global order after them."""
    k = score.shape[1]
    if inside is not None:
        score = torch.where(inside, score, score.min() - 1 - torch.arange(k, dtype=score.dtype))
    out = order.clone()
    out[:, :k] = torch.gather(order[:, :k], 1, rerank_positions(score, k))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--cache", type=Path, default=Path("out/study"))
    p.add_argument("--classes", nargs="+", default=["16-20", "21-30"])
    p.add_argument("--rerank-k", type=int, default=100)
    args = p.parse_args()
    model = load_model(args.checkpoint)
    matching = model.config.matching
    name = args.checkpoint or "the training-free default"
    print(f"model {name}, its structural weight {matching.structural_weight}")
    print("| classes | rule | global | " + " | ".join(f"w = {w:g}" for w in STUDY_WEIGHTS) + " |")
    print("| --- " * (3 + len(STUDY_WEIGHTS)) + "|")
    for classes in args.classes:
        embedding, labels = embedded(model, args.data, classes, args.cache)
        k = args.rerank_k
        vectors = embedding.vector.float()
        sims = vectors @ vectors.T
        sims.fill_diagonal_(-torch.inf)
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices
        order = order[:, : ranking_depth(labels, k)]
        r = relevant_counts(labels)

        def cell(ranking: torch.Tensor, labels: torch.Tensor = labels, r: torch.Tensor = r) -> str:
            m = retrieval_metrics(labels[ranking], labels, r)
            return f"{m['recall@1']:.2f} / {m['map@r']:.2f}"

        rules: list[tuple[str, Plan, float | None]] = [
            ("balanced (shipped)", balanced(matching), None),
            ("uniform marginals", uniform(matching), None),
            ("unbalanced tau 0.1", unbalanced(matching, 0.1), None),
            ("unbalanced tau 0.3", unbalanced(matching, 0.3), None),
            ("window 0.01", balanced(matching), 0.01),
            ("window 0.05", balanced(matching), 0.05),
        ]
        shipped: tuple[torch.Tensor, torch.Tensor] | None = None
        for name, plan, window in rules:
            if window is None or shipped is None:
                global_sim, structural = terms(embedding, order, k, plan)
                shipped = shipped or (global_sim, structural)
            else:
                global_sim, structural = shipped
            inside = None if window is None else global_sim >= global_sim[:, :1] - window
            cells = [
                cell(reranked(order, global_sim + w * structural, inside)) for w in STUDY_WEIGHTS
            ]
            print(f"| {classes} | {name} | {cell(order)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
