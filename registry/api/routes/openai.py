"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` (`registry.serve`). Errors here use OpenAI's error shape
(`registry.api.problems`), so OpenAI clients raise their usual exceptions."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from registry.errors import InvalidInput
from registry.serve.gateway import Gateway, parse_request, used_headers
from registry.serve.protocol import ChatRequest, CompletionRequest

# Outside Brickyard's OpenAPI schema: these follow OpenAI's API (and its error shape), which
# its own specification describes; the schema fuzzer checks problem+json routes.
router = APIRouter(tags=["openai"], include_in_schema=False)

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError) as exc:
        raise InvalidInput("the request body is not valid JSON", errors=[f"body: {exc}"]) from None


async def _generate(request: Request, kind: type[ChatRequest] | type[CompletionRequest]) -> Any:
    gateway: Gateway = request.app.state.gateway
    parsed = parse_request(kind, await _body(request))
    generation = await gateway.prepare(parsed)
    headers = used_headers(generation.target)
    if not parsed.stream:
        return JSONResponse(await gateway.complete(parsed, generation), headers=headers)
    events, first = await gateway.first_event(generation)
    return StreamingResponse(
        gateway.stream(parsed, generation, events, first),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache"},
    )


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible; model grammar in the README)")
async def chat_completions(request: Request) -> Any:
    """Generate the assistant's answer to ``messages``."""
    return await _generate(request, ChatRequest)


@router.post("/v1/completions", summary="Text completion (OpenAI-compatible; model grammar in the README)")
async def completions(request: Request) -> Any:
    """Continue ``prompt``."""
    return await _generate(request, CompletionRequest)


@router.get("/v1/models", summary="Models servable by the OpenAI routes")
async def list_models(request: Request) -> dict[str, Any]:
    """Bases, ``auto`` routes, bricks and adapter compositions."""
    gateway: Gateway = request.app.state.gateway
    return {"object": "list", "data": await gateway.models()}
