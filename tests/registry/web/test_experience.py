"""How the page feels: keyboard-only use, phone width, render time, no layout shift,
screenshots (saved under tests/artifacts/web)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from registry.web import BUNDLE
from tests.registry.web.conftest import DESKTOP, PHONE, WebServer

RENDERED = "performance.getEntriesByName('brickyard:rendered').length > 0"
RESULTS = "performance.getEntriesByName('brickyard:results').length > 0"


def wait_rendered(page: Any, timeout_s: float = 15, mark: str = RENDERED) -> None:
    """Wait for the view's render mark. (Polled with evaluate: the page's CSP forbids the
    string eval that ``wait_for_function`` uses, and the test must not relax the CSP.)"""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(mark):
        assert time.monotonic() < deadline, "the view did not render"
        time.sleep(0.01)


# Sum of layout-shift scores (the CLS metric), collected from the first paint on.
WATCH_SHIFTS = """
window.__shift = 0;
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) if (!entry.hadRecentInput) window.__shift += entry.value;
}).observe({ type: "layout-shift", buffered: true });
"""
CATASTROPHE_MS = 1500  # see test_render_time_and_layout_shift
LOADS = 5


def _load(page: Any, url: str) -> float:
    """Open ``url`` in a new document; answers ms from navigation start to the view rendered."""
    page.goto("about:blank")
    page.goto(url)
    wait_rendered(page)
    return float(page.evaluate("performance.getEntriesByName('brickyard:rendered')[0].startTime"))


def _focused(page: Any) -> str:
    script = "(() => { const e = document.activeElement; return e.tagName+':'+e.textContent.trim().slice(0, 40) })()"
    return str(page.evaluate(script))


def _tab_to(page: Any, text: str, limit: int = 40) -> None:
    """Press Tab until the focused element's text starts with ``text``."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if _focused(page).split(":", 1)[1].startswith(text):
            return
    raise AssertionError(f"{text!r} not reachable with Tab; focus is on {_focused(page)}")


@pytest.fixture(scope="module")
def composition_id(web_server: WebServer) -> str:
    """A ready composition to look at (linear adapter of two bricks)."""
    body = {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}, {"name": "translate-ro-en", "weight": -0.5}]}
    with web_server.http(web_server.write_token) as client:
        created = client.post("/v1/compositions", json={**body, "output": "adapter"})
        assert created.status_code in (200, 202), created.text
        identifier = str(created.json()["id"])
        deadline = time.monotonic() + 60
        while client.get(f"/v1/compositions/{identifier}").json()["status"] != "ready":
            assert time.monotonic() < deadline, "composition not ready"
            time.sleep(0.1)
    return identifier


def _pages(web_server: WebServer, composition_id: str) -> dict[str, str]:
    return {
        "browse": web_server.page,
        "brick": web_server.page + "#/bricks/summarize",
        "search": web_server.page + "#/search?q=translate+emails+from+romanian&mode=description",
        "compose": web_server.page + "#/compose",
        "composition": web_server.page + f"#/compositions/{composition_id}",
        "chat": web_server.page + "#/chat",
    }


def test_keyboard_only(web_server: WebServer, open_page: Any) -> None:
    page = open_page()
    page.goto(web_server.page)
    wait_rendered(page)
    page.keyboard.press("Tab")
    assert _focused(page) == "A:Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"

    # Navigation -> search -> result -> brick page, with focus moved to each new heading.
    _tab_to(page, "Search")
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("Search bricks")
    assert _focused(page) == "H1:Search bricks"
    _tab_to(page, "")  # the first control of the form: the query-kind radio
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "search-query"
    page.keyboard.type("classify the sentiment of reviews")
    page.keyboard.press("Enter")
    expect(page.locator("#hits")).to_be_visible()
    assert _focused(page).startswith("H2:")
    page.keyboard.press("Tab")
    assert _focused(page) == "A:sentiment@1"
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("sentiment@1")
    assert _focused(page) == "H1:sentiment@1"

    # The token dialog opens, takes focus, and Escape gives focus back.
    page.keyboard.press("Shift+Tab")
    for _ in range(20):
        if _focused(page).startswith("BUTTON:Token"):
            break
        page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "token-input"
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_be_hidden()
    assert _focused(page).startswith("BUTTON:Token")

    # Compose: add and remove brick rows without a mouse.
    page.goto(web_server.page + "#/compose")
    wait_rendered(page)
    page.locator("h1").focus()
    _tab_to(page, "Add a brick")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "brick-2"
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Remove brick 2"
    page.keyboard.press("Enter")
    expect(page.locator(".brick-row")).to_have_count(1)
    assert _focused(page) == "BUTTON:Add a brick"


def test_every_field_has_a_label_and_the_page_has_landmarks(
    web_server: WebServer, open_page: Any, composition_id: str
) -> None:
    page = open_page()
    for name, url in _pages(web_server, composition_id).items():
        _load(page, url)
        unlabeled = page.evaluate(
            """[...document.querySelectorAll("main input, main select, main textarea, dialog input")]
               .filter((e) => !e.labels?.length && !e.getAttribute("aria-label")).map((e) => e.outerHTML)"""
        )
        assert unlabeled == [], (name, unlabeled)
        assert page.locator("header").count() == 1 and page.locator("nav").count() == 1
        assert page.locator("main h1").count() == 1, name
    nav = page.get_by_role("navigation", name="Main")
    assert nav.get_by_role("link").all_inner_texts() == ["Browse", "Search", "Compose", "Compositions", "Try a model"]


# What a load did, from the page's own Performance API (entries exist once a response ended,
# so after the render mark every request the view waited for is listed).
LOAD_FACTS = """(() => {
  const resources = performance.getEntriesByType("resource");
  const early = window.brickyardEarly || { started: [], requests: {} };
  return {
    assets: resources.filter((r) => r.name.includes("/ui/assets/"))
      .map((r) => [r.name.split("/").pop(), r.transferSize]),
    data: resources.filter((r) => r.name.includes("/v1/") && !r.name.endsWith("/v1/search"))
      .map((r) => r.name.slice(location.origin.length)),
    started: early.started,
    unused: Object.keys(early.requests),
  };
})()"""


def test_a_first_visit_is_the_page_then_one_round_of_requests(
    web_server: WebServer, browser: Any, composition_id: str
) -> None:
    """The page's speed comes from its shape, checked here without a clock (the 200 ms goal is
    measured by bench/web_render.py): after the HTML, a first visit asks for the stylesheet, one
    script and the view's data at once, no more than a browser sends in parallel to one host
    (six), the data requests started by the inline script and each made once; a repeat visit
    takes every asset from the cache."""
    views = {
        **_pages(web_server, composition_id),
        "base model": web_server.page + "#/base-models/tiny-llama-b",
        "older version": web_server.page + "#/bricks/translate-ro-en/1",
        "filtered": web_server.page + "#/?base_model=tiny-llama&tag=translation",
        "compositions": web_server.page + "#/compositions",
    }
    for name, url in views.items():
        context = browser.new_context(viewport=DESKTOP)
        try:
            page = context.new_page()
            _load(page, url)
            first = page.evaluate(LOAD_FACTS)
            scripts_and_styles = sorted(asset for asset, _ in first["assets"] if asset != "favicon.svg")
            assert scripts_and_styles == ["app.css", BUNDLE], (name, first)
            assert first["started"], (name, first)  # every view needs data: all of it asked for early
            assert sorted(first["data"]) == sorted(first["started"]), (name, first)
            assert first["unused"] == [], (name, first)
            assert len(scripts_and_styles) + len(first["started"]) <= 6, (name, first)
            _load(page, url)
            repeat = page.evaluate(LOAD_FACTS)
            # Nothing over the wire. (Not the icon: the browser asks for it after the load, so
            # a repeat visit may start before the first visit's icon reached the cache.)
            rendering = [size for asset, size in repeat["assets"] if asset != "favicon.svg"]
            assert all(size == 0 for size in rendering), (name, repeat)
        finally:
            context.close()


def test_render_time_and_layout_shift(
    web_server: WebServer, browser: Any, composition_id: str, artifacts: Path
) -> None:
    context = browser.new_context(viewport=DESKTOP)
    context.add_init_script(WATCH_SHIFTS)
    page = context.new_page()
    timings: dict[str, list[float]] = {}
    shifts: dict[str, float] = {}
    results: list[float] = []
    try:
        for name, url in _pages(web_server, composition_id).items():
            timings[name] = []
            for _ in range(LOADS):
                timings[name].append(_load(page, url))
                if name == "search":  # hits arrive after the page: their time is the API's
                    wait_rendered(page, mark=RESULTS)
                    results.append(page.evaluate("performance.getEntriesByName('brickyard:results')[0].startTime"))
            page.wait_for_timeout(200)  # late shifts would land here
            shifts[name] = float(page.evaluate("window.__shift"))
    finally:
        context.close()
    # First visits: a browser that has never seen the page (every asset fetched).
    cold = []
    for _ in range(LOADS):
        fresh = browser.new_context(viewport=DESKTOP)
        try:
            cold.append(_load(fresh.new_page(), web_server.page))
        finally:
            fresh.close()
    timings["browse, first visit"] = cold
    medians = {name: statistics.median(values) for name, values in timings.items()}
    best = {name: min(values) for name, values in timings.items()}
    report = {"ms": timings, "median_ms": medians, "best_ms": best, "search_results_ms": results, "cls": shifts}
    (artifacts / "timings.json").write_text(json.dumps(report, indent=2))
    print(f"render ms, best of {LOADS}: {best}; median: {medians}; search hits at {results} ms; CLS: {shifts}")
    # Nothing may move while data arrives (the views reserve their space).
    assert all(value < 0.01 for value in shifts.values()), shifts
    # The 200 ms goal is bench/web_render.py's (a clock in a test fails when the machine is busy,
    # not when the page is slow). This only catches a render that waits for something it should
    # not, such as a timer or a request chain: under a load average of 15 on the 2-core machine
    # the medians were 130-340 ms (repeat) and 300-670 ms (first visit).
    assert all(value < CATASTROPHE_MS for value in medians.values()), medians


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_screenshots_and_no_sideways_scrolling(
    web_server: WebServer, open_page: Any, composition_id: str, artifacts: Path, viewport: dict[str, int]
) -> None:
    page = open_page(viewport)
    label = "desktop" if viewport == DESKTOP else "phone"
    for name, url in _pages(web_server, composition_id).items():
        _load(page, url)
        page.screenshot(path=str(artifacts / f"{label}-{name}.png"), full_page=True)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= viewport["width"], f"{name} is {width}px wide at {viewport['width']}px"
