"""`AdapterSource` against the registry's real app (in-process, SQLite and PostgreSQL): what
reaches the cache is what was uploaded, checked by sha256 and base fingerprint."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from brickyard_vllm.fetch import AdapterRefused, AdapterSource
from brickyard_vllm.refs import BrickRef, CompositionRef
from tests.conftest import brick_metadata, register_base, stored_blobs, upload, wait_ready

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture
def source(client: Any, tmp_path: Path) -> AdapterSource:
    """An adapter source over the test's app, caching under ``tmp_path / "cache"``."""
    return AdapterSource(client, tmp_path / "cache")


@pytest.fixture
def sentiment(client: Any, llama_base: Path, loras: dict[str, Path]) -> Path:
    """Base ``tiny-llama`` and brick ``sentiment`` (version 1 = loras["r4"]) registered; answers the brick's files."""
    register_base(client, llama_base)
    response = upload(client, loras["r4"], metadata=brick_metadata("sentiment"))
    assert response.status_code == 201, response.text
    return loras["r4"]


def _same_files(cached: Path, uploaded: Path) -> None:
    assert sorted(p.name for p in cached.iterdir()) == sorted(ADAPTER_FILES)
    for name in ADAPTER_FILES:
        assert (cached / name).read_bytes() == (uploaded / name).read_bytes(), name


def test_brick_by_name_and_version_lands_verbatim_in_one_cache_directory(
    source: AdapterSource, sentiment: Path, llama_base: Path, tmp_path: Path
) -> None:
    latest = source.fetch(str(llama_base), BrickRef("sentiment"))
    pinned = source.fetch(str(llama_base), BrickRef("sentiment", 1))
    assert latest is not None and pinned is not None
    assert latest.label == pinned.label == "sentiment@1"
    assert latest.path == pinned.path == tmp_path / "cache" / latest.key
    _same_files(latest.path, sentiment)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [latest.key]  # no staging left


def test_another_version_gets_another_directory(
    client: Any, source: AdapterSource, sentiment: Path, llama_base: Path, loras: dict[str, Path]
) -> None:
    assert upload(client, loras["all"], metadata=brick_metadata("sentiment")).status_code == 201
    first = source.fetch(str(llama_base), BrickRef("sentiment", 1))
    latest = source.fetch(str(llama_base), BrickRef("sentiment"))
    assert first is not None and latest is not None
    assert latest.label == "sentiment@2" and latest.path != first.path
    _same_files(latest.path, loras["all"])


@pytest.mark.parametrize("ref", [BrickRef("nope"), BrickRef("sentiment", 2), CompositionRef("0" * 64)])
def test_unknown_references_are_not_found(source: AdapterSource, sentiment: Path, llama_base: Path, ref: Any) -> None:
    assert source.fetch(str(llama_base), ref) is None


def test_a_deleted_version_is_not_found(
    client: Any, source: AdapterSource, sentiment: Path, llama_base: Path, tmp_path: Path
) -> None:
    assert client.delete("/v1/bricks/sentiment/versions/1").status_code == 200
    assert source.fetch(str(llama_base), BrickRef("sentiment", 1)) is None
    assert source.fetch(str(llama_base), BrickRef("sentiment")) is None
    assert not (tmp_path / "cache").exists()


def test_a_brick_of_another_base_is_refused_by_fingerprint(
    source: AdapterSource, sentiment: Path, gpt2_base: Path, tmp_path: Path
) -> None:
    # The brick's base is registered and the brick is valid: only the served base differs.
    with pytest.raises(AdapterRefused, match="fingerprint"):
        source.fetch(str(gpt2_base), BrickRef("sentiment"))
    assert not (tmp_path / "cache").exists()


def test_same_structure_under_another_name_is_accepted(
    source: AdapterSource, sentiment: Path, llama_base_single: Path
) -> None:
    # Fingerprints cover config and tensor layout, not values or names (unlike vLLM's own
    # resolver, which compares base_model_name_or_path as a string).
    fetched = source.fetch(str(llama_base_single), BrickRef("sentiment"))
    assert fetched is not None
    _same_files(fetched.path, sentiment)


def test_an_unreadable_served_base_is_refused(source: AdapterSource, sentiment: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterRefused, match="cannot fingerprint"):
        source.fetch("some-org/some-hub-model", BrickRef("sentiment"))


def test_a_corrupted_download_is_refused_and_leaves_nothing(
    source: AdapterSource, sentiment: Path, llama_base: Path, settings: Any, tmp_path: Path
) -> None:
    weights = (sentiment / "adapter_model.safetensors").read_bytes()
    digest = hashlib.sha256(weights).hexdigest()
    [blob] = [p for p in stored_blobs(settings.home) if p.name == digest]
    blob.chmod(0o644)
    blob.write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(AdapterRefused, match="sha256"):
        source.fetch(str(llama_base), BrickRef("sentiment"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_adapter_composition_is_fetched_and_a_full_one_refused(
    client: Any, source: AdapterSource, sentiment: Path, llama_base: Path
) -> None:
    bricks = [{"name": "sentiment", "version": 1, "weight": 0.5}]
    adapter = client.post("/v1/compositions", json={"base_model": "tiny-llama", "bricks": bricks, "output": "adapter"})
    full = client.post("/v1/compositions", json={"base_model": "tiny-llama", "bricks": bricks, "output": "full"})
    assert adapter.status_code in (200, 202) and full.status_code in (200, 202), adapter.text + full.text
    adapter_id, full_id = adapter.json()["id"], full.json()["id"]
    assert wait_ready(client, adapter_id)["status"] == "ready"
    fetched = source.fetch(str(llama_base), CompositionRef(adapter_id))
    assert fetched is not None
    listed = {f["path"]: f["size_bytes"] for f in client.get(f"/v1/compositions/{adapter_id}/files").json()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(listed)
    for path, size in listed.items():
        body = client.get(f"/v1/compositions/{adapter_id}/files/{path}").content
        assert len(body) == size and (fetched.path / path).read_bytes() == body
    assert wait_ready(client, full_id)["status"] == "ready"
    with pytest.raises(AdapterRefused, match="not an adapter"):
        source.fetch(str(llama_base), CompositionRef(full_id))


class _Flaky(httpx.BaseTransport):
    """The test's app (through its client) behind a network that fails the first ``failures``
    requests whose path contains ``where``: with ``status``, or with no connection when None."""

    def __init__(self, app: Any, where: str, failures: int, status: int | None) -> None:
        self.app, self.where, self.left, self.status = app, where, failures, status
        self.failed: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.left and self.where in request.url.path:
            self.left -= 1
            self.failed.append(request.url.path)
            if self.status is None:
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(self.status, json={"title": "busy"}, request=request)
        answer = self.app.request(request.method, request.url.raw_path.decode(), content=request.read())
        return httpx.Response(answer.status_code, headers=answer.headers.raw, content=answer.content, request=request)


def _flaky_source(tmp_path: Path, flaky: _Flaky, pauses: list[float]) -> AdapterSource:
    http = httpx.Client(base_url="http://brickyard", transport=flaky)
    return AdapterSource(http, tmp_path / "cache", sleep=pauses.append)


@pytest.mark.parametrize(
    ("where", "status"),
    [("/v1/bricks/sentiment", 503), ("/files/adapter_model.safetensors", None), ("/v1/base-models/", 502)],
)
def test_transient_failures_are_tried_again(
    client: Any, sentiment: Path, llama_base: Path, tmp_path: Path, where: str, status: int | None
) -> None:
    flaky, pauses = _Flaky(client, where, 2, status), []
    fetched = _flaky_source(tmp_path, flaky, pauses).fetch(str(llama_base), BrickRef("sentiment", 1))
    assert fetched is not None and len(flaky.failed) == 2 and pauses == [0.5, 1.0]
    _same_files(fetched.path, sentiment)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [fetched.key]


def test_a_failure_that_lasts_is_raised_and_leaves_nothing(
    client: Any, sentiment: Path, llama_base: Path, tmp_path: Path
) -> None:
    flaky, pauses = _Flaky(client, "/files/adapter_model.safetensors", 3, 503), []
    with pytest.raises(httpx.HTTPStatusError):
        _flaky_source(tmp_path, flaky, pauses).fetch(str(llama_base), BrickRef("sentiment", 1))
    assert len(flaky.failed) == 3 and pauses == [0.5, 1.0]
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_refusal_is_not_tried_again(client: Any, sentiment: Path, llama_base: Path, tmp_path: Path) -> None:
    flaky, pauses = _Flaky(client, "/v1/bricks/sentiment", 1, 403), []
    with pytest.raises(httpx.HTTPStatusError):
        _flaky_source(tmp_path, flaky, pauses).fetch(str(llama_base), BrickRef("sentiment", 1))
    assert pauses == []
