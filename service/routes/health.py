"""``/healthz`` (alive), ``/readyz`` (model and index loaded, canary passed), ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.auth import MetricsRead
from service.errors import error_response
from service.schemas import ErrorBody, Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> dict[str, Any]:
    """The process is up (it may still be loading)."""
    return {"status": "alive"}


@router.get("/readyz", response_model=Health, responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> Any:
    """200 once the model and index are loaded and a canary search passed; 503 before.
    Answered on the event loop, never behind work in the thread pool."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        if failure := getattr(request.app.state, "load_error", None):  # it will not recover
            return error_response(503, "load_failed", f"{failure}; the server log says why, "
                                  "and the service will not be ready until it is fixed and "
                                  "restarted")  # fmt: skip
        loading = getattr(request.app.state, "loading", None)
        message = loading or "loading the model and the index"
        return error_response(503, "not_ready", message, {"Retry-After": "5"})
    return JSONResponse(
        {
            "status": "ready",
            "items": engine.count,
            "model": engine.fingerprint[:16],
            "device": str(engine.embedder.device),
            "inference": engine.embedder.runtime,
            "coarse_search": "torch" if engine.device_search is not None else "faiss",
            "grids": "device" if engine.grids_on_device else "index",
        }
    )


METRICS: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}},
          "description": "the Prometheus text format"},
    401: {"model": ErrorBody, "description": "DIML_PROTECT_METRICS is set, and no key came"},
    403: {"model": ErrorBody, "description": "DIML_PROTECT_METRICS is set, and the key is wrong"},
}  # fmt: skip


@router.get("/metrics", response_class=Response, dependencies=[MetricsRead], responses=METRICS)
def metrics(request: Request) -> Response:
    """Prometheus text format; needs a read key when DIML_PROTECT_METRICS is set."""
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
