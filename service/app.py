"""``create_app()``: the FastAPI application, its lifespan and middleware."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from index_builder import build_index, index_exists, scan_folder
from model import Embedder, EmbeddingNet, configure_decoders, load_model
from service import errors, openapi
from service.auth import AuthBeforeBody
from service.engine import Engine
from service.limits import BodyLimits, return_freed_images_to_the_system
from service.metrics import Metrics, method_label
from service.routes import duplicates, explain, gallery, health, search
from service.routing import HeadAsGet
from service.settings import Settings, get_settings
from service.text import TextIsValid

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"

DESCRIPTION = """Image search that explains itself. Each result comes with the parts of the two
images that matched and how much each pair contributed: `score = global + w x structural` (w,
the model's `structural_weight`, is in every explanation), and the structural similarity is the
sum of the part contributions."""


def create_app(settings: Settings | None = None, load_in_background: bool = True) -> FastAPI:
    """The service. The model and index load in a background thread at start-up, so that
    ``/healthz`` answers at once and ``/readyz`` turns 200 when loading and a canary passed."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        return_freed_images_to_the_system()
        configure_decoders()
        loader = threading.Thread(target=_load, args=(app, settings), daemon=True)
        loader.start()
        if not load_in_background:
            loader.join()
        yield
        loader.join(timeout=60)
        engine: Engine | None = getattr(app.state, "engine", None)
        if engine is not None:
            app.state.engine = None
            engine.close()

    app = FastAPI(title="DIML retrieval", description=DESCRIPTION, version="2",
                  lifespan=lifespan)  # fmt: skip
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.engine = None
    app.state.load_error = None
    app.state.loading = "loading the model and the index"
    errors.install(app)
    for module in (search, explain, gallery, duplicates, health):
        app.include_router(module.router)
    openapi.install(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        """The web page: search by image and see why each result matches."""
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.add_middleware(HeadAsGet)  # inside record, which counts HEAD as HEAD

    @app.middleware("http")
    async def record(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        method = method_label(request.method)
        response = await call_next(request)
        route = request.scope.get("route")  # its template without convertors: /gallery/{item_id}
        path = getattr(route, "path_format", None) or getattr(route, "path", "unmatched")
        metrics: Metrics = request.app.state.metrics
        metrics.requests.labels(path, method, str(response.status_code)).inc()
        metrics.latency.labels(path, method).observe(time.perf_counter() - start)
        return response

    app.add_middleware(TextIsValid)  # inside BodyLimits: sees the body once it is bounded
    app.add_middleware(
        BodyLimits,
        limit=settings.max_upload_bytes,
        total_s=settings.body_timeout_s,
        idle_s=settings.body_idle_timeout_s,
    )
    app.add_middleware(AuthBeforeBody, settings=settings)
    return app


def _load(app: FastAPI, settings: Settings) -> None:
    try:
        model = None
        if settings.gallery is not None:
            model = _index_gallery_on_first_start(app, settings, settings.gallery)
        app.state.loading = "loading the model and the index"
        engine = Engine(settings, model)
        engine.canary()
    except Exception as e:  # nothing retries: a restart, after the log's fix, is needed
        log.error("%s failed, and the service will not become ready: %s", app.state.loading, e)
        app.state.load_error = f"{app.state.loading} failed"  # said to clients: no paths
        return
    app.state.engine = engine
    app.state.loading = None
    log.info("ready: %d items, model %s", engine.count, engine.fingerprint[:16])


def _index_gallery_on_first_start(
    app: FastAPI, settings: Settings, gallery: Path
) -> EmbeddingNet | None:
    """Build the index of ``gallery`` when ``settings.index`` holds none yet (first start; an
    interrupted first build resumes); returns the model it loaded, for the engine to reuse."""
    if index_exists(settings.location):
        return None
    app.state.loading = "indexing the gallery (first start)"
    device = torch.device(settings.device)
    model = load_model(settings.checkpoint, device=device)
    embedder = Embedder(model, device, half=device.type == "cuda", runtime=settings.inference)
    report = build_index(scan_folder(gallery), settings.location, embedder)
    log.info(
        "indexed the gallery %s: %d images, %d skipped", gallery, report.indexed,
        len(report.skipped),
    )  # fmt: skip
    return model
