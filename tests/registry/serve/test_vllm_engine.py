"""The vLLM engine when vLLM is down: 503 with Retry-After in OpenAI's shape, nothing else
(the engine against a real vLLM is tested in tests/vllm by `make test-vllm`)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from tests.conftest import register_base


def test_vllm_down_is_503_with_retry_after(tmp_path: Path, llama_base: Path) -> None:
    from fastapi.testclient import TestClient

    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import ComposeSettings, Settings

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(
        home=tmp_path / "home",
        compose=ComposeSettings(isolation="thread", workers=0),
        embedding={"isolation": "thread"},
        serve={"engine": "vllm", "vllm_url": f"http://127.0.0.1:{port}"},
    )
    registry = Registry.open(settings)
    try:
        token, _ = registry.tokens.create("t", "admin", actor="tests")
        with TestClient(create_app(registry=registry), headers={"Authorization": f"Bearer {token}"}) as client:
            register_base(client, llama_base, name="tiny")
            response: Any = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"]
            error = response.json()["error"]
            assert error["type"] == "server_error" and "not reachable" in error["message"]
            unknown = client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "brick_not_found"
    finally:
        registry.close()


def test_forget_unloads_every_name_and_tolerates_absent_adapters_and_a_down_server(
    caplog: Any,
) -> None:
    import asyncio
    import json

    import httpx

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
