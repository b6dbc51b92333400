"""Web page render time (issue #24: "pages render in under 200 ms"), first visit and repeat.

A ``brickyard serve`` subprocess holds a tiny base model and ``--bricks`` bricks (the 60
Super-NaturalInstructions task definitions as descriptions, so the browse view's first page is
full). Debian's chromium (``make browser``), driven by Playwright, opens each view:

- first visit: a fresh browser context (empty HTTP cache, no session storage), one load;
- repeat: a second load of the same view in that context (assets from the immutable cache).

Render = navigation start to the page's ``brickyard:rendered`` mark (the view's whole DOM in
<main>). Medians over ``--contexts`` fresh contexts; the breakdown of the first visit (HTML
received, last script received, first API answer received) says where its time goes. The peer
in the same run is the bare HTML shell: the time to its ``DOMContentLoaded`` with no script or
data, the floor any render of this page sits on.

    python bench/web_render.py [--contexts 9] [--bricks 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._registry import (  # noqa: E402
    free_port,
    live_server,
    load_tasks,
    random_adapter,
    scratch_home,
    task_brick_form,
    tiny_base,
)

KEYS = ("first", "repeat", "breakdown")
RENDERED = "performance.getEntriesByName('brickyard:rendered').length > 0"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
# Where the first visit's time goes, from the Performance API (ms since navigation start).
BREAKDOWN = """(() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const resources = performance.getEntriesByType("resource");
  const assets = resources.filter((r) => r.name.includes("/ui/assets/"));
  const api = resources.filter((r) => r.name.includes("/v1/"));
  return {
    html: nav.responseEnd,
    assets: assets.length ? Math.max(...assets.map((r) => r.responseEnd)) : 0,
    asset_requests: assets.length,
    first_api: api.length ? Math.min(...api.map((r) => r.responseEnd)) : 0,
    last_api: api.length ? Math.max(...api.map((r) => r.responseEnd)) : 0,
    api_requests: api.length,
    dcl: nav.domContentLoadedEventEnd,
    rendered: performance.getEntriesByName("brickyard:rendered")[0].startTime,
  };
})()"""


def wait_rendered(page: Any, timeout_s: float = 30) -> None:
    """Poll for the render mark (the page's CSP refuses ``wait_for_function``'s string eval)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(RENDERED):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{page.url} did not render")
        time.sleep(0.005)


def populate(url: str, token: str, bricks: int) -> str:
    """Register the base and ``bricks`` bricks; answers the id of one ready composition."""
    tasks = load_tasks()
    with httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {token}"}) as http:
        response = http.post("/v1/base-models", json={"name": "tiny-llama", "path": str(tiny_base())})
        assert response.status_code == 201, response.text
        for i in range(bricks):
            task = tasks[i % len(tasks)]
            config, weights = random_adapter(i)
            form = task_brick_form(f"task-{i:03d}", "tiny-llama", task, 2, config, weights)
            response = http.post("/v1/bricks", **form)
            assert response.status_code == 201, response.text
        body = {"base_model": "tiny-llama", "bricks": [{"name": "task-000"}, {"name": "task-001"}], "output": "adapter"}
        created = http.post("/v1/compositions", json=body)
        assert created.status_code in (200, 202), created.text
        identifier = str(created.json()["id"])
        deadline = time.monotonic() + 120
        while http.get(f"/v1/compositions/{identifier}").json()["status"] != "ready":
            assert time.monotonic() < deadline, "composition not ready"
            time.sleep(0.2)
    return identifier


def views(url: str, composition: str) -> dict[str, str]:
    """The views measured, by name."""
    page = f"{url}/ui/"
    return {
        "browse": page,
        "brick": page + "#/bricks/task-001",
        "search": page + "#/search?q=translate+a+sentence&mode=description",
        "compose": page + "#/compose",
        "composition": page + f"#/compositions/{composition}",
        "chat": page + "#/chat",
    }


def measure(browser: Any, views_: dict[str, str], contexts: int) -> dict[str, Any]:
    """First-visit and repeat render times per view, and the first visit's breakdown."""
    first: dict[str, list[float]] = {name: [] for name in views_}
    repeat: dict[str, list[float]] = {name: [] for name in views_}
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in views_}
    for _ in range(contexts):
        for name, address in views_.items():
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            try:
                page = context.new_page()
                page.goto(address)
                wait_rendered(page)
                parts[name].append(page.evaluate(BREAKDOWN))
                first[name].append(parts[name][-1]["rendered"])
                page.goto("about:blank")
                page.goto(address)
                wait_rendered(page)
                repeat[name].append(page.evaluate(BREAKDOWN)["rendered"])
            finally:
                context.close()
    return {"first": first, "repeat": repeat, "breakdown": parts}


def shell_floor(browser: Any, url: str, contexts: int) -> list[float]:
    """DOMContentLoaded of the HTML shell alone (scripts blocked): the floor of a first visit."""
    times = []
    for _ in range(contexts):
        context = browser.new_context(java_script_enabled=False)
        try:
            page = context.new_page()
            page.goto(f"{url}/ui/", wait_until="domcontentloaded")
            nav = page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])")
            times.append(float(json.loads(nav)["domContentLoadedEventEnd"]))
        finally:
            context.close()
    return times


@contextlib.contextmanager
def baseline_server(ref: str, home: Path) -> Iterator[str]:
    """A second server on the same home running the code of git ``ref`` (its ``registry``, ``composer`` and
    ``migrations`` exported to a scratch folder, which Python finds first), building
    nothing: the peer of this run, measured under the same load."""
    source = home / f"baseline-{ref}"
    source.mkdir()
    archive = subprocess.run(
        ["git", "archive", ref, "registry", "composer", "migrations"], cwd=ROOT, check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "BRICKYARD_HOME": str(home), "BRICKYARD_COMPOSE__WORKERS": "0"}
    with open(home / "baseline.log", "wb") as log:
        command = [sys.executable, "-m", "registry", "serve", "--port", str(port), "--log-level", "warning"]
        process = subprocess.Popen(command, cwd=source, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"baseline server did not start: {(home / 'baseline.log').read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(20)


def table(title: str, result: dict[str, Any], contexts: int) -> None:
    """Print one server's medians."""
    med = statistics.median
    print(f"\n{title}: render ms, median of {contexts} fresh browser contexts")
    head = f"{'view':<12} {'first':>6} {'repeat':>6} | first visit: {'html':>5} {'assets':>6} {'1st api':>7}"
    head += f" {'last api':>8} {'requests':>8}"
    print(head)
    print("-" * len(head))
    for name in result["first"]:
        b = result["breakdown"][name]
        requests = med([x["asset_requests"] + x["api_requests"] + 1 for x in b])
        print(
            f"{name:<12} {med(result['first'][name]):6.0f} {med(result['repeat'][name]):6.0f} |"
            f" {'':12} {med([x['html'] for x in b]):5.0f} {med([x['assets'] for x in b]):6.0f}"
            f" {med([x['first_api'] for x in b]):7.0f} {med([x['last_api'] for x in b]):8.0f} {requests:8.0f}"
        )
    every_first = [v for values in result["first"].values() for v in values]
    every_repeat = [v for values in result["repeat"].values() for v in values]
    print(
        f"{'all views':<12} {med(every_first):6.0f} {med(every_repeat):6.0f} |"
        f" first visits over 200 ms: {sum(v >= 200 for v in every_first)} of {len(every_first)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=9, help="fresh browser contexts per view (median)")
    parser.add_argument("--bricks", type=int, default=60)
    parser.add_argument("--baseline", metavar="REF", help="also measure the page of this git commit, interleaved")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        sys.exit("chromium is not installed: run `make browser`")
    from playwright.sync_api import sync_playwright

    results: dict[str, Any] = {}
    with scratch_home("brickyard-bench-web-") as home, contextlib.ExitStack() as stack:
        env = {"BRICKYARD_HOME": str(home), "BRICKYARD_COMPOSE__ISOLATION": "thread"}
        urls = {"this tree": stack.enter_context(live_server(env, log=home / "server.log"))}
        token = (home / "admin-token").read_text().strip()
        composition = populate(urls["this tree"], token, args.bricks)
        if args.baseline:
            urls[f"baseline {args.baseline}"] = stack.enter_context(baseline_server(args.baseline, home))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                for url in urls.values():  # warm the servers' caches (embedding model, SQL)
                    measure(browser, views(url, composition), 1)
                rounds = {name: [] for name in urls}
                for _ in range(args.contexts):  # interleaved: both servers see the same load
                    for name, url in urls.items():
                        rounds[name].append(measure(browser, views(url, composition), 1))
                for name, url in urls.items():
                    names = views(url, composition)
                    merged: dict[str, Any] = {key: {view: [] for view in names} for key in KEYS}
                    for one in rounds[name]:
                        for key in merged:
                            for view, values in one[key].items():
                                merged[key][view] += values
                    merged["shell_dcl"] = shell_floor(browser, url, args.contexts)
                    results[name] = merged
            finally:
                browser.close()
    print(f"{args.bricks} bricks; first = a fresh browser context, repeat = the same view again in it")
    for name, result in results.items():
        table(name, result, args.contexts)
        floor = statistics.median(result["shell_dcl"])
        print(f"{'shell alone':<12} {floor:6.0f} (DOMContentLoaded of the HTML, no script)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
