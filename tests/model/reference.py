"""Naive per-pair references, written for clarity, in float64, one problem at a time."""

from __future__ import annotations

import torch


def sinkhorn_reference(
    cost: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor, epsilon: float, iters: int = 5000
) -> torch.Tensor:
    """cost: (R, S); mu: (R,); nu: (S,) -> plan (R, S), plain log-domain updates, float64."""
    c, a, b = cost.double(), mu.double(), nu.double()
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for i in range(iters):
        f = epsilon * a.log() - epsilon * torch.logsumexp((g[None, :] - c) / epsilon, dim=1)
        g = epsilon * b.log() - epsilon * torch.logsumexp((f[:, None] - c) / epsilon, dim=0)
        if i % 50 == 49:
            plan = torch.exp((f[:, None] + g[None, :] - c) / epsilon)
            if (plan.sum(1) - a).abs().sum() < 1e-13:
                break
    return torch.exp((f[:, None] + g[None, :] - c) / epsilon)


def weights_reference(parts: torch.Tensor, other_vector: torch.Tensor) -> torch.Tensor:
    """parts: (R, D); other_vector: (D,) -> (R,), a loop over parts."""
    other = other_vector.double()
    corr = torch.stack([torch.clamp(torch.dot(p, other), min=0) for p in parts.double()])
    if corr.sum() == 0:
        return torch.full_like(corr, 1.0 / len(corr))
    return corr / corr.sum()


def match_reference(
    q: torch.Tensor, qv: torch.Tensor, g: torch.Tensor, gv: torch.Tensor, epsilon: float
) -> dict[str, torch.Tensor]:
    """One pair: q (R, D), qv (D,), g (P, D), gv (D,) -> every quantity of DESIGN.md."""
    q, qv, g, gv = q.double(), qv.double(), g.double(), gv.double()
    sim = torch.tensor([[float(torch.dot(qi, gj)) for gj in g] for qi in q], dtype=torch.float64)
    mu, nu = weights_reference(q, gv), weights_reference(g, qv)
    plan = sinkhorn_reference(1 - sim, mu, nu, epsilon)
    ss = (plan * sim).sum()
    return {
        "similarity": sim,
        "mu": mu,
        "nu": nu,
        "plan": plan,
        "structural": ss,
        "global": torch.dot(qv, gv),
        "score": ss + torch.dot(qv, gv),
    }


def unit(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random L2-normalised vectors along the last dimension."""
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)
