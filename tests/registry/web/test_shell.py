"""The shell: served by Brickyard itself, self-contained, public even when reads are closed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.web import STATIC_DIR
from tests.registry.web.conftest import WebServer, start_server, stop_server

_IMPORT = re.compile(r"""(?:from|import)\s*["'](\.{1,2}/[^"']+)["']""")
_HTML_REF = re.compile(r"""(?:href|src)="([^"#][^"]*)\"""")


def _assets(html: str) -> set[str]:
    """Every file the page loads: the HTML's links and scripts, then the modules' imports."""
    found = {ref for ref in _HTML_REF.findall(html)}
    todo = [ref for ref in found if ref.endswith(".js")]
    while todo:
        module = todo.pop()
        source = (STATIC_DIR / module).read_text()
        for rel in _IMPORT.findall(source):
            resolved = str(Path(module).parent / rel).replace("/./", "/")
            resolved = str(Path(resolved)).lstrip("./") if resolved.startswith("./") else str(Path(resolved))
            if resolved not in found:
                found.add(resolved)
                todo.append(resolved)
    return found


def test_page_and_every_asset_come_from_the_server(web_server: WebServer) -> None:
    root = httpx.get(web_server.url + "/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/ui/"
    page = httpx.get(web_server.page)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assets = _assets(page.text)
    assert {"app.css", "js/main.js", "js/api.js", "js/views.js", "js/compose.js", "js/schema.js"} <= assets
    types = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for asset in sorted(assets):
        assert "://" not in asset, f"{asset} is not served by Brickyard"
        response = httpx.get(web_server.page + asset)
        assert response.status_code == 200, asset
        assert types[Path(asset).suffix] in response.headers["content-type"], asset
        assert response.headers["x-content-type-options"] == "nosniff"
    # Nothing in the shell points at another host (no CDN, no web font, no analytics).
    for file in STATIC_DIR.rglob("*"):
        if file.is_file():
            text = file.read_text()
            assert not re.search(r"(?:src|href|url|import|from)\s*[=(]?\s*[\"']?(?:https?:)?//", text), file


def test_unknown_asset_is_a_404(web_server: WebServer) -> None:
    assert httpx.get(web_server.page + "js/nope.js").status_code == 404
    assert httpx.get(web_server.url + "/ui/../pyproject.toml").status_code == 404


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
    assert httpx.get(closed_server.page + "js/main.js").status_code == 200
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
