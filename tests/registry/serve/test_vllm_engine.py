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
