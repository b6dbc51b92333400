"""The vLLM engine against fake vLLMs: down (503 with Retry-After in OpenAI's shape), unloading
adapters, streams relayed or re-written, and each streamed chunk passed on as it arrives (the
engine against a real vLLM is tested in tests/vllm by `make test-vllm`)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import register_base, serve_in_thread


def _settings(tmp_path: Path, vllm_url: str = "http://vllm.invalid", **serve: Any) -> Any:
    """Settings of a registry whose OpenAI routes forward to vLLM at ``vllm_url``."""
    from registry.settings import ComposeSettings, Settings

    return Settings(
        home=tmp_path / "home",
        compose=ComposeSettings(isolation="thread", workers=0),
        embedding={"isolation": "thread"},
        serve={"engine": "vllm", "vllm_url": vllm_url, **serve},
    )


@contextlib.contextmanager
def _app(settings: Any) -> Iterator[tuple[Any, str]]:
    """The application on a registry opened with ``settings``, and an admin token."""
    from registry.api import create_app
    from registry.service import Registry

    registry = Registry.open(settings)
    try:
        token, _ = registry.tokens.create("t", "admin", actor="tests")
        yield create_app(registry=registry), token
    finally:
        registry.close()


def _fake_vllm(served: str, answer: Callable[[httpx.Request], httpx.Response]) -> httpx.MockTransport:
    """A vLLM serving the base ``served`` (``/v1/models``) that answers other requests with ``answer``."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": served, "parent": None}]})
        return answer(request)

    return httpx.MockTransport(handle)


def _use_vllm(app: Any, settings: Any, transport: httpx.MockTransport) -> None:
    from registry.serve.vllm import VllmEngine

    app.state.gateway.engine = VllmEngine(settings.serve, transport=transport)


@contextlib.contextmanager
def _gateway(tmp_path: Path, llama_base: Path, vllm: httpx.MockTransport, **serve: Any) -> Iterator[Any]:
    """A test client of the OpenAI routes forwarding to the fake ``vllm``, base ``tiny`` registered."""
    from fastapi.testclient import TestClient

    settings = _settings(tmp_path, **serve)
    with _app(settings) as (app, token), TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        _use_vllm(app, settings, vllm)
        register_base(client, llama_base, name="tiny")
        yield client


def test_vllm_down_is_503_with_retry_after(tmp_path: Path, llama_base: Path) -> None:
    from fastapi.testclient import TestClient

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with (
        _app(_settings(tmp_path, f"http://127.0.0.1:{port}")) as (app, token),
        TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client,
    ):
        register_base(client, llama_base, name="tiny")
        response: Any = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"]
        error = response.json()["error"]
        assert error["type"] == "server_error" and "not reachable" in error["message"]
        unknown = client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "brick_not_found"


def test_a_model_vllm_cannot_resolve_is_a_server_failure_not_the_clients(tmp_path: Path, llama_base: Path) -> None:
    """vLLM answers 404 when its resolver fetched nothing for a brick the registry knows: 503."""

    def not_found(request: httpx.Request) -> httpx.Response:
        error = {"message": "The model `tiny` does not exist.", "type": "NotFoundError", "code": 404}
        return httpx.Response(404, json={"error": error})

    with _gateway(tmp_path, llama_base, _fake_vllm("/models/base", not_found)) as client:
        response: Any = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "server_error" and "resolver found nothing" in error["message"]


def test_forget_unloads_every_name_and_tolerates_absent_adapters_and_a_down_server(
    caplog: Any,
) -> None:
    import asyncio
    import json

    from registry.serve.vllm import VllmEngine
    from registry.settings import ServeSettings

    loaded = {"gone@2", "gone", "kept@1"}
    asked: list[str] = []

    def vllm(request: httpx.Request) -> httpx.Response:  # vLLM's unload route: 404 for a name it does not hold
        assert request.url.path == "/v1/unload_lora_adapter"
        name = json.loads(request.content)["lora_name"]
        asked.append(name)
        if name not in loaded:
            return httpx.Response(404, json={"error": {"message": f"The lora adapter '{name}' cannot be found."}})
        loaded.remove(name)
        return httpx.Response(200, text="Success")

    async def run(transport: httpx.AsyncBaseTransport, keys: list[str]) -> None:
        engine = VllmEngine(ServeSettings(engine="vllm"), transport=transport)
        try:
            await engine.forget(keys)
        finally:
            await engine.aclose()

    asyncio.run(run(httpx.MockTransport(vllm), ["gone@2", "gone", "never@1"]))
    assert asked == ["gone@2", "gone", "never@1"] and loaded == {"kept@1"}

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with caplog.at_level("WARNING", logger="brickyard.serve"):
        asyncio.run(run(httpx.MockTransport(down), ["gone@2"]))  # no exception: the deletion stands
    assert "could not unload adapter 'gone@2'" in caplog.text


def test_a_stream_from_vllm_reaches_the_client_with_the_requested_model(tmp_path: Path, llama_base: Path) -> None:
    """A stream vLLM delivers cut anywhere reaches the client as OpenAI's chunks with the model
    it asked for, one id, ``brickyard`` first (relayed as bytes, `registry.serve.sse_relay`; a
    chat vLLM answers with completion chunks is re-written chunk by chunk)."""
    import json

    served = "/models/the-base"
    texts = ["Hello", " wor", "ld"]
    upstream = b"".join(
        b"data: " + json.dumps({"id": "cmpl-7", "object": "text_completion", "created": 1, "model": served,
                                "choices": [{"index": 0, "text": t, "logprobs": None,
                                             "finish_reason": "length" if i == 2 else None}]},
                               separators=(",", ":")).encode() + b"\n\n"
        for i, t in enumerate(texts)
    ) + b"data: [DONE]\n\n"  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def pieces() -> Any:  # as the network delivers it: cut anywhere
        for start in range(0, len(upstream), 5):
            yield upstream[start : start + 5]

    def stream(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=pieces())

    with _gateway(tmp_path, llama_base, _fake_vllm(served, stream)) as client:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert json.loads(response.headers["X-Brickyard-Used"])["base_model"] == "tiny"
            lines = [line for line in response.iter_lines() if line]
        # The tiny base has no chat template: vLLM gets the chat as a plain prompt and answers
        # with completion chunks, which must not be relayed to a chat client as they are.
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=chat) as response:
            assert response.status_code == 200
            chat_lines = [line for line in response.iter_lines() if line]
    assert sent[0]["stream"] is True and sent[0]["model"] == served
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["brickyard"]["base_model"] == "tiny" and chunks[0]["choices"][0]["text"] == ""
    assert {c["model"] for c in chunks} == {"tiny"} and len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(texts)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sent[1]["prompt"] and "messages" not in sent[1] and sent[1]["stream_options"] == {"include_usage": True}
    chat_chunks = [json.loads(line.removeprefix("data: ")) for line in chat_lines[:-1]]
    assert chat_lines[-1] == "data: [DONE]"
    assert {c["object"] for c in chat_chunks} == {"chat.completion.chunk"} and {c["model"] for c in chat_chunks} == {
        "tiny"
    }
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chat_chunks) == "".join(texts)


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "rewrite"])
def test_each_chunk_from_vllm_reaches_the_client_before_vllm_sends_the_next(
    tmp_path: Path, llama_base: Path, relay: bool
) -> None:
    """Streams go to the client as vLLM sends them: the fake vLLM sends its first event and then
    waits until the client has read that event's text before it sends the rest. Anything on the
    way that holds a chunk back until more arrives (the gateway, the relay's event cutting, the
    HTTP layer) keeps the first text from the client, vLLM's wait runs out and the test fails."""
    import json

    import anyio

    served = "/models/the-base"

    def event(text: str, finish: str | None = None) -> bytes:
        chunk = {"id": "cmpl-9", "object": "text_completion", "created": 1, "model": served,
                 "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}  # fmt: skip
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    client_has_first = threading.Event()
    vllm_waited: list[bool] = []

    async def stream() -> Any:
        yield event("Hello")
        # Generous: on a loaded machine the first chunk may take seconds; a gateway that holds
        # it back never delivers it, so the wait only ends when this runs out.
        vllm_waited.append(await anyio.to_thread.run_sync(client_has_first.wait, 60.0))
        yield event(" world", "length") + b"data: [DONE]\n\n"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    settings = _settings(tmp_path, relay=relay)
    texts: list[str] = []
    with (
        _app(settings) as (app, token),
        serve_in_thread(app) as url,
        httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as http,
    ):
        register_base(http, llama_base, name="tiny")
        _use_vllm(app, settings, _fake_vllm(served, answer))
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    text = json.loads(line.removeprefix("data: "))["choices"][0]["text"]
                    if text:
                        texts.append(text)
                        client_has_first.set()
    assert vllm_waited == [True], "the client got vLLM's first chunk only after vLLM had sent the rest"
    assert texts == ["Hello", " world"]


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "rewrite"])
def test_text_with_unicode_line_separators_streams_whole(tmp_path: Path, llama_base: Path, relay: bool) -> None:
    """vLLM's JSON leaves U+2028, U+2029 and U+0085 unescaped inside text; they are line breaks
    to Python's ``str.splitlines`` (and httpx's ``aiter_lines``), not to server-sent events, so
    a chunk carrying one still reaches the client whole."""
    import json

    texts = ["one\u2028two", "\u0085", "three\u2029"]

    def event(i: int, text: str) -> bytes:
        chunk = {"id": "cmpl-5", "object": "text_completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "text": text, "logprobs": None,
                              "finish_reason": "length" if i == len(texts) - 1 else None}]}  # fmt: skip
        return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    async def stream() -> Any:
        yield b"".join(event(i, t) for i, t in enumerate(texts)) + b"data: [DONE]\n\n"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    with _gateway(tmp_path, llama_base, _fake_vllm("m", answer), relay=relay) as client:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            # Events as a server-sent events client reads them: cut at "\n" alone.
            events = [e for e in response.read().split(b"\n\n") if e.startswith(b"data: {")]
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(texts)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
