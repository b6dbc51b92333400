"""The FastAPI application factory."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from registry.api.guard import AuthGuard
from registry.api.limits import BodyLimitMiddleware, UploadBudget, UploadBudgetMiddleware
from registry.api.offload import BlockingLane
from registry.api.problems import PROBLEM_RESPONSES, document_problems, install_problem_handlers
from registry.api.routes import (
    base_model_changes,
    base_models,
    bricks,
    compositions,
    emergent,
    health,
    hub,
    merge_methods,
    metrics,
    names,
    openai,
    search,
    tokens,
)
from registry.api.warm_up import EmbedderWarmUp
from registry.builds.jobs import WorkerPool
from registry.service import Registry
from registry.settings import Settings
from registry.web import mount_web

__all__ = ["create_app"]

log = logging.getLogger("brickyard.api")

_MULTIPART_SLACK = 64 * 1024


def create_app(settings: Settings | None = None, *, registry: Registry | None = None) -> FastAPI:
    """Build the application.

    Args:
        settings: configuration; default read from the environment.
        registry: an open `Registry` to serve (tests share one); default opened from
            ``settings`` on start-up and closed on shutdown.
    """
    settings = settings or (registry.settings if registry is not None else Settings())
    owns_registry = registry is None
    _limit_blas_threads()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owns_registry:
            app.state.registry = Registry.open(settings)
        token = app.state.registry.bootstrap_admin_token()
        if token is not None:
            print(
                f"\nBrickyard created an admin API token (saved in {app.state.registry.settings.admin_token_file}):\n"
                f"    {token}\nSend it as 'Authorization: Bearer <token>'; create narrower tokens with "
                "`brickyard token create`.\n",
                file=sys.stderr,
                flush=True,
            )
        _sweep_stale_uploads(app.state.registry)
        app.state.warm_up = EmbedderWarmUp(app.state.registry).start()
        # Evictions by this server's workers (threads, or build children reporting through them).
        evictions = app.state.registry.compositions.eviction_listeners
        evictions.append(app.state.metrics.observe_eviction)
        workers = WorkerPool(
            app.state.registry.compositions, app.state.registry.settings, on_build=app.state.metrics.observe_build
        )
        workers.start()
        app.state.workers = workers
        from registry.serve import Gateway

        app.state.gateway = Gateway.open(app.state.registry, wake_builds=workers.wake)
        try:
            yield
        finally:
            await app.state.gateway.aclose()
            workers.stop()
            evictions.remove(app.state.metrics.observe_eviction)  # a shared registry outlives the app
            if owns_registry:
                app.state.registry.close()

    app = FastAPI(
        title="Brickyard",
        version="0.1.0",
        summary="Registry and composition service for LoRA adapter bricks",
        lifespan=lifespan,
        responses=PROBLEM_RESPONSES,
        redirect_slashes=False,
        docs_url=None,  # served from packaged assets by registry.api.docs: no CDN
        redoc_url=None,
    )
    from registry.api.docs import mount_offline_docs
    from registry.api.metrics import Metrics, MetricsMiddleware

    mount_offline_docs(app)
    app.state.metrics = Metrics(lambda: getattr(app.state, "registry", None))
    if registry is not None:
        app.state.registry = registry
    # At most this many threads reading base-model directories (registry.api.offload).
    app.state.base_model_lane = BlockingLane("reading the base model", threads=4)
    limits = settings.limits
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=limits.max_adapter_bytes + limits.max_config_bytes + limits.max_metadata_bytes + _MULTIPART_SLACK,
    )
    app.state.upload_budget = UploadBudget(limits.max_concurrent_upload_bytes)
    app.add_middleware(UploadBudgetMiddleware, budget=app.state.upload_budget)
    app.add_middleware(AuthGuard, registry_of=lambda: app.state.registry)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: counts refusals too
    install_problem_handlers(app)
    # hub last: its /{namespace}/{name}/resolve/... routes must not shadow the others
    for module in (
        health,
        metrics,
        base_models,
        base_model_changes,
        emergent,
        bricks,
        search,
        compositions,
        merge_methods,
        tokens,
        names,
        openai,
        hub,
    ):
        app.include_router(module.router)
    mount_web(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


# Older than any upload in flight (uploads are bounded in size and time): left by a crash.
_STALE_UPLOAD_S = 3600.0


def _sweep_stale_uploads(registry: Registry) -> None:
    """Remove upload staging files a crashed server left, at start-up rather than only at
    ``fsck --repair``; young files may belong to another process's upload and stay."""
    sweep = getattr(registry.blobs, "sweep_staging", None)
    if sweep is None:
        return
    try:
        removed = sweep(older_than_s=_STALE_UPLOAD_S)
    except OSError:
        log.exception("could not sweep stale upload files")
        return
    if removed:
        log.info("removed %d stale upload staging files", removed)


def _limit_blas_threads() -> None:
    """One BLAS thread for numpy in the server. Its searches are single matrix-vector
    products that one core streams as fast as two, and OpenBLAS threads spin-wait after
    each call, stealing the cores torch needs to embed the next query (measured: query
    embedding 21 ms with two BLAS threads, 12 ms with one, on this 2-core machine)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schema = document_problems(schema)
        schema["components"]["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "an API token (`brickyard token create`); writes need scope write, tokens admin",
            }
        }
        schema["security"] = [{}, {"bearer": []}]  # reads may be open; writes need a token
        app.openapi_schema = schema
    return app.openapi_schema
