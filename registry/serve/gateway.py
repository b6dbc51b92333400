"""The gateway: an OpenAI request -> a routed `Target` -> an engine -> an OpenAI response.

Responses (and the first streamed chunk) carry ``brickyard``: the model asked for, the base
model, the bricks with versions, weights and (for ``auto``) search scores, the recipe id, and
a ``note`` when ``auto`` fell back to the base. The same record is in the ``X-Brickyard-Used``
header (compact JSON), with ``X-Brickyard-Base`` and ``X-Brickyard-Recipe``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import ValidationError

from registry.errors import InvalidInput
from registry.inputs import validation_errors
from registry.serve.engine import Done, Engine, Generation, Piece, Relayed, Started
from registry.serve.protocol import ChatRequest, CompletionRequest
from registry.serve.routing import Router, Target

if TYPE_CHECKING:
    from registry import domain
    from registry.service import Registry
    from registry.settings import Settings

__all__ = ["Gateway", "make_engine", "parse_request"]

Request = CompletionRequest | ChatRequest


def parse_request(kind: type[Request], body: Any) -> Request:
    """Validate an OpenAI request body.

    Raises:
        InvalidInput: every problem listed; ``extra["param"]`` names the first field at fault.
    """
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object", errors=["body: expected an object"])
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]["loc"]
        raise InvalidInput(
            "invalid request: " + "; ".join(validation_errors(exc)),
            errors=validation_errors(exc),
            extra={"param": ".".join(str(p) for p in first) or None},
        ) from None


def make_engine(settings: Settings) -> Engine:
    """The engine ``settings.serve.engine`` names."""
    if settings.serve.engine == "vllm":
        from registry.serve.vllm import VllmEngine

        return VllmEngine(settings.serve)
    from registry.serve.embedded import EmbeddedEngine

    return EmbeddedEngine(settings.serve, log_path=settings.serve_dir / "engine.log")


class Gateway:
    """Routing plus an engine; what the OpenAI routes call."""

    def __init__(self, registry: Registry, engine: Engine, *, wake_builds: Callable[[], None] | None = None) -> None:
        """Serve ``registry``'s models on ``engine``; ``wake_builds`` starts queued compositions."""
        self.registry = registry
        self.engine = engine
        self.router = Router(registry, wake_builds)

    @classmethod
    def open(cls, registry: Registry, *, wake_builds: Callable[[], None] | None = None) -> Gateway:
        """A gateway on the engine the registry's settings choose."""
        return cls(registry, make_engine(registry.settings), wake_builds=wake_builds)

    async def brick_deleted(self, brick: domain.Brick) -> None:
        """A brick version is gone: drop the cached routing plans and unload it from the engine
        under every name it may have been loaded by (``name@version``, and ``name``, which a
        client asking vLLM directly may have had resolved to this version)."""
        self.router.forget()
        await self.engine.forget([brick.ref, brick.name])

    async def aclose(self) -> None:
        """Stop the engine."""
        await self.engine.aclose()

    async def prepare(self, request: Request) -> Generation:
        """Route a request (search, compose and wait for a build: in a worker thread)."""
        target = await anyio.to_thread.run_sync(self.router.route, request.model, request.query, request.brickyard)
        messages = [m.model_dump() for m in request.messages] if isinstance(request, ChatRequest) else None
        return Generation(
            target=target,
            prompt=request.prompt if isinstance(request, CompletionRequest) else None,
            messages=messages,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stops,
            n=request.n,
            stream=request.stream,
            relay=self.registry.settings.serve.relay,
        )

    async def complete(self, request: Request, generation: Generation) -> dict[str, Any]:
        """A whole (non-streamed) response."""
        texts = [""] * generation.n
        reasons = ["stop"] * generation.n
        prompt_tokens = completion_tokens = 0
        events = self.engine.generate(generation)
        try:
            async for event in events:
                if isinstance(event, Started):
                    prompt_tokens = event.prompt_tokens
                elif isinstance(event, Piece):
                    texts[event.index] += event.text
                elif isinstance(event, Done):
                    reasons[event.index] = event.finish_reason
                    completion_tokens += event.tokens
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        chat = isinstance(request, ChatRequest)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
            if chat
            else {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
        ]
        return {
            "id": _response_id(chat),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "brickyard": generation.target.used,
        }

    async def first_event(self, generation: Generation) -> tuple[AsyncIterator[Any], Any]:
        """Start a generation and wait for its first event, so an engine's refusal is still an
        error response and not a broken stream."""
        events = self.engine.generate(generation)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await events.aclose()  # type: ignore[attr-defined]
            raise
        return events, first

    async def stream(
        self, request: Request, generation: Generation, events: AsyncIterator[Any], first: Any
    ) -> AsyncIterator[bytes]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
        chat = isinstance(request, ChatRequest)
        head = {
            "id": _response_id(chat),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": request.model,
        }
        if isinstance(first, Relayed) and first.response_id:
            head["id"] = first.response_id  # the relayed chunks' id: one id for the whole stream

        def chunk(index: int, text: str | None, reason: str | None, **extra: Any) -> bytes:
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if extra.pop("role", False):
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
            return b"data: " + json.dumps({**head, "choices": [choice], **extra}).encode() + b"\n\n"

        try:
            for index in range(generation.n):
                yield chunk(index, "" if chat else None, None, role=True, brickyard=generation.target.used)
            pending = [first] if first is not None else []
            while True:
                if pending:
                    event = pending.pop()
                else:
                    try:
                        event = await events.__anext__()
                    except StopAsyncIteration:
                        break
                if isinstance(event, Relayed):
                    yield event.data
                elif isinstance(event, Piece):
                    yield chunk(event.index, event.text, None)
                elif isinstance(event, Done) and event.finish_reason != "cancelled":
                    yield chunk(event.index, None, event.finish_reason)
            yield b"data: [DONE]\n\n"
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: bases, ``auto:<base>``, bricks (latest and ``@version``), and
        ready adapter compositions."""
        return await anyio.to_thread.run_sync(self._models)

    def _models(self) -> list[dict[str, Any]]:
        created = int(time.time())

        def entry(model_id: str, parent: str | None, kind: str) -> dict[str, Any]:
            return {"id": model_id, "object": "model", "created": created, "owned_by": "brickyard",
                    "parent": parent, "brickyard": {"kind": kind}}  # fmt: skip

        out = []
        for base in self.registry.list_base_models():
            out.append(entry(base.name, None, "base"))
            out.append(entry(f"auto:{base.name}", base.name, "auto"))
        bases = {base.name for base in self.registry.list_base_models()}
        if len(bases) == 1:
            out.append(entry("auto", next(iter(bases)), "auto"))
        cursor = None
        while True:
            page = self.registry.list_bricks(limit=200, cursor=cursor)
            for brick in page.items:
                out.append(entry(brick.name, brick.base_model, "brick"))
                out.append(entry(brick.ref, brick.base_model, "brick"))
            cursor = page.next_cursor
            if cursor is None:
                break
        for composition in self.registry.ready_compositions():
            if composition.output == "adapter":
                base_name = dict(composition.recipe)["base_model"]["name"]  # type: ignore[index]
                out.append(entry(composition.id, str(base_name), "composition"))
        return out


def used_headers(target: Target) -> dict[str, str]:
    """The ``X-Brickyard-*`` headers of a response."""
    used = json.dumps(target.used, separators=(",", ":"), ensure_ascii=True)
    headers = {"X-Brickyard-Used": used, "X-Brickyard-Base": target.base.name}
    if target.used.get("recipe_id"):
        headers["X-Brickyard-Recipe"] = str(target.used["recipe_id"])
    return headers


def _response_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
