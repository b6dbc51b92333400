""" "Try a model": the chat box against the server's real ``/v1/chat/completions`` (the
embedded engine on the fixture's tiny Llama and its bricks), and against stand-ins for a
server without serving and for a gateway's answer shapes."""

from __future__ import annotations

import json
from typing import Any

from playwright.sync_api import expect

from tests.registry.web.conftest import WebServer

# The engine's child process imports torch and loads the base on the first request: on the
# busy 2-core machine that alone has taken over a minute.
FIRST_ANSWER_MS = 240_000
TOKENS = 8


def _js_number(value: float) -> str:
    """How JavaScript writes a number into text: integers without a fraction."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _expected_line(used: dict[str, Any]) -> str:
    """The page's "answered by" line for a response's ``brickyard`` record."""
    if not used["bricks"]:
        note = f" ({used['note']})" if used.get("note") else ""
        return f"answered by the base model {used['base_model']}{note}"
    return "answered by " + ", ".join(f"{b['name']}@{b['version']} ({_js_number(b['weight'])})" for b in used["bricks"])


def test_chat_shows_what_the_real_route_answers(web_server: WebServer, open_page: Any) -> None:
    page = open_page()
    sent: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda request: (
            sent.append(json.loads(request.post_data))
            if request.method == "POST" and request.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    page.goto(web_server.page + "#/chat")
    model = page.get_by_label("Model")
    # The choices are the server's /v1/models: with two base models plain "auto" would be a
    # 422, so only "auto:<base>" is offered, first; then bases and bricks.
    expect(model.locator("option[value='sentiment@1']")).to_have_count(1)
    with web_server.http() as client:
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
    values = model.locator("option").evaluate_all("(options) => options.map((o) => o.value)")
    assert "auto" not in listed and "auto" not in values
    assert values[:2] == ["auto:tiny-llama", "auto:tiny-llama-b"]
    # (A subset: a build of another test may finish between the page's request and ours.)
    assert set(values) <= set(listed) and len(values) == len(set(values))
    assert {"tiny-llama", "tiny-llama-b", "sentiment", "sentiment@1", "translate-ro-en", "translate-ro-en@2"} <= set(
        values
    )

    log = page.get_by_role("log")
    answers = log.locator("li.model")
    page.get_by_label("Temperature").fill("0")  # greedy: the same request answers the same text
    page.get_by_label("Max tokens").fill(str(TOKENS))
    # Short turns: the tiny Llama's context is 128 tokens, and each turn sends the whole
    # conversation.
    conversation = [
        ("sentiment@1", "I love this phone."),
        ("auto:tiny-llama", "classify the sentiment of a product review"),
        ("tiny-llama", "and without bricks?"),
    ]
    send = page.get_by_role("button", name="Send")
    for turn, (choice, message) in enumerate(conversation, start=1):
        model.select_option(choice)
        page.get_by_label("Message").fill(message)
        send.click()  # disables the button until the answer (or an error) is in
        expect(send).to_be_enabled(timeout=FIRST_ANSWER_MS)
        assert page.locator("#notice").inner_text() == "", f"turn {turn}"
        expect(answers).to_have_count(turn)
        body = sent[-1]
        assert body["model"] == choice and body["temperature"] == 0 and body["max_tokens"] == TOKENS
        assert body["messages"][-1] == {"role": "user", "content": message}
        assert len(body["messages"]) == 2 * turn - 1  # the conversation so far goes along
        # The same request, straight to the API: the page shows exactly its answer and bricks.
        with web_server.http() as client:
            response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        api = response.json()
        answer = answers.nth(turn - 1)
        content = api["choices"][0]["message"]["content"]
        assert content.strip(), api  # an empty answer would make the comparison vacuous
        assert answer.locator("p").first.text_content() == content
        assert answer.locator("p.meta").text_content() == _expected_line(api["brickyard"])
        if choice == "sentiment@1":
            assert [(b["name"], b["version"], b["weight"]) for b in api["brickyard"]["bricks"]] == [("sentiment", 1, 1)]
        elif choice == "auto:tiny-llama":  # routed by the message: the sentiment brick leads
            assert api["brickyard"]["bricks"][0]["name"] == "sentiment", api["brickyard"]
        else:
            assert api["brickyard"]["bricks"] == [] and api["brickyard"]["base_model"] == "tiny-llama"
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user", "assistant", "user"]


def test_chat_says_when_the_server_serves_no_model(web_server: WebServer, open_page: Any) -> None:
    # This server serves models (registry.serve); one that does not answers 404 on the route.
    page = open_page()
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=404, json={"status": 404}))
    page.goto(web_server.page + "#/chat")
    status = page.get_by_role("status")
    expect(status).to_contain_text("does not serve models yet")
    expect(status).to_contain_text("/v1/chat/completions")
    assert page.get_by_label("Message").count() == 0


def test_chat_keeps_the_conversation_and_shows_text_as_text(web_server: WebServer, open_page: Any) -> None:
    """A stand-in route that echoes: the whole conversation is sent each turn, markup in an
    answer stays text, Ctrl+Enter sends."""
    sent: list[dict[str, Any]] = []

    def completions(route: Any) -> None:
        if route.request.method == "GET":
            route.fulfill(status=405, json={"title": "Method Not Allowed", "status": 405})
            return
        body = json.loads(route.request.post_data)
        sent.append(body)
        answer = f"echo {len(body['messages'])}: {body['messages'][-1]['content']}"
        route.fulfill(
            json={
                "model": "auto",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
                "brickyard": {"bricks": [{"name": "sentiment", "version": 1, "weight": 0.7}]},
            }
        )

    page = open_page()
    page.route("**/v1/chat/completions", completions)
    page.route("**/v1/models", lambda route: route.fulfill(json={"data": [{"id": "tiny-llama"}, {"id": "auto"}]}))
    page.goto(web_server.page + "#/chat")
    # The view renders after its fetches: wait for it, then read the choices.
    options = page.get_by_label("Model").locator("option")
    expect(options.nth(1)).to_have_text("tiny-llama")
    assert options.all_inner_texts()[:2] == ["auto (pick bricks for each message)", "tiny-llama"]
    page.get_by_label("Message").fill("<b>is this review happy?</b>")
    page.get_by_role("button", name="Send").click()
    log = page.get_by_role("log")
    expect(log.locator("li")).to_have_count(2)
    assert "echo 1: <b>is this review happy?</b>" in log.inner_text()
    assert "answered by sentiment@1 (0.7)" in log.inner_text()
    assert page.locator("main b").count() == 0
    page.get_by_label("Message").fill("and this one?")
    page.get_by_label("Message").press("Control+Enter")  # sends, like the button
    expect(log.locator("li")).to_have_count(4)
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert sent[-1]["model"] == "auto"
