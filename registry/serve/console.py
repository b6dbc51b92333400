"""``brickyard generate`` / ``brickyard chat``: one generation, streamed to callbacks, from a
server's OpenAI routes (``--url``) or from the local registry with the embedded engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from registry.errors import BrickyardError, InvalidInput, NotFound, ServiceUnavailable

__all__ = ["stream_generation"]

OnText = Callable[[str], None]
OnUsed = Callable[[dict[str, Any]], None]


def stream_generation(
    body: dict[str, Any], *, chat: bool, url: str | None, token: str | None, on_used: OnUsed, on_text: OnText
) -> None:
    """Generate for an OpenAI request ``body`` (``stream`` is set here); ``on_used`` gets the
    ``brickyard`` record once, ``on_text`` each piece of text of choice 0.

    Raises:
        BrickyardError: the request was refused (the server's message), or the engine is down.
    """
    body = {**body, "stream": True}
    if url is None:
        asyncio.run(_local(body, chat, on_used, on_text))
    else:
        _remote(body, chat, url, token, on_used, on_text)


async def _local(body: dict[str, Any], chat: bool, on_used: OnUsed, on_text: OnText) -> None:
    from registry.serve.engine import Piece
    from registry.serve.gateway import Gateway, parse_request
    from registry.serve.protocol import ChatRequest, CompletionRequest
    from registry.service import Registry

    registry = Registry.open()
    gateway = Gateway.open(registry)
    try:
        request = parse_request(ChatRequest if chat else CompletionRequest, body)
        generation = await gateway.prepare(request)
        on_used(generation.target.used)
        async for event in gateway.engine.generate(generation):
            if isinstance(event, Piece) and event.index == 0:
                on_text(event.text)
    finally:
        await gateway.aclose()
        registry.close()


def _remote(body: dict[str, Any], chat: bool, url: str, token: str | None, on_used: OnUsed, on_text: OnText) -> None:
    import httpx

    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.stream("POST", url.rstrip("/") + path, json=body, headers=headers, timeout=600) as response:
            if response.status_code >= 400:
                raise _error(response.status_code, response.read().decode(errors="replace"))
            for line in response.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "brickyard" in chunk:
                    on_used(chunk["brickyard"])
                for choice in chunk.get("choices", []):
                    text = choice.get("text") if not chat else (choice.get("delta") or {}).get("content")
                    if text and choice.get("index", 0) == 0:
                        on_text(text)
    except httpx.TransportError as exc:
        raise ServiceUnavailable(f"cannot reach {url}: {exc}") from None


def _error(status: int, text: str) -> BrickyardError:
    try:
        message = str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = text[:500]
    if status == 404:
        return NotFound(message)
    if status >= 500:
        return ServiceUnavailable(message)
    return InvalidInput(message)
