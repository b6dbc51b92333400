"""The registry's web page: a static shell (HTML, CSS and plain ES modules, no build step)
served by Brickyard itself, so it works without a CDN or any network but the server's.

Owns ``registry/web/static/`` and the routes that serve it: ``/ui/...`` for the assets and
``/`` redirecting there. The page holds no data and talks only to the public REST API
(``/v1/...``) from the browser, so it adds no server-side behaviour beyond serving files.

Access: the shell and its assets are public even when ``BRICKYARD_AUTH__OPEN_READS=false``
(they are the same for everybody and reveal nothing); every data call the page makes goes
through the API's usual token checks, and the page asks for a token when one is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

__all__ = ["STATIC_DIR", "WEB_PREFIX", "mount_web"]

WEB_PREFIX = "/ui"
STATIC_DIR = Path(__file__).parent / "static"

# The page loads nothing but its own files and talks to nothing but its own server; the CSP
# makes the browser enforce that (and refuses inline script, so an injected <script> in a
# brick description could not run even if it were ever inserted as HTML).
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    # Revalidate on every load (a 304 on loopback costs ~1 ms) so an upgraded server never
    # runs a stale module next to a fresh one.
    "Cache-Control": "no-cache",
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _WebFiles(StaticFiles):
    """`StaticFiles` adding the page's security and caching headers to every answer."""

    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        """The file, with the page's headers."""
        response = super().file_response(*args, **kwargs)
        response.headers.update(_HEADERS)
        return response

    async def get_response(self, path: str, scope: Scope) -> Any:
        """The file or a 404, both with the page's headers (the 404 included: it is HTML too)."""
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def mount_web(app: FastAPI) -> None:
    """Serve the web page at ``/ui/`` (``/`` and ``/ui`` redirect there).

    Args:
        app: the application built by `registry.api.create_app`.
    """

    def to_page() -> RedirectResponse:
        return RedirectResponse(f"{WEB_PREFIX}/", status_code=307)

    app.add_api_route("/", to_page, methods=["GET"], include_in_schema=False)
    app.add_api_route(WEB_PREFIX, to_page, methods=["GET"], include_in_schema=False)
    app.mount(WEB_PREFIX, _WebFiles(directory=STATIC_DIR, html=True), name="web")
