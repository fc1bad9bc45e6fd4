"""Prometheus metrics: requests and latency per route, time per stage of a search."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram

STAGES = (
    "decode",
    "embed",
    "coarse_search",
    "gather",
    "rerank",
    "explain",
    "explain_global",
    "respond",
)
# HTTP methods that get their own label value; any other string a client sends is "other", so
# that invented methods cannot grow the metrics without bound (routes are bounded already:
# route templates, or "unmatched").
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """One registry per app, so that tests and several apps in one process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "diml_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "diml_request_seconds", "request latency", ["route", "method"],
            buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.stages = Histogram(
            "diml_stage_seconds", "time per stage of a request", ["stage"],
            buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


class StageTimer:
    """Times the stages of one request, for the histogram and the ``Server-Timing`` header.

    ``before(name)``, when given, runs as each stage timed with :meth:`stage` starts: the seam
    a test uses to act between two stages of a request (say, delete an item after the coarse
    search found it), by overriding the ``service.deps.get_timer`` dependency."""

    def __init__(self, metrics: Metrics, before: Callable[[str], None] | None = None) -> None:
        self.metrics, self.before = metrics, before
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.before is not None:
            self.before(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.metrics.stages.labels(name).observe(seconds)

    def header(self) -> str:
        return ", ".join(f"{name};dur={1e3 * s:.2f}" for name, s in self.seconds.items())
