"""Throughput of structural matching: batched (B queries x K candidates at once) vs a per-pair loop.

    .venv/bin/python bench/bench_matching.py                 # synthetic part grids, CPU (+ CUDA)
    .venv/bin/python bench/bench_matching.py --cub ../shared/data/cub-dev   # real features

Prints, for each grid size (R = 16 and 49, D = 128) and device: pairs per second and milliseconds
per query (K = 100 candidates) for the batched path at B = 1 and B = 16 queries per call, and for
a loop that matches one pair per call; the speed-up of batching; Sinkhorn iterations used.
Synthetic candidates are noisy, shuffled copies of the query's parts (a mix of near and far
matches); ``--cub`` uses the default model's features of real photos instead (R = 16 only, and
D = 1280 for the head-less model, projected to 128 by a fixed random matrix).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from model import Embedder, MatchingConfig, load_image, load_model, match_pairs, structural_match


def synthetic(batch: int, k: int, r: int, d: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """query parts (B, R, D), vectors (B, D); candidate parts (B, K, R, D), vectors (B, K, D)."""
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(batch, r, d, generator=gen), dim=-1)
    perm = torch.argsort(torch.rand(batch, k, r, generator=gen), dim=-1)
    shuffled = torch.gather(
        q.unsqueeze(1).expand(-1, k, -1, -1), 2, perm[..., None].expand(-1, -1, -1, d)
    )
    noise = torch.linspace(0.2, 3.0, k).view(1, k, 1, 1)
    g = F.normalize(shuffled + noise * torch.randn(batch, k, r, d, generator=gen), dim=-1)
    return _with_vectors(q, g, device)


def real(cub: Path, batch: int, k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Default-model features of the first B + K photos of ``cub``, projected to D = 128."""
    lines = (cub / "images.txt").read_text().split("\n")
    paths = [cub / "images" / line.split()[1] for line in lines if line.strip()][: batch + k]
    model = load_model()
    emb, _ = Embedder(model).embed([load_image(p) for p in paths])
    proj = torch.randn(emb.parts.shape[-1], 128, generator=torch.Generator().manual_seed(0))
    parts = F.normalize(emb.parts @ proj, dim=-1)
    q, g = parts[:batch], parts[batch:].unsqueeze(0).expand(batch, -1, -1, -1)
    return _with_vectors(q, g.contiguous(), device)


def _with_vectors(
    q: torch.Tensor, g: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, ...]:
    qv, gv = F.normalize(q.mean(-2), dim=-1), F.normalize(g.mean(-2), dim=-1)
    return tuple(t.to(device) for t in (q, qv, g, gv))


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after two warm-up runs."""
    times = []
    for i in range(repeat + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def bench(args: argparse.Namespace, device: torch.device, r: int) -> None:
    config = MatchingConfig()
    k = args.k
    rows = []
    for batch in (1, 16):
        if args.cub is not None:
            q, qv, g, gv = real(args.cub, batch, k, device)
        else:
            q, qv, g, gv = synthetic(batch, k, r, args.dim, device)
        inputs = (q, qv, g, gv)
        result = structural_match(*inputs, config)
        seconds = timed(lambda: structural_match(*inputs, config), device, args.repeat)  # noqa: B023
        rows.append((f"batched B={batch:<2}", seconds / batch, batch * k / seconds))
        if batch == 1:
            loop = _per_pair(q, qv, g, gv, config)
            loop_s = timed(loop, device, max(1, args.repeat // 5))
            rows.append(("per-pair loop", loop_s, k / loop_s))
            iters, conv = result.iterations, float(result.converged.float().mean())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = torch.get_num_threads()
    print(
        f"\n{name} ({threads} threads), R={r}, D={q.shape[-1]}, K={k}, epsilon {config.epsilon}, "
        f"tol {config.tol}: {iters} Sinkhorn iterations, {100 * conv:.0f}% converged"
    )
    print(f"  {'path':<16} {'ms/query':>9} {'pairs/s':>10}")
    for label, per_query, pairs in rows:
        print(f"  {label:<16} {1e3 * per_query:9.3f} {pairs:10.0f}")
    print(
        f"  batched B=1 is {rows[1][1] / rows[0][1]:.1f}x faster than the per-pair loop; "
        f"B=16 is {rows[1][1] / rows[2][1]:.1f}x"
    )


def _per_pair(
    q: torch.Tensor, qv: torch.Tensor, g: torch.Tensor, gv: torch.Tensor, config: MatchingConfig
) -> Callable[[], None]:
    from model import Embedding

    query = Embedding(q[:1], qv[:1])
    items = [Embedding(g[0, j : j + 1], gv[0, j : j + 1]) for j in range(g.shape[1])]

    def run() -> None:
        for item in items:
            match_pairs(query, item, config)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--k", type=int, default=100, help="candidates per query (default 100)")
    parser.add_argument("--dim", type=int, default=128, help="part dimension D (default 128)")
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per case (median)")
    parser.add_argument("--cub", type=Path, help="use real features of this CUB folder's photos")
    parser.add_argument(
        "--device", action="append", help="cpu, cuda (default: cpu, and cuda if present)"
    )
    args = parser.parse_args()
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}")
    for device in devices:
        for r in (16,) if args.cub else (16, 49):
            bench(args, torch.device(device), r)


if __name__ == "__main__":
    main()
