"""The registry's web page: a static shell (HTML, CSS and plain ES modules, no build step)
served by Brickyard itself, so it works without a CDN or any network but the server's.

Owns ``registry/web/static/`` and the routes that serve it: ``/ui/`` for the page,
``/ui/assets/<version>/...`` for its assets, and ``/`` redirecting to the page. The page
holds no data and talks only to the public REST API (``/v1/...``) from the browser, so it
adds no server-side behaviour beyond serving files.

Access: the shell and its assets are public even when ``BRICKYARD_AUTH__OPEN_READS=false``
(they are the same for everybody and reveal nothing); every data call the page makes goes
through the API's usual token checks, and the page asks for a token when one is refused.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from registry.web.bundle import bundle_modules

__all__ = ["BUNDLE", "STATIC_DIR", "WEB_PREFIX", "asset_version", "build_shell", "mount_web"]

WEB_PREFIX = "/ui"
STATIC_DIR = Path(__file__).parent / "static"
BUNDLE = "app.js"  # the page's modules joined (registry.web.bundle), served beside the assets
_ENTRY = "main.js"
_EARLY = "early.js"  # inlined into the page's <head>

# The page loads nothing but its own files and talks to nothing but its own server; the CSP
# makes the browser enforce that. The one inline script is allowed by its hash alone, so an
# injected <script> in a brick description could not run even if it were ever inserted as HTML.
_CSP = (
    "default-src 'self'; script-src 'self' {early}; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_SECURITY = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class _AssetFiles(StaticFiles):
    """`StaticFiles` adding the page's security and caching headers to every answer."""

    def __init__(self, *, directory: Path, headers: dict[str, str]) -> None:
        super().__init__(directory=directory)
        self.extra_headers = headers

    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        """The file, with the page's headers."""
        response = super().file_response(*args, **kwargs)
        response.headers.update(self.extra_headers)
        return response


def asset_version(directory: Path = STATIC_DIR) -> str:
    """A digest of every asset (names and bytes): a new version gets new asset URLs."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(file.relative_to(directory).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def build_shell(assets: str, directory: Path = STATIC_DIR) -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy.

    The HTML names its assets under ``assets`` and carries the early-requests script inline;
    the CSP allows that script by its sha256 and no other inline script.

    Args:
        assets: the URL prefix of this version's assets.
        directory: the static folder (``index.html``, ``js/early.js``).

    Raises:
        ValueError: early.js holds ``</script``, which would end the inline element.
    """
    early = (directory / "js" / _EARLY).read_text(encoding="utf-8")
    if "</script" in early.lower():  # it would end the inline element early
        raise ValueError(f"{_EARLY} must not contain '</script'")
    digest = base64.b64encode(hashlib.sha256(early.encode()).digest()).decode()
    html = (directory / "index.html").read_text(encoding="utf-8")
    html = html.replace("%EARLY_SCRIPT%", early).replace("%ASSETS%", assets)
    return html, _CSP.format(early=f"'sha256-{digest}'")


def mount_web(app: FastAPI) -> None:
    """Serve the web page at ``/ui/`` (``/`` and ``/ui`` redirect there) and its assets at
    ``/ui/assets/<version>/``.

    Assets are cached for a year (immutable): their URLs carry a digest of their content,
    written into the page when it is served, so a browser fetches each version once and a
    repeat visit costs one request for the HTML (measured on the 2-core machine under load:
    revalidating eight assets took 30-60 ms of a 120-280 ms render). A first visit costs the
    HTML, then one round: the stylesheet, the bundled script and the view's data together
    (``bench/web_render.py`` measures both).

    Args:
        app: the application built by `registry.api.create_app`.
    """
    assets = f"{WEB_PREFIX}/assets/{asset_version()}"
    shell, csp = build_shell(assets)
    headers = {**_SECURITY, "Content-Security-Policy": csp}
    immutable = {**headers, "Cache-Control": "public, max-age=31536000, immutable"}
    script = bundle_modules(STATIC_DIR / "js", _ENTRY)

    def to_page() -> RedirectResponse:
        return RedirectResponse(f"{WEB_PREFIX}/", status_code=307)

    def page() -> HTMLResponse:
        return HTMLResponse(shell, headers={**headers, "Cache-Control": "no-cache"})

    def bundle() -> Response:
        return Response(script, media_type="text/javascript; charset=utf-8", headers=immutable)

    app.add_api_route("/", to_page, methods=["GET"], include_in_schema=False)
    app.add_api_route(WEB_PREFIX, to_page, methods=["GET"], include_in_schema=False)
    app.add_api_route(f"{WEB_PREFIX}/", page, methods=["GET"], include_in_schema=False)
    app.add_api_route(f"{assets}/{BUNDLE}", bundle, methods=["GET"], include_in_schema=False)
    app.mount(assets, _AssetFiles(directory=STATIC_DIR, headers=immutable), name="web-assets")
