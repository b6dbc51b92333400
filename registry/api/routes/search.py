"""Search: rank compatible bricks for a task description or an example input."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from registry.api.deps import ReadActor, RegistryDep
from registry.api.schemas import BrickOut, SearchHitOut, SearchOut
from registry.inputs import SearchRequest

router = APIRouter(prefix="/v1/search", tags=["search"])


@router.post("")
def search(body: SearchRequest, registry: RegistryDep, request: Request, response: Response, _: ReadActor) -> SearchOut:
    """Bricks ranked for ``query``, best first; filters apply before ranking.

    The ``Server-Timing`` header splits the time between embedding the query (``embed``),
    candidate generation (``index``) and ranking plus brick lookup (``rank``).
    """
    result = registry.search(body)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.observe_search(result.timings_ms)
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.2f}" for k, v in result.timings_ms.items())
    hits = result.hits
    return SearchOut(
        hits=[
            SearchHitOut(
                brick=BrickOut.of(h.brick), score=h.score, matched=h.matched, text=h.text, similarity=h.similarity
            )
            for h in hits
        ]
    )
