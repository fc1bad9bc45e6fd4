"""The Sinkhorn solver of :mod:`model.optimal_transport` as one fused GPU kernel (Triton).

The batched PyTorch solver runs every iteration as a few kernels over the whole batch, reading
and writing each plan from GPU memory each time: a single query's K = 100 problems are then
bound by kernel launches, and a large batch by memory traffic. Here one Triton program solves
one problem with its whole plan in registers (R, S <= 64): the plan is read once, iterated on
the chip, written once, and each problem stops at its own convergence (no host-device
synchronisation at all inside the solve). The maths are those of ``optimal_transport._solve``:
potentials anchored so that every row and column has its largest kernel entry at 1, blocks of
``check_every`` scaling iterations on the stabilised kernel, scalings absorbed into the
potentials after each block, the L1 error of the row marginals tested per block. Forward only:
autograd uses the PyTorch solver.

Written for CUDA; Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernel on CPU
tensors, which is how the test suite checks it on machines without a GPU.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sysconfig
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_SIDE = 64  # R and S up to this (G = 8 grids); larger problems use the PyTorch solver
TINY = float(torch.finfo(torch.float32).tiny)


@functools.cache
def _kernel():  # type: ignore[no-untyped-def]
    """The jitted kernel, built on first use (importing Triton costs ~1 s)."""
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]

    @triton.jit
    def sinkhorn_kernel(  # type: ignore[no-untyped-def]
        log_k_ptr,
        a_ptr,
        b_ptr,
        plan_ptr,
        error_ptr,
        iterations_ptr,
        rows,
        cols,
        max_iter,
        check_every,
        tol,
        block_r: tl.constexpr,
        block_s: tl.constexpr,
        floor: tl.constexpr,
        smallest: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, block_r)
        s = tl.arange(0, block_s)
        row_ok = r < rows
        col_ok = s < cols
        ok = row_ok[:, None] & col_ok[None, :]
        offsets = pid * rows * cols + r[:, None] * cols + s[None, :]
        log_k = tl.load(log_k_ptr + offsets, mask=ok, other=0.0)
        a = tl.load(a_ptr + pid * rows + r, mask=row_ok, other=0.0)
        b = tl.load(b_ptr + pid * cols + s, mask=col_ok, other=0.0)
        # Anchor: every row's, then every column's, largest kernel entry is exactly 1.
        f = tl.where(row_ok, -tl.max(tl.where(ok, log_k, float("-inf")), axis=1), 0.0)
        g = tl.where(col_ok, -tl.max(tl.where(ok, log_k + f[:, None], float("-inf")), axis=0), 0.0)
        done = tl.program_id(0) * 0  # an int32 tensor from the start (loop-carried)
        error = tl.sum(tl.where(row_ok, float("inf"), 0.0), axis=0)
        while (done < max_iter) & (error > tol):
            steps = tl.minimum(check_every, max_iter - done)
            kernel = tl.where(ok, tl.exp(tl.maximum(log_k + f[:, None] + g[None, :], floor)), 0.0)
            u = tl.where(row_ok, 1.0, 0.0)
            v = tl.where(col_ok, 1.0, 0.0)
            for _ in range(steps):
                u = tl.where(row_ok, a / tl.sum(kernel * v[None, :], axis=1), 0.0)
                v = tl.where(col_ok, b / tl.sum(kernel * u[:, None], axis=0), 0.0)
            error = tl.sum(tl.abs(u * tl.sum(kernel * v[None, :], axis=1) - a), axis=0)
            f = f + tl.where(row_ok, tl.log(tl.maximum(u, smallest)), 0.0)
            g = g + tl.where(col_ok, tl.log(tl.maximum(v, smallest)), 0.0)
            done += steps
        plan = tl.exp(tl.maximum(log_k + f[:, None] + g[None, :], floor))
        tl.store(plan_ptr + offsets, plan, mask=ok)
        tl.store(error_ptr + pid, error)
        tl.store(iterations_ptr + pid, done)

    return sinkhorn_kernel


def fits(rows: int, cols: int) -> bool:
    return rows <= MAX_SIDE and cols <= MAX_SIDE


@functools.cache
def available() -> bool:
    """Whether the kernel can run: Triton imports (it ships with PyTorch's CUDA builds) and,
    unless it interprets (``TRITON_INTERPRET=1``), what Triton needs to build its kernel
    launcher on first use is there: a C compiler (``CC``, else gcc or clang, Triton's own
    order) and Python's headers. Without them the PyTorch solver runs instead of every solve
    failing (a slim image without gcc, a Debian Python without python3-dev)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    headers = Path(sysconfig.get_paths()["include"], "Python.h").is_file()
    if compiler is None or not headers:
        missing = "a C compiler (CC, gcc or clang)" if compiler is None else "Python.h"
        log.warning(
            "Triton cannot build its kernel launcher without %s: Sinkhorn runs in the PyTorch "
            "solver, not the fused kernel",
            missing,
        )
        return False
    return True


def solve(
    log_k: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    max_iter: int,
    tol: float,
    check_every: int,
    exp_floor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_k: (N, R, S) = -cost / epsilon; a: (N, R); b: (N, S), fp32, R and S <= 64 ->
    plan (N, R, S), row-marginal error (N,), iterations run (N,) int32, each problem stopping
    at its own convergence. Exponents are floored at ``exp_floor`` (the PyTorch solver's)."""
    import triton

    n, rows, cols = log_k.shape
    if not fits(rows, cols):
        raise ValueError(f"the fused Sinkhorn kernel takes plans up to {MAX_SIDE} x {MAX_SIDE}")
    log_k, a, b = (t.float().contiguous() for t in (log_k, a, b))
    plan = torch.empty_like(log_k)
    error = torch.empty(n, dtype=torch.float32, device=log_k.device)
    iterations = torch.empty(n, dtype=torch.int32, device=log_k.device)
    if n == 0:
        return plan, error, iterations
    block_r, block_s = triton.next_power_of_2(rows), triton.next_power_of_2(cols)
    warps = max(1, min(8, block_r * block_s // 256))
    _kernel()[(n,)](
        log_k, a, b, plan, error, iterations,
        rows, cols, max_iter, check_every, tol,
        block_r=block_r, block_s=block_s, floor=exp_floor, smallest=TINY,
        num_warps=warps,
    )  # fmt: skip
    return plan, error, iterations
