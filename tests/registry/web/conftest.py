"""Fixtures of the web page's browser tests: a real server (``brickyard serve`` on loopback
with a temporary home) holding two tiny base models and a few bricks, and Debian's chromium
driven by Playwright.

The browser is not optional: without ``/usr/bin/chromium`` (``make browser`` installs it)
these tests fail instead of skipping, so CI cannot pass them silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import random_adapter

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "web"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# A description that tries every way of smuggling markup into the page: it must show as text.
HOSTILE = (
    "Summarize a news article in **one sentence**.\n\n"
    "- keeps the names of people\n- drops quotes\n\n"
    '<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> '
    "[click me](javascript:window.pwned=3)"
)


@dataclass
class Uploaded:
    """A brick version the fixture registered, with the bytes it sent."""

    name: str
    version: int
    base_model: str
    config: bytes
    weights: bytes

    @property
    def sha256(self) -> str:
        """sha256 of the weights file, computed here (not read back from the server)."""
        return hashlib.sha256(self.weights).hexdigest()


@dataclass
class WebServer:
    """A running server: its URL, tokens and what was registered."""

    url: str
    home: Path
    process: subprocess.Popen[bytes]
    admin_token: str
    write_token: str = ""
    bricks: dict[str, list[Uploaded]] = field(default_factory=dict)

    def http(self, token: str | None = None) -> httpx.Client:
        """An HTTP client for the API (admin token unless another is given)."""
        return httpx.Client(
            base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {token or self.admin_token}"}
        )

    @property
    def page(self) -> str:
        """URL of the web page."""
        return f"{self.url}/ui/"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_server(home: Path, log: Path, **env: str) -> tuple[str, subprocess.Popen[bytes]]:
    """Start ``brickyard serve`` on a free loopback port; answers (url, process) at once
    (`wait_ready` waits for it)."""
    port = _free_port()
    environment = {
        **os.environ,
        "BRICKYARD_HOME": str(home),
        # Threads instead of child processes: fewer processes on a shared 2-core machine;
        # the child-process modes are tested elsewhere.
        "BRICKYARD_EMBEDDING__ISOLATION": "thread",
        "BRICKYARD_COMPOSE__ISOLATION": "thread",
        **env,
    }
    with open(log, "ab") as out:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "registry", "serve", "--port", str(port), "--log-level", "warning"],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return f"http://127.0.0.1:{port}", process


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the server answers ``/readyz`` (fail with its log if it dies or stalls)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError("server did not start: " + log.read_text())


def start_server(home: Path, log: Path, **env: str) -> tuple[str, subprocess.Popen[bytes]]:
    """`launch_server`, then `wait_ready`."""
    url, process = launch_server(home, log, **env)
    wait_ready(url, process, log)
    return url, process


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Terminate a server started by `start_server`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _register(client: httpx.Client, name: str, base: str, seed: int, **metadata: Any) -> Uploaded:
    config, weights = random_adapter(seed, targets=("q_proj", "v_proj"))
    meta = {"name": name, "base_model": base, **metadata}
    response = client.post(
        "/v1/bricks",
        data={"metadata": json.dumps(meta)},
        files={
            "adapter_config": ("adapter_config.json", config, "application/json"),
            "adapter_weights": ("adapter_model.safetensors", weights, "application/octet-stream"),
        },
    )
    assert response.status_code == 201, response.text
    return Uploaded(name, response.json()["version"], base, config, weights)


@pytest.fixture(scope="package")
def web_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[WebServer]:
    """The server the browser tests look at: bases ``tiny-llama`` and ``tiny-llama-b``
    (with an alias), bricks ``sentiment``, ``translate-ro-en`` (two versions) and
    ``summarize`` (a hostile description).

    Alone, this takes ~50 s on the busy 2-core machine: ~25 s to build the tiny models
    (importing torch; the server starts meanwhile) and ~24 s for the first registration,
    which waits for the embedding model's one-time ONNX export. In the whole suite both are
    shared with earlier tests (session fixtures and export cache)."""
    root = tmp_path_factory.mktemp("web")
    home = root / "home"
    url, process = launch_server(home, root / "server.log")
    try:
        # Built while the server starts (both take seconds: torch, the embedding model).
        llama_base: Path = request.getfixturevalue("llama_base")
        llama_base_single: Path = request.getfixturevalue("llama_base_single")
        wait_ready(url, process, root / "server.log")
        admin = (home / "admin-token").read_text().strip()
        server = WebServer(url, home, process, admin)
        with server.http() as client:
            for name, path, extra in (
                ("tiny-llama", llama_base, {"description": "a tiny random Llama, sharded"}),
                ("tiny-llama-b", llama_base_single, {"aliases": ["example-org/tiny-llama-b"]}),
            ):
                response = client.post("/v1/base-models", json={"name": name, "path": str(path), **extra})
                assert response.status_code == 201, response.text
            created = client.post("/v1/tokens", json={"name": "web-writer", "scope": "write"})
            assert created.status_code == 201, created.text
            server.write_token = created.json()["token"]
            bricks = [
                _register(
                    client,
                    "sentiment",
                    "tiny-llama",
                    11,
                    description="Classify the sentiment of a product review as positive or negative.",
                    examples=["I love this phone, the battery lasts for days.", "Broke after a week. Avoid."],
                    tags=["sentiment", "english"],
                    license="apache-2.0",
                    metrics={"accuracy": 0.91},
                ),
                _register(
                    client,
                    "translate-ro-en",
                    "tiny-llama",
                    12,
                    description="Translate Romanian customer emails to English.",
                    examples=["Bună ziua, aș dori să returnez comanda."],
                    tags=["translation"],
                ),
                _register(
                    client,
                    "translate-ro-en",
                    "tiny-llama",
                    13,
                    description="Translate Romanian customer emails and chat messages to English.",
                    examples=["Bună ziua, aș dori să returnez comanda.", "Mulțumesc pentru ajutor!"],
                    tags=["translation"],
                ),
                _register(
                    client,
                    "summarize",
                    "tiny-llama-b",
                    14,
                    description=HOSTILE,
                    examples=["The city council voted on Tuesday to extend the tram line to the airport."],
                    tags=["summarization", "english"],
                ),
            ]
        for brick in bricks:
            server.bricks.setdefault(brick.name, []).append(brick)
        yield server
    finally:
        stop_server(process)


@pytest.fixture(scope="package")
def chromium_path() -> str:
    """Debian's chromium. Missing is a failure, never a skip (see the module docstring)."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("chromium is not installed: run `make browser` (apt-get install chromium)", pytrace=False)
    return path


@pytest.fixture(scope="package")
def browser(chromium_path: str) -> Iterator[Any]:
    """One headless chromium for these tests (package scope: Playwright's event loop and
    the server are gone before the rest of the suite runs)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield instance
        finally:
            instance.close()


class PageWatch:
    """What a page did that a test wants to hear about: script errors and requests that
    left the server's origin (the page must work air-gapped)."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.errors: list[str] = []
        self.foreign: list[str] = []

    def attach(self, page: Any) -> None:
        """Listen to ``page``."""
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on(
            "console",
            lambda message: (
                self.errors.append(message.text)
                if message.type == "error" and "Failed to load resource" not in message.text
                else None
            ),
        )
        page.on(
            "request",
            lambda request: (
                None if request.url.startswith((self.origin, "data:", "blob:")) else self.foreign.append(request.url)
            ),
        )


@pytest.fixture
def open_page(browser: Any, web_server: WebServer) -> Iterator[Any]:
    """A function opening a fresh browser tab (own session storage) at a viewport; after
    the test, no tab may have had a script error or fetched anything off the server."""
    contexts: list[Any] = []
    watches: list[PageWatch] = []

    def open_(viewport: dict[str, int] = DESKTOP, *, server: WebServer | None = None) -> Any:
        context = browser.new_context(viewport=viewport, accept_downloads=True)
        context.set_default_timeout(15_000)
        contexts.append(context)
        page = context.new_page()
        watch = PageWatch((server or web_server).url)
        watch.attach(page)
        watches.append(watch)
        return page

    try:
        yield open_
        for watch in watches:
            assert watch.foreign == [], f"requests left the server: {watch.foreign}"
            assert watch.errors == [], f"script errors: {watch.errors}"
    finally:
        for context in contexts:
            context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots and timings go (gitignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
