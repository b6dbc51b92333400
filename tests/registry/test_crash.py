"""Crashes: the server is killed (SIGKILL) in the middle of an upload; after a restart
every acknowledged brick is intact (sha256 of the downloaded bytes), nothing half-written
is visible, ``fsck`` finds no missing or corrupt data, and a retry succeeds. (A build
killed with its server is covered in test_compositions.py.)"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import brick_metadata, random_adapter


def _multipart(metadata: dict[str, Any], config: bytes, weights: bytes, *, on_chunk: Any) -> tuple[str, Any]:
    boundary = "brickyard-crash-test"

    def part_header(name: str, filename: str | None = None) -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()

    def body() -> Any:
        yield part_header("metadata") + json.dumps(metadata).encode() + b"\r\n"
        yield part_header("adapter_config", "adapter_config.json") + config + b"\r\n"
        yield part_header("adapter_weights", "adapter_model.safetensors")
        for index, start in enumerate(range(0, len(weights), 256)):
            on_chunk(index)
            yield weights[start : start + 256]
        yield f"\r\n--{boundary}--\r\n".encode()

    return f"multipart/form-data; boundary={boundary}", body()


def test_server_killed_mid_upload(live_server: Any, settings: Any, llama_base: Path) -> None:
    acknowledged = {}
    with live_server.http() as http:
        assert http.post("/v1/base-models", json={"name": "tiny-llama", "path": str(llama_base)}).status_code == 201
        for seed in (1, 2, 3):
            config, weights = random_adapter(seed)
            files = {"adapter_config": ("c.json", config), "adapter_weights": ("w.safetensors", weights)}
            meta = brick_metadata(f"acked-{seed}")
            response = http.post("/v1/bricks", data={"metadata": json.dumps(meta)}, files=files)
            assert response.status_code == 201
            acknowledged[f"acked-{seed}"] = hashlib.sha256(weights).hexdigest()

        config, weights = random_adapter(99, r=8)
        killed = threading.Event()

        def kill_midway(index: int) -> None:
            if index == 3 and not killed.is_set():
                live_server.kill()
                killed.set()

        content_type, body = _multipart(brick_metadata("interrupted"), config, weights, on_chunk=kill_midway)
        with contextlib.suppress(httpx.TransportError):
            http.post("/v1/bricks", content=body, headers={"Content-Type": content_type})
        assert killed.is_set()

    live_server.start()
    with live_server.http() as http:
        names = {b["name"]: b for b in http.get("/v1/bricks").json()["items"]}
        assert set(names) == set(acknowledged)
        for name, digest in acknowledged.items():
            data = http.get(f"/v1/bricks/{name}/versions/1/files/adapter_model.safetensors").content
            assert hashlib.sha256(data).hexdigest() == digest == names[name]["sha256"]
        assert http.get("/v1/bricks/interrupted").status_code == 404

    from registry.service import Registry

    registry = Registry.open(settings)
    try:
        report = registry.fsck()
        assert report.healthy
        assert report.orphaned == []  # the interrupted upload left no committed bytes
        assert hashlib.sha256(weights).hexdigest() not in set(registry.blobs.digests())
    finally:
        registry.close()

    with live_server.http() as http:
        files = {"adapter_config": ("c.json", config), "adapter_weights": ("w.safetensors", weights)}
        retry = http.post("/v1/bricks", data={"metadata": json.dumps(brick_metadata("interrupted"))}, files=files)
        assert retry.status_code == 201
        assert retry.json()["version"] == 1
