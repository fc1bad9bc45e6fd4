"""A mixed soak: clients search, explain, browse, add and delete for minutes; memory stays flat.

    .venv/bin/python bench/soak.py [--minutes 10] [--clients 8] [--warmup-s 60] [--json out.json]
                                   [--index DIR] [--checkpoint FILE]

A real ``diml serve`` on a copy of an index (by default the embedded gallery's, built by the
default model). Each client loops over a mix: 50 % searches by upload, 10 % searches by id, 10 %
explanations, 10 % gallery pages, 10 % adds of a new picture and 10 % deletes of what the soak
added (so the gallery keeps its size). The server's resident memory is sampled every second;
after ``--warmup-s`` its level is the reference, and the soak passes when no later sample is more
than 15 % above it and no answer was a 5xx. Prints requests per kind with p50 / p99 latency,
throughput, and the memory figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from crash_test import add_index_args, new_picture, scratch_index  # noqa: E402

from tests.live_server import Server  # noqa: E402

GROWTH_LIMIT = 0.15
MIX = (("search", 0.5), ("search by id", 0.1), ("explain", 0.1), ("browse", 0.1),
       ("add", 0.1), ("delete", 0.1))  # fmt: skip


class Soak:
    """The clients' shared record: latencies and statuses per kind, the items they added."""

    def __init__(self, ids: list[int], queries: list[bytes]) -> None:
        self.ids, self.queries = ids, queries
        self.added: list[int] = []
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.lock = threading.Lock()

    def client(self, url: str, seed: int, until: float) -> None:
        rng = np.random.default_rng(seed)
        kinds = [k for k, _ in MIX]
        weights = np.array([w for _, w in MIX])
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < until:
                kind = kinds[int(rng.choice(len(kinds), p=weights))]
                start = time.perf_counter()
                status = self.request(http, kind, rng)
                if status is None:
                    continue
                with self.lock:
                    self.latency[kind].append(time.perf_counter() - start)
                    self.statuses[kind][status] += 1

    def request(self, http: httpx.Client, kind: str, rng: np.random.Generator) -> int | None:
        some_id = self.ids[int(rng.integers(len(self.ids)))]
        if kind == "search":
            query = self.queries[int(rng.integers(len(self.queries)))]
            return http.post("/search", files={"image": ("q.jpg", query)}).status_code
        if kind == "search by id":
            return http.post(f"/search/by-id/{some_id}").status_code
        if kind == "explain":
            other = self.ids[int(rng.integers(len(self.ids)))]
            return http.get("/explain", params={"a_id": some_id, "b_id": other}).status_code
        if kind == "browse":
            return http.get("/gallery", params={"offset": int(rng.integers(50))}).status_code
        if kind == "add":
            r = http.post("/gallery", files={"images": ("new.png", new_picture(rng))})
            if r.status_code == 201:
                with self.lock:
                    self.added += [i["id"] for i in r.json()["added"]]
            return r.status_code
        with self.lock:
            if not self.added:
                return None
            item_id = self.added.pop(int(rng.integers(len(self.added))))
        return http.delete(f"/gallery/{item_id}").status_code


def run(args: argparse.Namespace) -> dict[str, object]:
    with scratch_index(args) as index:
        server = Server(index, args.checkpoint)
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url) as http:
                ids = [i["id"] for i in http.get("/gallery", params={"limit": 500}).json()["items"]]
            queries = [p.read_bytes() for p in sorted((REPO / "gallery").rglob("*.jpg"))[:16]]
            soak = Soak(ids, queries)
            start = time.monotonic()
            until = start + args.minutes * 60
            workers = [threading.Thread(target=soak.client, args=(server.url, c, until))
                       for c in range(args.clients)]  # fmt: skip
            for w in workers:
                w.start()
            samples: list[tuple[float, float]] = []
            while any(w.is_alive() for w in workers):
                samples.append((time.monotonic() - start, server.rss_mb()))
                time.sleep(1.0)
            for w in workers:
                w.join()
            elapsed = time.monotonic() - start
        finally:
            server.stop()
    after_warmup = [rss for t, rss in samples if t >= args.warmup_s]
    reference = after_warmup[0] if after_warmup else float("nan")
    peak = max(after_warmup) if after_warmup else float("nan")
    kinds = {
        kind: {
            "requests": len(times),
            "p50_ms": 1000 * float(np.percentile(times, 50)),
            "p99_ms": 1000 * float(np.percentile(times, 99)),
            "statuses": dict(sorted(soak.statuses[kind].items())),
        }
        for kind, times in sorted(soak.latency.items())
    }
    errors = sum(n for s in soak.statuses.values() for code, n in s.items() if code >= 500)
    return {
        "minutes": args.minutes,
        "clients": args.clients,
        "requests_per_s": sum(len(t) for t in soak.latency.values()) / elapsed,
        "kinds": kinds,
        "server_errors": errors,
        "rss_mb": {
            "after_warmup": reference,
            "peak_after_warmup": peak,
            "end": samples[-1][1] if samples else float("nan"),
            "growth": peak / reference - 1,
        },
        "rss_samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup-s", type=float, default=60)
    add_index_args(parser, "also write the summary (and RSS samples) here")
    args = parser.parse_args(argv)
    summary = run(args)
    print(f"{args.minutes:g} min, {args.clients} clients: "
          f"{summary['requests_per_s']:.1f} requests/s")  # fmt: skip
    kinds = summary["kinds"]
    assert isinstance(kinds, dict)
    for kind, k in kinds.items():
        print(f"  {kind:<14} {k['requests']:>7} requests  p50 {k['p50_ms']:7.1f} ms  "
              f"p99 {k['p99_ms']:7.1f} ms  {k['statuses']}")  # fmt: skip
    rss = summary["rss_mb"]
    assert isinstance(rss, dict)
    print(f"RSS after warm-up {rss['after_warmup']:.0f} MiB, peak {rss['peak_after_warmup']:.0f} "
          f"MiB ({100 * rss['growth']:+.1f} %), end {rss['end']:.0f} MiB; "
          f"server errors: {summary['server_errors']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    ok = summary["server_errors"] == 0 and rss["growth"] <= GROWTH_LIMIT
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
