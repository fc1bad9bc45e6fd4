"""The device check: one command that measures the search path on a GPU and writes JSON.

    .venv/bin/python bench/gpu_check.py --cub ../shared/data/cub-dev --out gpu_check.json   # a GPU
    .venv/bin/python bench/gpu_check.py --device cpu --quick                         # smoke run

Sections (each one's failure is recorded in the JSON and the others still run):

- ``environment``: torch, Triton and FAISS versions, the device and its memory.
- ``tests``: the CUDA tests of the suite (``pytest -m gpu``), on CUDA only.
- ``matching``: structural matching, K = 100 candidates, R = 16 parts, D = 128: the published
  per-query rule (plain Sinkhorn scaling with a host sync after every iteration, rewritten
  here as the baseline) against this project's solver in PyTorch and as the fused Triton
  kernel, for one query and for batches of queries: ms per call and pairs per second.
- ``search_synthetic``: ``diml serve`` over a synthetic gallery (``--items``, default
  1,000,000 on a GPU; generated vectors and part grids, no images) with a D = 128 model;
  ``/search`` (k = 10, rerank_k = 100, explanations on) at 1 and 16 clients: client p50/p95 and
  the server-side time without decoding (the sum of the ``Server-Timing`` stages but
  ``decode``), p50/p95, with each stage's median; decode apart. Then, as
  ``grids_other_way``, the same at 1 client with the part grids read the other way
  (``DIML_DEVICE_GRIDS``: from the host's index on CUDA, where they stay on the device by
  default; kept on the device on the CPU), to show what keeping them there is worth.
- ``index_build`` and ``search_cub`` (with ``--cub``): ``build_index`` images/s over the
  photos against the backbone's forward-only images/s on the same photos decoded beforehand,
  then the same ``/search`` measurement over that index with the default model.
- ``memory``: peak GPU memory of this process and device memory in use while serving.
- ``targets``: the issue's targets, each with the measured value and whether it is met.

``--quick`` shrinks every size so that the whole check runs in about a minute on a laptop
CPU; the test suite runs it that way so that the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_matching import synthetic, timed  # noqa: E402
from bench_service import running, send  # noqa: E402

from index_builder import GalleryIndex, build_index, scan_folder  # noqa: E402
from index_builder.embedding import default_workers  # noqa: E402
from index_builder.gallery import writing  # noqa: E402
from index_builder.table import NewItem  # noqa: E402
from model import (  # noqa: E402  # noqa: E402
    Embedder,
    ModelConfig,
    create_model,
    load_image,
    load_model,
    ot_kernel,
    preprocess,
    save_checkpoint,
    structural_match,
)
from model.checkpoint import fingerprint  # noqa: E402
from model.config import MatchingConfig  # noqa: E402
from model.matching import part_weights  # noqa: E402

GPU_TEST_FILES = [
    "tests/model/test_ot_kernel.py",
    "tests/model/test_optimal_transport.py",
    "tests/model/test_matching.py",
    "tests/index_builder/test_device_search.py",
    "tests/service/test_cuda_search.py",
]


def section(
    results: dict[str, Any], name: str, fn: Callable[[], Any], out: Path | None = None
) -> None:
    """Run one section; a failure is written down with its traceback, not raised. The JSON so
    far is written to ``out`` after each section, so that a run cut short keeps its numbers."""
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(f"   {name}: {time.perf_counter() - start:.1f} s", flush=True)
    if out is not None:
        out.write_text(json.dumps(results, indent=1) + "\n")


# -- environment and tests ----------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    import faiss

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "faiss": faiss.__version__,
        "triton": ot_kernel.available(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)  # fmt: skip
    return info


def cuda_tests() -> dict[str, Any]:
    files = [f for f in GPU_TEST_FILES if (REPO / f).is_file()]
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
    return {"returncode": done.returncode, "summary": lines[-1] if lines else done.stderr[-500:]}


# -- matching -----------------------------------------------------------------------------------


def published_rule(
    q: torch.Tensor, qv: torch.Tensor, g: torch.Tensor, gv: torch.Tensor, config: MatchingConfig
) -> torch.Tensor:
    """One query against its K candidates as the published DIML code does it: the kernel
    exp(-(1 - S) / epsilon), plain (not log-domain) scaling iterations, and a convergence test
    read back to the host after every iteration. q: (R, D), qv: (D,), g: (K, P, D), gv: (K, D)
    -> scores (K,)."""
    sim = torch.einsum("rd,kpd->krp", q, g)
    mu = part_weights(torch.einsum("rd,kd->kr", q, gv))
    nu = part_weights(torch.einsum("kpd,d->kp", g, qv))
    kernel = torch.exp(-(1 - sim) / config.epsilon)
    u, v = torch.ones_like(mu), torch.ones_like(nu)
    for _ in range(config.max_iter):
        previous = u
        u = mu / (kernel @ v.unsqueeze(-1)).squeeze(-1)
        v = nu / (kernel.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1)
        if (u - previous).abs().mean().item() < 0.1:  # the published threshold; a host sync
            break
    plan = u.unsqueeze(-1) * kernel * v.unsqueeze(-2)
    return (plan * sim).sum((-2, -1)) + gv @ qv


@torch.inference_mode()
def matching(device: torch.device, quick: bool) -> dict[str, Any]:
    config = MatchingConfig()
    k, r, d = 100, 16, 128
    repeat = 5 if quick else 50
    batches = (1, 16) if quick else (1, 64, 1024)
    solvers: list[tuple[str, bool]] = [("pytorch", False)]
    if device.type == "cuda" and ot_kernel.available():
        solvers.append(("fused", True))
    rows = []
    q, qv, g, gv = synthetic(1, k, r, d, device)
    seconds = timed(lambda: published_rule(q[0], qv[0], g[0], gv[0], config), device, repeat)
    rows.append(_row("published per-query rule", 1, k, seconds))
    for batch in batches:
        q, qv, g, gv = synthetic(batch, k, r, d, device)
        for name, fused in solvers:
            match = structural_match(q, qv, g, gv, config, fused=fused)
            seconds = timed(
                lambda: structural_match(q, qv, g, gv, config, fused=fused),  # noqa: B023
                device,
                repeat,
            )
            row = _row(f"ours, {name}", batch, k, seconds)
            row.update(iterations=match.iterations,
                       converged=round(float(match.converged.float().mean()), 4))  # fmt: skip
            rows.append(row)
    for row in rows:
        print(f"   {row['path']:<26} B={row['queries']:<5} {row['ms_per_call']:9.3f} ms/call "
              f"{row['pairs_per_s']:14,.0f} pairs/s", flush=True)  # fmt: skip
    return {"k": k, "parts": r, "dim": d, "epsilon": config.epsilon, "tol": config.tol,
            "rows": rows}  # fmt: skip


def _row(path: str, queries: int, k: int, seconds: float) -> dict[str, Any]:
    return {"path": path, "queries": queries, "ms_per_call": 1e3 * seconds,
            "pairs_per_s": queries * k / seconds}  # fmt: skip


# -- search through the real server ------------------------------------------------------------


def synthetic_gallery(root: Path, items: int, device: torch.device) -> Path:
    """A D = 128, 4 x 4 model (random weights: only the timing matters) and an index of
    ``items`` generated items: clustered unit global vectors, unit part vectors. Returns the
    checkpoint."""
    model = create_model(ModelConfig(dim=128, grid=4), weights=None)
    checkpoint = root / "model.safetensors"
    save_checkpoint(model, checkpoint)
    index = root / "index"
    build_index([], index, Embedder(model, runtime="torch"), factory="Flat")
    gen = torch.Generator(device=device).manual_seed(0)
    centres = F.normalize(torch.randn(1000, 128, generator=gen, device=device), dim=-1)
    chunk = 100_000
    with writing(index, fingerprint(model)) as gallery:
        for start in range(0, items, chunk):
            n = min(chunk, items - start)
            pick = torch.randint(0, len(centres), (n,), generator=gen, device=device)
            noise = torch.randn(n, 128, generator=gen, device=device)
            vectors = F.normalize(centres[pick] + 0.5 * noise, dim=-1)
            grids = torch.randn(n, 16, 128, generator=gen, device=device)
            grids = F.normalize(grids + vectors.unsqueeze(1), dim=-1)
            new = [NewItem(f"synthetic-{start + i}", None, None, f"{start + i:064x}", 640, 480)
                   for i in range(n)]  # fmt: skip
            gallery.add(new, vectors.float().cpu().numpy(), grids.half().cpu().numpy())
    return checkpoint


def serve_and_measure(
    index: Path,
    checkpoint: Path | None,
    device: torch.device,
    inference: str,
    queries: list[bytes],
    requests: tuple[int, ...],
    clients: tuple[int, ...] = (1, 16),
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    settings = {"DIML_DEVICE": str(device), **(extra or {})}
    if checkpoint is not None:
        settings["DIML_CHECKPOINT"] = str(checkpoint)
    with running(index, inference, settings, timeout=600) as server:
        url = server.url
        result: dict[str, Any] = {"items": server.items, "ready_s": server.ready_s}
        result["readyz"] = httpx.get(f"{url}/readyz").json()
        _load(url, queries, 1, 10)  # warm-up: kernels compiled, caches filled
        for n, count in zip(clients, requests, strict=True):
            result[f"clients_{n}"] = _load(url, queries, n, count)
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            result["device_memory_in_use_gib"] = round((total - free) / 2**30, 2)
        return result


def _load(url: str, queries: list[bytes], clients: int, count: int) -> dict[str, Any]:
    load = send(url, queries, clients, count)
    server = [sum(v for n, v in t.items() if n != "decode") for t in load.timings]
    names = sorted({n for t in load.timings for n in t})
    out = {
        "requests": len(load.latencies),
        "errors": load.errors[:10],
        "requests_per_s": round(len(load.latencies) / load.wall, 1),
        "client_ms": _percentiles([1e3 * s for s in load.latencies]),
        "server_ms_without_decode": _percentiles(server),
        "stage_median_ms": {
            n: round(statistics.median(t.get(n, 0.0) for t in load.timings), 3) for n in names
        },
    }
    print(f"   {clients:2d} clients: {json.dumps(out)}", flush=True)
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda p: ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return {"p50": round(pick(0.5), 3), "p95": round(pick(0.95), 3)}


def query_images(cub: Path | None) -> list[bytes]:
    if cub is not None:
        paths = sorted((cub / "images").rglob("*.jpg"))[::17][:40]
    else:
        paths = sorted((REPO / "gallery").rglob("*-photo.jpg"))
    return [p.read_bytes() for p in paths]


def index_build(cub: Path, out: Path, device: torch.device, inference: str) -> dict[str, Any]:
    sources = scan_folder(cub / "images")
    embedder = Embedder(load_model(device=device), device, half=device.type == "cuda",
                        runtime=inference)  # type: ignore[arg-type]  # fmt: skip
    batch = 64 if device.type == "cuda" else 32
    spec = embedder.model.config.preprocessing
    pixels = torch.stack([preprocess(load_image(s.path), spec)[0] for s in sources])
    embedder.embed_pixels(pixels[:batch].to(device))  # warm-up
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        embedder.embed_pixels(pixels[i : i + batch].to(device)).vector.cpu()
    _sync(device)
    ceiling = len(pixels) / (time.perf_counter() - start)
    start = time.perf_counter()
    report = build_index(sources, out, embedder, batch_size=batch)
    rate = report.indexed / (time.perf_counter() - start)
    index = GalleryIndex.open(out)
    count = index.count
    index.close()
    result = {"images": len(sources), "indexed": count, "batch": batch,
              "workers": default_workers(device), "runtime": embedder.runtime,
              "build_images_per_s": round(rate, 1),
              "forward_only_images_per_s": round(ceiling, 1),
              "build_vs_forward_only": round(rate / ceiling, 3)}  # fmt: skip
    print(f"   {json.dumps(result)}", flush=True)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- targets ------------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's GPU targets against what was measured (None: not measured)."""
    out: dict[str, Any] = {}
    rows = results.get("matching", {}).get("rows", [])
    ours = [r for r in rows if r["path"].startswith("ours")]
    single = [r["ms_per_call"] for r in ours if r["queries"] == 1]
    out["rerank_one_query_ms"] = _target(min(single) if single else None, 0.3, below=True)
    batched = [r["pairs_per_s"] for r in ours if r["queries"] > 1]
    out["rerank_pairs_per_s"] = _target(max(batched) if batched else None, 5e7, below=False)
    search = results.get("search_synthetic", {}).get("clients_1", {})
    p50 = search.get("server_ms_without_decode", {}).get("p50")
    out["search_p50_ms_server_side"] = _target(p50, 5.0, below=True)
    build = results.get("index_build", {}).get("build_vs_forward_only")
    out["index_build_vs_forward_only"] = _target(build, 0.8, below=False)
    return out


def _target(value: float | None, goal: float, below: bool) -> dict[str, Any]:
    met = None if value is None else (value <= goal if below else value >= goal)
    return {"value": value, "goal": goal, "met": met}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--cub", type=Path, help="CUB folder: index build and a real gallery")
    parser.add_argument("--items", type=int, help="synthetic gallery size (default 1,000,000; "
                        "quick: 2,000)")  # fmt: skip
    parser.add_argument(
        "--requests",
        type=int,
        default=300,
        help="requests at 1 client (x4 at 16 clients; default 300)",
    )
    parser.add_argument("--inference", default="auto", choices=["auto", "onnx", "torch"])
    parser.add_argument("--skip", action="append", default=[], help="a section to leave out")
    parser.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    args = parser.parse_args()
    device = torch.device(args.device)
    items = args.items or (2_000 if args.quick else 1_000_000)
    requests = (10, 32) if args.quick else (args.requests, 4 * args.requests)
    results: dict[str, Any] = {"quick": args.quick, "items": items}
    started = time.perf_counter()
    todo: list[tuple[str, Callable[[], Any]]] = [
        ("environment", lambda: environment(device)),
        ("matching", lambda: matching(device, args.quick)),
    ]
    if device.type == "cuda":
        todo.insert(1, ("tests", cuda_tests))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)

        def search_synthetic() -> dict[str, Any]:
            start = time.perf_counter()
            checkpoint = synthetic_gallery(root / "synthetic", items, device)
            made = round(time.perf_counter() - start, 1)
            index, queries = root / "synthetic" / "index", query_images(None)
            result = serve_and_measure(index, checkpoint, device, args.inference, queries,
                                       requests)  # fmt: skip
            # The part grids read the other way (on CUDA they stay on the device by default:
            # read from the host's index instead; on the CPU the reverse), one client.
            other = {"DIML_DEVICE_GRIDS": "0" if device.type == "cuda" else "1"}
            result["grids_other_way"] = serve_and_measure(
                index, checkpoint, device, args.inference, queries, requests[:1], (1,), other
            )
            return {"gallery_made_s": made, **result}

        todo.append(("search_synthetic", search_synthetic))
        if args.cub is not None:
            todo.append(
                ("index_build", lambda: index_build(args.cub, root / "cub", device, args.inference))
            )
            todo.append(("search_cub",
                         lambda: serve_and_measure(root / "cub", None, device, args.inference,
                                                   query_images(args.cub), requests)))  # fmt: skip
        for name, fn in todo:
            if name not in args.skip:
                section(results, name, fn, args.out)
    if device.type == "cuda":
        results["memory"] = {
            "this_process_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        }
    results["targets"] = targets(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
