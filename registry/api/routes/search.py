"""Search: rank compatible bricks for a task description or an example input."""

from __future__ import annotations

from fastapi import APIRouter

from registry.api.deps import RegistryDep
from registry.api.schemas import BrickOut, SearchHitOut, SearchOut
from registry.inputs import SearchRequest

router = APIRouter(prefix="/v1/search", tags=["search"])


@router.post("")
def search(body: SearchRequest, registry: RegistryDep) -> SearchOut:
    """Bricks ranked for ``query``, best first; filters apply before ranking."""
    hits = registry.search(body)
    return SearchOut(
        hits=[
            SearchHitOut(
                brick=BrickOut.of(h.brick), score=h.score, matched=h.matched, text=h.text, similarity=h.similarity
            )
            for h in hits
        ]
    )
