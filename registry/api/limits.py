"""An ASGI middleware that bounds request bodies while they stream in.

A request announcing more than the limit in ``Content-Length`` is refused before its body
is read; a body that grows past the limit (chunked, or lying about its length) is cut off
as soon as it does, with 413. Nothing is buffered to find out.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.api.problems import problem_response

__all__ = ["BodyLimitMiddleware"]


class BodyLimitMiddleware:
    """Refuse request bodies larger than ``max_bytes`` with a 413 problem."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = problem_response(
                413,
                "payload-too-large",
                "Payload too large",
                f"the request body of {declared} bytes exceeds the limit of {self.max_bytes} bytes",
                instance=scope.get("path"),
                extra={"limit_bytes": self.max_bytes},
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside body parsing; FastAPI re-raises HTTPExceptions from there and
                    # the problem handler renders it.
                    raise HTTPException(
                        413, f"the request body exceeds the limit of {self.max_bytes} bytes", {"Connection": "close"}
                    )
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
