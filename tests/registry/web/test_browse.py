"""Browsing base models and bricks, a brick's page, and search, in a real browser."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from tests.registry.web.conftest import WebServer


def _size(n: int) -> str:
    """How the page prints sizes (powers of 1024), written out independently for the test."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KB"
    if value >= 1024:
        value, unit = value / 1024, "MB"
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"


def test_browse_lists_base_models_and_filters_bricks(web_server: WebServer, open_page: Any) -> None:
    with web_server.http() as client:
        bases = {b["name"]: b for b in client.get("/v1/base-models").json()}
    page = open_page()
    page.goto(web_server.page)
    rows = page.locator("#base-models tbody tr")
    rows.first.wait_for()
    assert rows.count() == 2
    for i in range(2):
        cells = [c.strip() for c in rows.nth(i).locator("td").all_inner_texts()]
        base = bases[cells[0]]
        assert cells[1] == "LlamaForCausalLM"
        assert cells[2] == f"{base['parameter_count']:,}"
        assert rows.nth(i).locator("code.hash").get_attribute("title") == base["fingerprint"]
        assert cells[6] == (", ".join(base["aliases"]) or "—")
    assert "example-org/tiny-llama-b" in rows.all_inner_texts()[1]

    bricks = page.locator("#bricks tbody tr td:first-child")
    assert sorted(bricks.all_inner_texts()) == ["sentiment@1", "summarize@1", "translate-ro-en@2"]

    page.get_by_label("Tag").fill("translation")
    page.get_by_role("button", name="Filter").click()
    expect(bricks).to_have_text(["translate-ro-en@2"])

    page.get_by_label("Base model", exact=True).select_option("tiny-llama-b")
    page.get_by_label("Tag").fill("")
    page.get_by_role("button", name="Filter").click()
    expect(bricks).to_have_text(["summarize@1"])
    assert "base_model=tiny-llama-b" in page.url

    page.get_by_label("Tag").fill("no-such-tag")
    page.get_by_role("button", name="Filter").click()
    page.get_by_text("No brick matches these filters.").wait_for()

    page.goto(web_server.page + "#/base-models/tiny-llama")
    page.get_by_role("heading", name="tiny-llama", exact=True).wait_for()
    assert bases["tiny-llama"]["fingerprint"] in page.locator("main dl").inner_text()
    assert page.locator("main table tbody tr").count() == bases["tiny-llama"]["linear_module_count"]


def test_brick_page_shows_card_files_versions_and_history(web_server: WebServer, open_page: Any) -> None:
    page = open_page()
    page.goto(web_server.page + "#/bricks/translate-ro-en")
    page.get_by_role("heading", name="translate-ro-en@2").wait_for()
    latest = web_server.bricks["translate-ro-en"][-1]

    files = page.locator("#files tbody tr")
    assert files.count() == 2
    weights_row = files.filter(has_text="adapter_model.safetensors")
    assert latest.sha256 in weights_row.inner_text()
    assert _size(len(latest.weights)) in weights_row.inner_text()
    config_row = files.filter(has_text="adapter_config.json")
    assert _size(len(latest.config)) in config_row.inner_text()

    versions = page.locator("#versions tbody tr")
    assert versions.count() == 2
    assert "2 (shown)" in versions.nth(0).inner_text()
    history = page.locator("#history tbody tr").all_inner_texts()
    assert len(history) == 2 and all("brick.register" in row for row in history)
    assert "brick:translate-ro-en@1" in history[1]

    # The other version is one click away, and its download is byte-identical.
    versions.nth(1).get_by_role("link").click()
    page.get_by_role("heading", name="translate-ro-en@1").wait_for()
    first = web_server.bricks["translate-ro-en"][0]
    with page.expect_download() as info:
        page.get_by_role("link", name="Download adapter_model.safetensors").click()
    assert info.value.suggested_filename == "adapter_model.safetensors"
    assert Path(info.value.path()).read_bytes() == first.weights


def test_model_card_renders_markdown_and_never_markup(web_server: WebServer, open_page: Any) -> None:
    page = open_page()
    page.goto(web_server.page + "#/bricks/summarize")
    card = page.locator("section.card")
    card.wait_for()
    body = card.locator(".card-body")
    assert body.locator("strong").inner_text() == "one sentence"
    assert body.locator("li").all_inner_texts() == ["keeps the names of people", "drops quotes"]
    text = body.inner_text()
    assert '<img src=x onerror="window.pwned=1">' in text and "<script>window.pwned=2</script>" in text
    assert "[click me](javascript:window.pwned=3)" in text
    assert page.locator("main img, main script, main a[href^='javascript']").count() == 0
    assert page.evaluate("window.pwned") is None
    facts = card.locator("dl").inner_text()
    assert "tiny-llama-b" in facts and "q_proj, v_proj" in facts
    sentiment = open_page()
    sentiment.goto(web_server.page + "#/bricks/sentiment")
    sentiment.locator("section.card table").wait_for()
    assert sentiment.locator("section.card table tbody").inner_text().split() == ["accuracy", "0.91"]
    assert "apache-2.0" in sentiment.locator("section.card dl").inner_text()


def test_search_shows_scores_what_matched_and_highlights(web_server: WebServer, open_page: Any) -> None:
    query = "is this product review positive or negative?"
    page = open_page()
    page.goto(web_server.page + "#/search")
    page.get_by_label("Task description", exact=True).fill(query)
    page.get_by_label("Task description", exact=True).press("Enter")
    hits = page.locator("#hits > li")
    hits.first.wait_for()
    with web_server.http() as client:
        expected = client.post("/v1/search", json={"query": query, "k": 10}).json()["hits"]
    assert hits.count() == len(expected)
    assert hits.first.get_by_role("link").inner_text() == "sentiment@1"
    for i, hit in enumerate(expected):
        shown = hits.nth(i)
        assert shown.get_by_role("link").inner_text() == f"{hit['brick']['name']}@{hit['brick']['version']}"
        assert f"score {hit['score']:.3f}" in shown.inner_text()
        assert f"matched {hit['matched']}" in shown.inner_text()
        assert shown.locator("blockquote").inner_text() == hit["text"]
    marked = {m.lower() for m in hits.first.locator("mark").all_inner_texts()}
    assert {"product", "review", "positive", "negative"} <= marked
    assert "is" not in marked and "or" not in marked

    # The toggle turns the field into a multi-line example input and keeps what was typed.
    page.get_by_label("an example input").check()
    example = page.get_by_label("Example input", exact=True)
    example.wait_for()
    assert example.evaluate("e => e.tagName") == "TEXTAREA"
    example.fill("Bună ziua, aș dori să returnez comanda de ieri.")
    page.get_by_role("button", name="Search", exact=True).click()
    expect(hits.first.get_by_role("link")).to_have_text(re.compile(r"^translate-ro-en@"))
    assert "mode=example" in page.url
    assert "returnez" in [m.lower() for m in hits.first.locator("mark").all_inner_texts()]
