"""ASGI middlewares that bound request bodies while they stream in.

`BodyLimitMiddleware`: a request announcing more than the limit in ``Content-Length`` is
refused before its body is read; a body that grows past the limit (chunked, or lying about
its length) is cut off as soon as it does, with 413. Nothing is buffered to find out.

`UploadBudgetMiddleware`: uploads (multipart bodies) in flight together may not exceed a
byte budget, since each takes its size in disk (the blob store's staging) while it arrives.
An upload's declared length is reserved before its body is read (a chunked one reserves as
it arrives) and given back when the request ends; past the budget the server answers 503
with ``Retry-After`` (or 413 for an upload the budget could never hold).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.api.problems import problem_response

__all__ = ["BodyLimitMiddleware", "UploadBudget", "UploadBudgetMiddleware"]


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


class UploadBudget:
    """Bytes of uploads in flight, at most ``max_bytes`` (one event loop changes it: no lock)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.in_flight = 0

    def reserve(self, count: int) -> bool:
        """Take ``count`` bytes of the budget; False (nothing taken) when they do not fit."""
        if self.in_flight + count > self.max_bytes:
            return False
        self.in_flight += count
        return True

    def release(self, count: int) -> None:
        """Give back ``count`` reserved bytes."""
        self.in_flight -= count


# Seconds a client is asked to wait: an upload of a few GB at disk speed.
_RETRY_AFTER_S = 10


class UploadBudgetMiddleware:
    """Bound the bytes of multipart uploads in flight together (see the module docstring)."""

    def __init__(self, app: ASGIApp, budget: UploadBudget) -> None:
        self.app = app
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_upload(scope):
            await self.app(scope, receive, send)
            return
        budget = self.budget
        declared = _content_length(scope)
        if declared is not None and declared > budget.max_bytes:
            await _refuse_upload(413, declared, budget, scope, receive, send)
            return
        if declared is not None and not budget.reserve(declared):
            await _refuse_upload(503, declared, budget, scope, receive, send)
            return
        reserved = declared or 0

        async def reserving_receive() -> Message:
            nonlocal reserved
            message = await receive()
            if declared is None and message["type"] == "http.request":
                size = len(message.get("body", b""))
                if not budget.reserve(size):
                    status = 413 if reserved + size > budget.max_bytes else 503
                    headers = {"Connection": "close"}
                    if status == 503:
                        headers["Retry-After"] = str(_RETRY_AFTER_S)
                    raise HTTPException(status, _over_budget(status, reserved + size, budget), headers)
                reserved += size
            return message

        try:
            await self.app(scope, reserving_receive, send)
        finally:
            budget.release(reserved)


def _is_upload(scope: Scope) -> bool:
    if scope.get("method") not in ("POST", "PUT"):
        return False
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            return bytes(value).lower().startswith(b"multipart/")
    return False


def _over_budget(status: int, size: int, budget: UploadBudget) -> str:
    if status == 413:
        return f"an upload of {size} bytes exceeds the server's upload budget of {budget.max_bytes} bytes"
    return (
        f"the server is taking in {budget.in_flight} bytes of uploads (budget {budget.max_bytes}); "
        f"an upload of {size} bytes must wait: retry later"
    )


async def _refuse_upload(
    status: int, size: int, budget: UploadBudget, scope: Scope, receive: Receive, send: Send
) -> None:
    headers = {"Connection": "close"}
    if status == 503:
        headers["Retry-After"] = str(_RETRY_AFTER_S)
    response = problem_response(
        status,
        "payload-too-large" if status == 413 else "service-unavailable",
        "Payload too large" if status == 413 else "Service unavailable",
        _over_budget(status, size, budget),
        instance=scope.get("path"),
        extra={"limit_bytes": budget.max_bytes},
        headers=headers,
    )
    await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
