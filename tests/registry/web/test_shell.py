"""The shell: served by Brickyard itself, self-contained, public even when reads are closed."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest

from registry.web import BUNDLE, STATIC_DIR, asset_version, build_shell
from tests.registry.web.conftest import WebServer, start_server, stop_server

_IMPORT = re.compile(r"""(?:from|import)\s*["'](\.{1,2}/[^"']+)["']""")
_HTML_REF = re.compile(r"""(?:href|src)="([^"#][^"]*)\"""")


def _assets(page_url: str, html: str) -> dict[str, httpx.Response]:
    """Every file the page loads, fetched: the HTML's links and scripts, then every module
    they import (resolved like the browser does, relative to the importing module)."""
    todo = [urljoin(page_url, ref) for ref in _HTML_REF.findall(html)]
    fetched: dict[str, httpx.Response] = {}
    while todo:
        url = todo.pop()
        if url in fetched:
            continue
        response = fetched[url] = httpx.get(url)
        if url.endswith(".js") and response.status_code == 200:
            todo += [urljoin(url, rel) for rel in _IMPORT.findall(response.text)]
    return fetched


def test_page_and_every_asset_come_from_the_server(web_server: WebServer) -> None:
    root = httpx.get(web_server.url + "/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/ui/"
    page = httpx.get(web_server.page)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    # One inline script, allowed by its sha256 and by nothing broader; it is early.js verbatim.
    inline = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    assert inline == [(STATIC_DIR / "js" / "early.js").read_text()]
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}';" in csp and "unsafe-inline" not in csp
    assets = _assets(web_server.page, page.text)
    prefix = f"{web_server.url}/ui/assets/{asset_version()}/"
    names = {url.removeprefix(prefix) for url in assets}
    # A first visit asks for three files: the stylesheet, the icon and one script joining
    # every module of js/ (each module's exports are in it) but the inlined early.js.
    assert names == {"app.css", "favicon.svg", BUNDLE}
    bundle = assets[prefix + BUNDLE].text
    modules = {p.name for p in (STATIC_DIR / "js").glob("*.js")} - {"early.js"}
    for module in modules:
        for name in re.findall(
            r"^export (?:async )?(?:function|class|const) (\w+)", (STATIC_DIR / "js" / module).read_text(), re.M
        ):
            assert re.search(rf"\b(?:function|class|const) {name}\b", bundle), (module, name)
    assert not re.search(r"^\s*(?:import|export)\b", bundle, re.M)
    types = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for url, response in assets.items():
        assert response.status_code == 200, url
        assert types[Path(url).suffix] in response.headers["content-type"], url
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "immutable" in response.headers["cache-control"]
    # Nothing in the shell points at another host (no CDN, no web font, no analytics).
    for file in STATIC_DIR.rglob("*"):
        if file.is_file():
            text = file.read_text()
            assert not re.search(r"(?:src|href|url|import|from)\s*[=(]?\s*[\"']?(?:https?:)?//", text), file


def test_unknown_assets_are_404(web_server: WebServer) -> None:
    assert httpx.get(f"{web_server.url}/ui/assets/{asset_version()}/js/nope.js").status_code == 404
    assert httpx.get(f"{web_server.url}/ui/assets/0123456789abcdef/js/main.js").status_code == 404
    assert httpx.get(f"{web_server.url}/ui/assets/{asset_version()}/../../../pyproject.toml").status_code == 404


def test_asset_version_follows_the_content(tmp_path: Path) -> None:
    (tmp_path / "a.js").write_text("export const a = 1;")
    first = asset_version(tmp_path)
    assert asset_version(tmp_path) == first
    (tmp_path / "a.js").write_text("export const a = 2;")
    assert asset_version(tmp_path) != first


def test_shell_inlines_early_script_allowed_by_its_hash_only(tmp_path: Path) -> None:
    (tmp_path / "js").mkdir()
    (tmp_path / "index.html").write_text('<script>%EARLY_SCRIPT%</script><script src="%ASSETS%/app.js"></script>')
    (tmp_path / "js" / "early.js").write_text("window.x = 1;\n")
    html, csp = build_shell("/ui/assets/v1", tmp_path)
    assert html == '<script>window.x = 1;\n</script><script src="/ui/assets/v1/app.js"></script>'
    expected = base64.b64encode(hashlib.sha256(b"window.x = 1;\n").digest()).decode()
    assert f"script-src 'self' 'sha256-{expected}';" in csp
    (tmp_path / "js" / "early.js").write_text("const s = '</SCRIPT>';\n")
    with pytest.raises(ValueError, match="must not contain"):
        build_shell("/ui/assets/v1", tmp_path)


@pytest.fixture(scope="module")
def closed_server(web_server: WebServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A second server on the same home with reads closed (no builds of its own)."""
    log = tmp_path_factory.mktemp("closed") / "server.log"
    url, process = start_server(
        web_server.home, log, BRICKYARD_AUTH__OPEN_READS="false", BRICKYARD_COMPOSE__WORKERS="0"
    )
    try:
        yield WebServer(url, web_server.home, process, web_server.admin_token, web_server.write_token)
    finally:
        stop_server(process)


def test_shell_is_public_when_reads_are_closed(closed_server: WebServer) -> None:
    assert httpx.get(closed_server.page).status_code == 200
    assert httpx.get(f"{closed_server.url}/ui/assets/{asset_version()}/js/main.js").status_code == 200
    assert httpx.get(closed_server.url + "/v1/base-models").status_code == 401


def test_closed_reads_ask_for_a_token_then_show_the_data(closed_server: WebServer, open_page: Any) -> None:
    page = open_page(server=closed_server)
    page.goto(closed_server.page)
    alert = page.locator("main .message.error")
    alert.wait_for()
    assert "401" in alert.inner_text() and "needs an API token" in alert.inner_text()
    alert.get_by_role("button", name="Set a token").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Token").fill(closed_server.write_token)
    dialog.get_by_role("button", name="Save").click()
    page.locator("#base-models").wait_for()
    assert page.locator("#bricks tbody tr").count() == 3
    # The token lives in session storage, never in the address.
    assert closed_server.write_token not in page.url
    assert page.evaluate("sessionStorage.getItem('brickyard.token')") == closed_server.write_token
