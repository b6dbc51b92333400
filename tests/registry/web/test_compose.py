"""Composing from the page: the form, live progress, downloads, past compositions, tokens."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.registry.web.conftest import WebServer


def _posts(page: Any, path: str) -> list[str]:
    """Start recording the POSTs of ``page`` to ``path``."""
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url) if r.method == "POST" and r.url.endswith(path) else None)
    return seen


def test_compose_linear_adapter_end_to_end_and_download(web_server: WebServer, open_page: Any) -> None:
    page = open_page()
    page.goto(web_server.page + "#/compose")
    page.get_by_label("Brick 1", exact=True).fill("sentiment")
    page.get_by_label("Weight").first.fill("0.7")
    page.get_by_role("button", name="Add a brick").click()
    page.get_by_label("Brick 2", exact=True).fill("translate-ro-en")
    page.locator("#brick-2-version").fill("1")
    page.locator("#brick-2-weight").fill("0.3")
    page.get_by_label("Method", exact=True).select_option("linear")
    page.get_by_label("One LoRA adapter").check()

    # No token yet: the page asks for one, then sends the request.
    page.get_by_role("button", name="Compose", exact=True).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("needs a token with scope write")
    dialog.get_by_label("Token").fill(web_server.write_token)
    dialog.get_by_role("button", name="Save").click()

    status = page.locator("#composition-status")
    expect(status).to_have_text(re.compile(r"^ready · 100%"), timeout=60_000)
    composition_id = page.url.rsplit("/", 1)[1]
    assert page.locator("#composition-progress").evaluate("p => p.value") == 1
    recipe = page.locator("section[aria-labelledby=recipe-title]").inner_text()
    assert "sentiment@1 weight 0.7" in recipe and "translate-ro-en@1 weight 0.3" in recipe
    assert "adapter" in recipe and "linear" in recipe

    with web_server.http() as client:
        listing = client.get(f"/v1/compositions/{composition_id}/files").json()
        expected_files = {f["path"]: f["size_bytes"] for f in listing}
        weights = client.get(f"/v1/compositions/{composition_id}/files/adapter_model.safetensors").content
    rows = page.locator("#composition-files tbody tr td:first-child")
    expect(rows).to_have_count(len(expected_files))  # the file list is fetched after "ready"
    assert sorted(rows.all_inner_texts()) == sorted(expected_files)
    assert {"adapter_config.json", "adapter_model.safetensors", "brickyard.json"} <= set(expected_files)

    # With a token set, downloads are fetched with the header (a link cannot carry it).
    with page.expect_download() as info:
        page.get_by_role("link", name="Download adapter_model.safetensors").click()
    assert Path(info.value.path()).read_bytes() == weights
    with page.expect_download() as info:
        page.get_by_role("link", name="Download everything (.tar)").click()
    assert info.value.suggested_filename == f"{composition_id}.tar"
    with tarfile.open(fileobj=io.BytesIO(Path(info.value.path()).read_bytes())) as tar:
        members = {m.name: m.size for m in tar.getmembers() if m.isfile()}
        assert members == expected_files
        assert tar.extractfile("adapter_model.safetensors").read() == weights  # type: ignore[union-attr]

    # The composition is listed (the server's GET /v1/compositions: every composition, newest
    # first), and opens from the list.
    page.get_by_role("navigation").get_by_role("link", name="Compositions").click()
    entry = page.locator("#composition-list li", has_text=composition_id[:12])
    expect(entry).to_have_count(1)
    entry.get_by_role("link").click()
    expect(page.locator("#composition-status")).to_contain_text("ready")


def test_compose_checks_the_form_like_the_api_before_sending(web_server: WebServer, open_page: Any) -> None:
    page = open_page()
    posts = _posts(page, "/v1/compositions")
    page.goto(web_server.page + "#/compose")
    page.get_by_label("Brick 1", exact=True).fill("sentiment")
    page.get_by_label("Weight").first.fill("heavy")
    page.get_by_label("Method", exact=True).select_option("ties")
    page.get_by_label("density").fill("1.5")
    page.get_by_role("button", name="Compose", exact=True).click()
    errors = page.locator("#compose-errors li")
    expect(errors).to_have_text(["bricks.0.weight: must be a number", "params.density: must be ≤ 1"])
    assert page.get_by_label("density").get_attribute("aria-invalid") == "true"
    assert posts == []

    # The same values sent to the API are refused for the same reasons.
    body = {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "method": "ties", "params": {"density": 1.5}}
    with web_server.http(web_server.write_token) as client:
        answer = client.post("/v1/compositions", json=body)
    assert answer.status_code == 422
    assert any("density" in e for e in answer.json()["errors"])


def test_schema_checks_agree_with_the_api(web_server: WebServer, open_page: Any) -> None:
    """Every parameter value the page refuses, the API refuses, and the other way round."""
    with web_server.http() as client:
        methods = {m["name"]: m["params"] for m in client.get("/v1/merge-methods").json()}
    cases = [
        ("ties", "density", "0"),
        ("ties", "density", "0.25"),
        ("ties", "density", "1"),
        ("ties", "density", "1.01"),
        ("ties", "density", "abc"),
        ("ties", "majority_sign_method", "frequency"),
        ("ties", "majority_sign_method", "most"),
        ("dare_linear", "seed", "-1"),
        ("dare_linear", "seed", "7"),
        ("dare_linear", "seed", "1.5"),
    ]
    page = open_page()
    page.goto(web_server.page)
    page.locator("#base-models").wait_for()
    verdicts = page.evaluate(
        """async ([methods, cases]) => {
            // The page's own module (still served beside the bundle that joins it), from its assets.
            const assets = document.querySelector("script[type=module]").src.replace(/[^/]*$/, "");
            const { checkValue } = await import(`${assets}js/schema.js`);
            return cases.map(([m, name, raw]) => {
              const schema = methods[m];
              const result = checkValue(schema.properties[name], raw, (schema.required || []).includes(name));
              return result.error ? null : result.value;
            });
        }""",
        [methods, cases],
    )
    with web_server.http(web_server.write_token) as client:
        for (method, name, raw), value in zip(cases, verdicts, strict=True):
            sent: Any = value if value is not None else raw
            body = {
                "base_model": "tiny-llama",
                "bricks": [{"name": "sentiment"}],
                "method": method,
                "params": {name: sent},
                "output": "adapter",
                "rank": 4,  # sparsifying methods store a truncated SVD: the rank is required
            }
            answer = client.post("/v1/compositions", json=body)
            assert (value is None) == (answer.status_code == 422), (method, name, raw, answer.text)


def test_unauthorized_and_forbidden_are_messages(web_server: WebServer, open_page: Any) -> None:
    page = open_page()
    page.goto(web_server.page + "#/compose")
    page.get_by_role("button", name="Token: none").click()
    page.get_by_role("dialog").get_by_label("Token").fill("not-a-token")
    page.get_by_role("dialog").get_by_role("button", name="Save").click()
    # A bad token fails reads too: the page says so and offers to change it.
    alert = page.locator("main .message.error")
    expect(alert).to_contain_text("401")
    expect(alert).to_contain_text("did not accept your token")
    expect(page.get_by_role("heading", name="Could not load this page")).to_be_visible()

    # A read-scope token may read but not compose: 403, shown in the page's alert region.
    with web_server.http() as client:
        reader = client.post("/v1/tokens", json={"name": "web-reader", "scope": "read"}).json()["token"]
    alert.get_by_role("button", name="Set a token").click()
    page.get_by_role("dialog").get_by_label("Token").fill(reader)
    page.get_by_role("dialog").get_by_role("button", name="Save").click()
    page.get_by_label("Brick 1", exact=True).fill("sentiment")
    page.get_by_role("button", name="Compose", exact=True).click()
    notice = page.locator("#notice")
    expect(notice).to_contain_text("403")
    expect(notice).to_contain_text("scope does not allow this")
    assert "/compose" in page.url  # still on the form, nothing broken


def test_compose_by_instruction(web_server: WebServer, open_page: Any) -> None:
    page = open_page()
    page.goto(web_server.page + "#/compose")
    page.evaluate("token => sessionStorage.setItem('brickyard.token', token)", web_server.write_token)
    page.get_by_label("An instruction (search picks the bricks)").check()
    expect(page.locator("#source-bricks")).to_be_hidden()
    page.get_by_label("Instruction", exact=True).fill("translate romanian emails into english")
    page.get_by_label("k (bricks to merge, 1-16)").fill("2")
    page.get_by_label("One LoRA adapter").check()
    page.get_by_role("button", name="Compose", exact=True).click()
    expect(page.locator("#composition-status")).to_have_text(re.compile(r"^ready · 100%"), timeout=60_000)
    bricks = page.locator("section[aria-labelledby=recipe-title] ul li").all_inner_texts()
    # The page shows the recipe the API resolved: k=2 asked, a brick far behind the best
    # one dropped by the similarity floor (registry.builds.instruction_weights).
    composition_id = page.url.rsplit("#/compositions/", 1)[1]
    with web_server.http() as http:
        recipe = http.get(f"/v1/compositions/{composition_id}").json()["recipe"]
    assert [b.split(" weight ")[0] for b in bricks] == [f"{b['name']}@{b['version']}" for b in recipe["bricks"]]
    assert 1 <= len(bricks) <= 2 and bricks[0].startswith("translate-ro-en@2 weight ")
    weights = [float(b.rsplit(" ", 1)[1]) for b in bricks]
    assert weights == pytest.approx([b["weight"] for b in recipe["bricks"]], rel=1e-3)
    assert abs(sum(weights) - 1) < 1e-6 and weights == sorted(weights, reverse=True)
