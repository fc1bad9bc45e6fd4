"""Entropic optimal transport by Sinkhorn iterations, log-domain stabilised, batched.

Solves, for every problem in the batch,

    min_T  <T, C> - epsilon * H(T)   subject to   T 1 = mu,  T^T 1 = nu,  T >= 0,

whose solution is ``T = exp((f_i + g_j - C_ij) / epsilon)`` for dual potentials ``f, g``.

The potentials are kept in the log domain, so no kernel ``exp(-C / epsilon)`` ever has to be
representable on its own (it underflows in fp16 and, for small epsilon, in fp32). They start
anchored so that every row and column of the kernel has its largest entry at 1; each block of
``check_every`` iterations then runs ordinary scaling updates on the *stabilised* kernel
``exp((f + g - C) / epsilon)``, which is well scaled, and ends by absorbing the scalings back into
the potentials (Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized
transport problems", 2019). This gives the log domain's range at the cost of two small batched
mat-vecs per iteration. Convergence is tested once per block (one host-device synchronisation per
block, none per iteration) on the L1 error of the row marginals; the column marginals are exact
after every update. Non-convergence is reported in the result, never hidden.

On CUDA the same algorithm runs as one fused Triton kernel (:mod:`model.ot_kernel`): one
program per problem, the plan kept on the chip, each problem stopping at its own convergence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import ot_kernel


@dataclass(frozen=True)
class SinkhornResult:
    """plan: (..., R, S); marginal_error, converged: (...); iterations: the number run."""

    plan: torch.Tensor
    marginal_error: torch.Tensor
    converged: torch.Tensor
    iterations: int


def sinkhorn(
    cost: torch.Tensor,
    mu: torch.Tensor,
    nu: torch.Tensor,
    epsilon: float = 0.05,
    max_iter: int = 100,
    tol: float = 1e-4,
    check_every: int = 10,
    fused: bool | None = None,
) -> SinkhornResult:
    """Entropic OT plans for a batch of problems, computed in fp32.

    cost: (..., R, S); mu: (..., R) and nu: (..., S), non-negative, each summing to 1 (zeros
    allowed) -> SinkhornResult with plan (..., R, S), ``plan.sum(-1) ~ mu``, ``plan.sum(-2) = nu``.
    Differentiable when autograd is on (no in-place updates); wrap in ``torch.no_grad()`` for a
    detached plan.

    ``fused``: solve with the one-kernel Triton solver (:mod:`model.ot_kernel`), where each
    problem stops at its own convergence and no host sync happens inside the solve. ``None``
    (the default) uses it on CUDA when Triton is installed, R and S are at most 64 and no
    gradient is needed; ``False`` always runs the PyTorch solver below.
    """
    if (
        cost.dim() < 2
        or mu.shape != cost.shape[:-1]
        or nu.shape != cost.shape[:-2] + cost.shape[-1:]
    ):
        raise ValueError(
            f"sinkhorn needs cost (..., R, S), mu (..., R), nu (..., S); got cost "
            f"{tuple(cost.shape)}, mu {tuple(mu.shape)}, nu {tuple(nu.shape)}"
        )
    if not epsilon > 0 or max_iter < 1 or check_every < 1:
        raise ValueError("sinkhorn needs epsilon > 0, max_iter >= 1 and check_every >= 1")
    batch, rows, cols = cost.shape[:-2], cost.shape[-2], cost.shape[-1]
    log_k = cost.float().reshape(-1, rows, cols) / -epsilon  # (N, R, S)
    a, b = mu.float().reshape(-1, rows), nu.float().reshape(-1, cols)
    if fused is None:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (cost, mu, nu))
        fused = cost.is_cuda and not needs_grad and ot_kernel.fits(rows, cols)
        fused = fused and ot_kernel.available()
    if fused:
        plan, error, runs = ot_kernel.solve(log_k, a, b, max_iter, tol, check_every, _EXP_FLOOR)
        iterations = int(runs.max()) if len(runs) else 0  # the one host sync
    else:
        plan, error, iterations = _solve_chunked(log_k, a, b, max_iter, tol, check_every)
    return SinkhornResult(
        plan=plan.reshape(*batch, rows, cols),
        marginal_error=error.reshape(batch),
        converged=(error <= tol).reshape(batch),
        iterations=iterations,
    )


def _solve_chunked(
    log_k: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    max_iter: int,
    tol: float,
    check_every: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`_solve` in chunks on the CPU (see ``_CPU_CHUNK_ELEMENTS``), at once elsewhere."""
    rows, cols = log_k.shape[-2:]
    chunk = max(1, _CPU_CHUNK_ELEMENTS // (rows * cols)) if log_k.device.type == "cpu" else len(a)
    parts = [
        _solve(log_k[i : i + chunk], a[i : i + chunk], b[i : i + chunk], max_iter, tol, check_every)
        for i in range(0, len(a), chunk)
    ]
    if len(parts) == 1:
        return parts[0]
    return (
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        max(p[2] for p in parts),
    )


def _solve(
    log_k: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    max_iter: int,
    tol: float,
    check_every: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """log_k: (N, R, S) = -cost / epsilon; a: (N, R); b: (N, S) -> plan, row error, iterations."""
    # Anchor the potentials (divided by epsilon) so that every row's and every column's largest
    # kernel entry is exactly 1: no row or column can underflow, whatever the cost range.
    f = -log_k.amax(dim=-1)
    g = -(log_k + f.unsqueeze(-1)).amax(dim=-2)
    done = 0
    error = torch.full_like(a[:, 0], float("inf"))
    while True:
        steps = min(check_every, max_iter - done)
        # The stabilised kernel; every entry >= exp(_EXP_FLOOR) > 0, so no sum below is 0.
        kernel = _exp(log_k + f.unsqueeze(-1) + g.unsqueeze(-2))  # (N, R, S)
        kernel_t = kernel.transpose(-2, -1).contiguous()  # (N, S, R): both products sum dim -2
        u, v = torch.ones_like(a), torch.ones_like(b)
        for _ in range(steps):
            u = a / (kernel_t * v.unsqueeze(-1)).sum(-2)
            v = b / (kernel * u.unsqueeze(-1)).sum(-2)
        error = (u * (kernel_t * v.unsqueeze(-1)).sum(-2) - a).abs().sum(-1)
        f, g = f + _log(u), g + _log(v)  # absorb the scalings into the potentials
        done += steps
        if done >= max_iter or bool(error.max() <= tol):  # the one sync of this block
            break
    return _exp(log_k + f.unsqueeze(-1) + g.unsqueeze(-2)), error, done


# On the CPU, problems are solved in chunks of about this many plan entries (1 MiB of fp32), so
# the iterations' working set stays in cache; on a GPU the whole batch goes at once.
_CPU_CHUNK_ELEMENTS = 1 << 18

# exp(-80) ~ 1.8e-35: below this fp32 turns subnormal, which x86 computes ~40x slower, and such
# entries carry no mass that fp32 sums could see. Clamping there keeps every exp on the fast path.
_EXP_FLOOR = -80.0


def _exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.clamp_min(_EXP_FLOOR))


def _log(x: torch.Tensor) -> torch.Tensor:
    """log floored at log(tiny) instead of -inf: a zero weight's potential stays finite (its plan
    entries still come out at the exp floor, i.e. no mass) and its gradient is 0, not NaN."""
    return x.clamp_min(torch.finfo(x.dtype).tiny).log()
