"""Authentication before the body is read.

An ASGI middleware resolves the ``Authorization: Bearer`` token of every request into an
`Actor` (in ``request.state.actor``) before the application sees the request. A write
(POST, PUT, PATCH, DELETE) without a token that may write is refused right here, so an
unauthenticated client cannot make the server receive a 2 GB upload first.
"""

from __future__ import annotations

from typing import Any

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from registry.api.problems import problem_response
from registry.auth import ANONYMOUS, Actor, require
from registry.auth import Scope as TokenScope
from registry.errors import BrickyardError

__all__ = ["AuthGuard"]

_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# POSTs only because a query is a body (a generation may build an auto recipe: a cached read)
_READS_BY_POST = frozenset({"/v1/search", "/v1/chat/completions", "/v1/completions"})
_UNAUTHENTICATED = Actor("unauthenticated", "admin")
# The API's description: readable exactly when the API is (closed reads close these too).
_DOCS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class AuthGuard:
    """Attach the request's `Actor`; refuse writes lacking the scope before reading bodies."""

    def __init__(self, app: ASGIApp, registry_of: Any) -> None:
        self.app = app
        self.registry_of = registry_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        registry = self.registry_of()
        try:
            if registry.settings.auth.enabled and not _has_authorization(scope):
                actor = ANONYMOUS  # nothing to look up: no thread hop for anonymous reads
            elif (known := self._remembered(registry, scope)) is not None:
                actor = known  # a token found valid with no commit since: no query, no thread hop
            else:
                actor = await anyio.to_thread.run_sync(self._actor, registry, scope)
            path = scope["path"].rstrip("/")
            if path in _DOCS and not registry.settings.auth.open_reads:
                require(actor, "read")
            if scope["method"] in _WRITES and path.startswith("/v1/") and path not in _READS_BY_POST:
                needed: TokenScope = "admin" if path.startswith("/v1/tokens") else "write"
                require(actor, needed)
        except BrickyardError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
            response = problem_response(
                exc.status,
                exc.code,
                exc.title,
                exc.detail,
                instance=scope.get("path"),
                extra=exc.extra,
                headers=headers,
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["actor"] = actor
        await self.app(scope, receive, send)

    @staticmethod
    def _remembered(registry: Any, scope: Scope) -> Actor | None:
        if not registry.settings.auth.enabled:
            return None
        kind, _, token = _authorization(scope).partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            return None
        remembered: Actor | None = registry.tokens.remembered(token.strip())
        return remembered

    @staticmethod
    def _actor(registry: Any, scope: Scope) -> Actor:
        if not registry.settings.auth.enabled:
            return _UNAUTHENTICATED
        header = None
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                header = value.decode("latin-1")
                break
        if header is None:
            return ANONYMOUS
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            from registry.errors import Unauthorized

            raise Unauthorized("malformed Authorization header; send 'Authorization: Bearer <token>'")
        actor: Actor = registry.tokens.authenticate(token.strip())
        return actor


def _authorization(scope: Scope) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            return str(value.decode("latin-1"))
    return ""


def _has_authorization(scope: Scope) -> bool:
    return any(key == b"authorization" for key, _ in scope.get("headers", ()))
