"""``GET /metrics``: Prometheus text exposition (see `registry.api.metrics` for the series).

Guarded like every read: open when ``auth.open_reads`` is on (the default), otherwise a
scraper needs a token with scope ``read`` (Prometheus: ``authorization: {credentials: ...}``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from registry.api.deps import ReadActor

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, _: ReadActor) -> Response:
    """Request counts and latencies per route, search stage timings, builds, the composition
    queue and cache, embedding child restarts (Prometheus text format)."""
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)
