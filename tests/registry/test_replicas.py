"""Several processes on one PostgreSQL and one bucket (issue #23): two API servers on
loopback ports, each with its own home directory and no build workers, and one
``brickyard worker`` process. A brick registered through one server is found, composed and
downloaded through the other; the worker builds and publishes the output to the bucket."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import brick_metadata, upload

pytestmark = pytest.mark.parametrize(("backend", "storage"), [("postgresql", "s3")], indirect=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def processes(settings: Any, registry: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two servers and a worker, each with its own home (nothing shared but the database and
    the bucket); yields their URLs, an admin token and the worker's home."""
    token, _ = registry.tokens.create("replica-test", "admin", actor="tests")
    started: list[tuple[subprocess.Popen[bytes], Any]] = []

    def env(home: Path, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "BRICKYARD_HOME": str(home),
            "BRICKYARD_DATABASE_URL": settings.database_url,
            "BRICKYARD_BLOBS__URL": str(settings.blobs.url),
            "BRICKYARD_BLOBS__ENDPOINT_URL": str(settings.blobs.endpoint_url),
            "BRICKYARD_BLOBS__REGION": str(settings.blobs.region),
            **extra,
        }

    def start(name: str, args: list[str], **extra: str) -> None:
        log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [sys.executable, "-m", "registry", *args],
            env=env(tmp_path / name, **extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append((process, log))

    urls = []
    try:
        for name, presigned in (("api-a", "true"), ("api-b", "false")):
            port = _free_port()
            start(
                name,
                ["serve", "--port", str(port), "--log-level", "warning"],
                BRICKYARD_COMPOSE__WORKERS="0",
                BRICKYARD_BLOBS__PRESIGNED_DOWNLOADS=presigned,  # A redirects downloads to the bucket
            )
            urls.append(f"http://127.0.0.1:{port}")
        start("worker", ["worker", "--workers", "1"], BRICKYARD_COMPOSE__ISOLATION="thread")
        deadline = time.monotonic() + 90
        for url in urls:
            while True:
                for process, _ in started:
                    assert process.poll() is None, _logs(tmp_path)
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, _logs(tmp_path)
                time.sleep(0.2)
        yield {"a": urls[0], "b": urls[1], "token": token, "worker_home": tmp_path / "worker", "logs": tmp_path}
    finally:
        for process, log in started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
            log.close()


def _logs(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(root.glob("*.log")))


def test_register_on_one_compose_on_the_other_build_in_the_worker(
    processes: dict[str, Any], llama_base: Path, loras: dict[str, Path], settings: Any
) -> None:
    headers = {"Authorization": f"Bearer {processes['token']}"}
    with (
        httpx.Client(base_url=processes["a"], headers=headers, timeout=120, follow_redirects=True) as a,
        httpx.Client(base_url=processes["b"], headers=headers, timeout=120) as b,
    ):
        assert a.post("/v1/base-models", json={"name": "tiny-llama", "path": str(llama_base)}).status_code == 201
        metadata = brick_metadata("sentiment", description="Classify the sentiment of a product review.")
        assert upload(a, loras["r4"], metadata=metadata).status_code == 201

        assert b.get("/v1/bricks/sentiment").json()["version"] == 1
        weights = b.get("/v1/bricks/sentiment/versions/1/files/adapter_model.safetensors")
        assert weights.content == (loras["r4"] / "adapter_model.safetensors").read_bytes()
        hits = b.post("/v1/search", json={"query": "sentiment of a review", "base_model": "tiny-llama"}).json()
        assert [h["brick"]["name"] for h in hits["hits"]] == ["sentiment"], hits  # fresh in the other process

        queued = b.post("/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}]})
        assert queued.status_code == 202, queued.text
        composition_id = queued.json()["id"]
        deadline = time.monotonic() + 180
        while (body := a.get(f"/v1/compositions/{composition_id}").json())["status"] not in ("ready", "failed"):
            assert time.monotonic() < deadline, _logs(processes["logs"])
            time.sleep(0.3)
        assert body["status"] == "ready", (body, _logs(processes["logs"]))

        files = {f["path"]: f["size_bytes"] for f in a.get(f"/v1/compositions/{composition_id}/files").json()}
        record = a.get(f"/v1/compositions/{composition_id}/files/brickyard.json")
        assert json.loads(record.content)["recipe"]["id"] == composition_id
        shard = next(p for p in files if p.endswith(".safetensors"))
        data = a.get(f"/v1/compositions/{composition_id}/files/{shard}").content
        assert len(data) == files[shard]
        part = a.get(f"/v1/compositions/{composition_id}/files/{shard}", headers={"Range": "bytes=8-99"})
        assert part.status_code == 206 and part.content == data[8:100]
        redirect = a.get(f"/v1/compositions/{composition_id}/files/{shard}", follow_redirects=False)
        assert redirect.status_code == 307 and redirect.headers["location"].startswith(str(settings.blobs.endpoint_url))
        streamed = b.get(f"/v1/compositions/{composition_id}/files/{shard}")  # B: no presigning
        assert streamed.status_code == 200 and streamed.content == data
    from registry.client import RemoteClient

    remote = RemoteClient(processes["a"], token=processes["token"])
    try:
        written = remote.download_composition(composition_id, processes["logs"] / "downloaded")
    finally:
        remote.close()
    assert {p.name: p.stat().st_size for p in written} == {Path(p).name: n for p, n in files.items()}
    # The bytes are in the bucket, found through the manifest; no server holds a copy.
    from registry.service import Registry

    with_manifest = Registry.open(settings)
    try:
        published = {f.path: f for f in with_manifest.compositions.published(composition_id) or []}
        assert hashlib.sha256(data).hexdigest() == published[shard].sha256
    finally:
        with_manifest.close()
    for name in ("api-a", "api-b", "worker"):
        home = processes["logs"] / name
        assert not list(home.glob(f"**/{composition_id}/*")), name


_SLOW_WORKER = """
import pathlib, sys, time
from registry.storage import s3_blobs
from registry.cli.app import app

marker = pathlib.Path(sys.argv[1])
commit = s3_blobs.S3BlobStore.commit

def slow_commit(self, staged):
    result = commit(self, staged)
    marker.write_text(staged.sha256)  # one output file is in the bucket...
    time.sleep(30)  # ...and the worker is killed before the next
    return result

s3_blobs.S3BlobStore.commit = slow_commit
app(["worker", "--workers", "1"])
"""


def test_worker_killed_while_publishing_leaves_nothing_ready_and_fsck_repairs(
    registry: Any, settings: Any, llama_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import signal

    from tests.conftest import random_adapter

    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    config, weights = random_adapter(1)
    registry.register_brick(brick_metadata("a"), config, io.BytesIO(weights))
    composition, _ = registry.compositions.request(
        {"base_model": "tiny-llama", "bricks": [{"name": "a"}], "output": "adapter"}
    )
    marker = tmp_path / "published-one"
    home = tmp_path / "worker"
    env = {
        **os.environ,
        "BRICKYARD_HOME": str(home),
        "BRICKYARD_DATABASE_URL": settings.database_url,
        "BRICKYARD_BLOBS__URL": str(settings.blobs.url),
        "BRICKYARD_BLOBS__ENDPOINT_URL": str(settings.blobs.endpoint_url),
        "BRICKYARD_BLOBS__REGION": str(settings.blobs.region),
        "BRICKYARD_COMPOSE__ISOLATION": "thread",
    }
    log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WORKER, str(marker)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()
    uploaded = marker.read_text()
    assert registry.blobs.exists(uploaded)
    assert registry.compositions.get(composition.id).status == "running"  # never ready
    assert registry.compositions.store.published_files(composition.id) is None
    assert registry.compositions.recover(lambda _: False) == [composition.id]  # its worker is dead

    # fsck sees the uploaded blob as an orphan (and the killed build's directory is the
    # worker's own, on its machine); after the grace period it is removed.
    report = registry.fsck()
    assert uploaded in report.orphaned
    import registry.fsck as fsck_module

    monkeypatch.setattr(fsck_module, "_now", lambda: time.time() + 7200)
    report = registry.fsck(repair=True, grace_s=3600)
    assert f"blob {uploaded}" in report.removed
    assert not registry.blobs.exists(uploaded)
    assert registry.fsck().orphaned == []
