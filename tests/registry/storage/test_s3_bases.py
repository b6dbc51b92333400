"""Base models registered from an ``s3://`` prefix (registry.storage.s3_bases), on both backends:
registered as from a directory by reading only config, index and headers (ranged GETs),
composed from the local copy made by the first build, refused when changed."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from registry.builds.compositions import worker_name
from registry.storage.s3_bases import base_model_dir, base_model_headers
from tests.conftest import brick_metadata, random_adapter

pytestmark = pytest.mark.parametrize("storage", ["s3"], indirect=True)


def _upload_dir(client: Any, bucket: str, prefix: str, root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")


def test_a_base_from_object_storage_registers_and_composes(
    registry: Any, llama_base: Path, s3_client: Any, bucket: str
) -> None:
    _upload_dir(s3_client, bucket, "models/llama", llama_base)
    url = f"s3://{bucket}/models/llama"
    remote = registry.add_base_model({"name": "tiny-llama", "path": url})
    local = registry.add_base_model({"name": "same-llama", "path": str(llama_base)})
    assert remote.path == url
    assert remote.fingerprint == local.fingerprint and remote.parameter_count == local.parameter_count
    config, weights = random_adapter(1)
    registry.register_brick(brick_metadata("a"), config, io.BytesIO(weights))
    composition, _ = registry.compositions.request({"base_model": "tiny-llama", "bricks": [{"name": "a"}]})
    claimed = registry.compositions.store.claim(composition.id, worker_name(0))
    built = registry.compositions.build_claimed(claimed, worker_name(0))
    assert built.status == "ready", built.error


def test_the_local_copy_follows_the_bucket(registry: Any, llama_base: Path, s3_client: Any, bucket: str) -> None:
    _upload_dir(s3_client, bucket, "m", llama_base)
    url = f"s3://{bucket}/m"
    copy = base_model_dir(url, registry.settings)
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if not p.name.startswith(".")) == sorted(
        p.relative_to(llama_base).as_posix() for p in llama_base.rglob("*") if p.is_file()
    )
    assert (copy / "config.json").read_bytes() == (llama_base / "config.json").read_bytes()
    s3_client.put_object(Bucket=bucket, Key="m/config.json", Body=b'{"changed": true}')
    assert (copy / "generation_config.json").exists()
    s3_client.delete_object(Bucket=bucket, Key="m/generation_config.json")
    again = base_model_dir(url, registry.settings)
    assert again == copy
    assert (copy / "config.json").read_bytes() == b'{"changed": true}'
    assert not (copy / "generation_config.json").exists()


def test_an_empty_or_malformed_prefix_is_a_clear_4xx(registry: Any, bucket: str) -> None:
    from registry.errors import InvalidBaseModel

    for url in (f"s3://{bucket}/nothing-here", "s3://"):
        with pytest.raises(InvalidBaseModel) as caught:
            registry.add_base_model({"name": "x", "path": url})
        assert caught.value.status == 422 and url[:20] in caught.value.detail


class _RequestLog:
    """Every S3 request the base-model code sends, seen by botocore's own events on the clients
    it makes: operation, key, ``Range`` header, and for a GET the bytes of the response body."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.requests: list[dict[str, Any]] = []

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-send.s3", self._sent)
        client.meta.events.register("after-call.s3.GetObject", self._received)
        return client

    def _sent(self, request: Any, event_name: str, **_: Any) -> None:
        from urllib.parse import unquote, urlsplit

        path = unquote(urlsplit(request.url).path).lstrip("/")
        key = path[len(self.bucket) + 1 :] if path.startswith(f"{self.bucket}/") else ""
        byte_range = request.headers.get("Range")
        if isinstance(byte_range, bytes):
            byte_range = byte_range.decode()
        self.requests.append({"op": event_name.rsplit(".", 1)[-1], "key": key, "range": byte_range})

    def _received(self, parsed: dict[str, Any], **_: Any) -> None:
        self.requests[-1]["bytes"] = parsed.get("ContentLength", 0)

    def gets(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["op"] == "GetObject"]

    def clear(self) -> None:
        self.requests.clear()


@pytest.fixture
def request_log(bucket: str, monkeypatch: pytest.MonkeyPatch) -> _RequestLog:
    """Records the requests of every client `registry.storage.s3_bases` makes (the registry's blob
    store keeps its own client: brick reads are not counted)."""
    from registry.storage import s3_blobs

    log = _RequestLog(bucket)
    make = s3_blobs.make_s3_client
    monkeypatch.setattr(s3_blobs, "make_s3_client", lambda **kwargs: log.attach(make(**kwargs)))
    return log


def _header_length(path: Path) -> int:
    with path.open("rb") as handle:
        return int.from_bytes(handle.read(8), "little")


@pytest.mark.parametrize("model", ["llama_base", "llama_base_single"])
def test_registration_reads_config_index_and_headers_by_ranged_gets_and_builds_fetch_the_weights(
    registry: Any, s3_client: Any, bucket: str, request_log: _RequestLog, model: str, request: pytest.FixtureRequest
) -> None:
    root: Path = request.getfixturevalue(model)
    _upload_dir(s3_client, bucket, "models/m", root)
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    # What registration needs, from the files themselves: the JSON files whole (the listed
    # size, asked for as a range too), and of each shard the 8-byte length and the header it
    # announces.
    expected = {}
    for name in ("config.json", "model.safetensors.index.json"):
        if (root / name).exists():
            size = (root / name).stat().st_size
            expected[name, f"bytes=0-{size - 1}"] = size
    for name in shards:
        length = _header_length(root / name)
        expected[name, "bytes=0-7"] = 8
        expected[name, f"bytes=8-{8 + length - 1}"] = length

    remote = registry.add_base_model({"name": "remote", "path": f"s3://{bucket}/models/m"})

    fetched = {(g["key"].removeprefix("models/m/"), g["range"]): g["bytes"] for g in request_log.gets()}
    assert fetched == expected
    assert len(request_log.gets()) == len(expected)  # each range once
    fraction = sum(fetched.values()) / model_bytes
    assert fraction < (0.25 if len(shards) > 1 else 0.05), (sum(fetched.values()), model_bytes)
    local = registry.add_base_model({"name": "local", "path": str(root)})
    for field in ("fingerprint", "parameter_count", "size_bytes", "dtype", "architecture", "linear_modules", "config"):
        assert getattr(remote, field) == getattr(local, field), field
    assert not (registry.settings.home / "cache" / "bases").exists()  # no full copy yet

    # Requesting a composition plans on the same header view: nothing is fetched again.
    request_log.clear()
    config, weights = random_adapter(1)
    registry.register_brick(brick_metadata("a", base_model="remote"), config, io.BytesIO(weights))
    composition, _ = registry.compositions.request({"base_model": "remote", "bricks": [{"name": "a"}]})
    assert request_log.gets() == []
    assert not (registry.settings.home / "cache" / "bases").exists()

    # The build reads the weights: now every file is fetched whole.
    claimed = registry.compositions.store.claim(composition.id, worker_name(0))
    built = registry.compositions.build_claimed(claimed, worker_name(0))
    assert built.status == "ready", built.error
    read = {g["key"].removeprefix("models/m/") for g in request_log.gets()}
    assert set(shards) <= read
    assert sum(g["bytes"] for g in request_log.gets()) >= model_bytes


def test_the_header_view_follows_the_bucket_and_refuses_what_a_directory_would(
    registry: Any, llama_base_single: Path, s3_client: Any, bucket: str, request_log: _RequestLog
) -> None:
    _upload_dir(s3_client, bucket, "m", llama_base_single)
    url = f"s3://{bucket}/m"
    view = base_model_headers(url, registry.settings)
    weights = view / "model.safetensors"
    assert weights.stat().st_size == (llama_base_single / "model.safetensors").stat().st_size
    assert weights.stat().st_blocks * 512 < weights.stat().st_size / 2  # sparse: the data was not written
    assert sorted(p.name for p in view.iterdir() if not p.name.startswith(".")) == ["config.json", "model.safetensors"]

    request_log.clear()
    assert base_model_headers(url, registry.settings) == view
    assert request_log.gets() == []  # unchanged ETags: only the listing is asked again

    # A pickle under the safetensors name: refused from its first 8 bytes, nothing more read.
    pickle = b"\x80\x04\x95" + bytes(5000)
    s3_client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=pickle)
    request_log.clear()
    from registry.errors import InvalidBaseModel

    with pytest.raises(InvalidBaseModel) as caught:
        registry.add_base_model({"name": "pickled", "path": url})
    assert caught.value.status == 422 and "pickle" in " ".join(caught.value.errors)
    assert [(g["key"], g["range"], g["bytes"]) for g in request_log.gets()] == [("m/model.safetensors", "bytes=0-7", 8)]

    # A header longer than the limit: refused without fetching it.
    huge = (registry.settings.limits.max_header_bytes + 1).to_bytes(8, "little") + bytes(64)
    s3_client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=huge)
    request_log.clear()
    with pytest.raises(InvalidBaseModel) as caught:
        registry.add_base_model({"name": "huge", "path": url})
    assert "limit" in " ".join(caught.value.errors)
    assert [(g["range"], g["bytes"]) for g in request_log.gets()] == [("bytes=0-7", 8)]


def test_a_fit_request_checks_the_tokenizer_by_listing_the_prefix(
    registry: Any, llama_base: Path, s3_client: Any, bucket: str, request_log: _RequestLog
) -> None:
    from registry.errors import InvalidRecipe

    assert (llama_base / "tokenizer.json").exists()  # the fixture saves a tokenizer
    _upload_dir(s3_client, bucket, "m", llama_base)
    registry.add_base_model({"name": "remote", "path": f"s3://{bucket}/m"})
    config, weights = random_adapter(3)
    registry.register_brick(brick_metadata("a", base_model="remote"), config, io.BytesIO(weights))
    fit = {"examples": [{"input": "the battery lasts", "output": "positive"}], "steps": 2}
    request = {"base_model": "remote", "bricks": [{"name": "a"}], "fit": fit}
    request_log.clear()
    composition, _ = registry.compositions.request(request)
    assert composition.status == "queued"
    assert request_log.gets() == []  # listed, not downloaded
    assert not (registry.settings.home / "cache" / "bases").exists()

    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        s3_client.delete_object(Bucket=bucket, Key=f"m/{name}")
    with pytest.raises(InvalidRecipe) as caught:
        registry.compositions.request({**request, "fit": {**fit, "steps": 3}})
    assert caught.value.status == 422 and "no tokenizer" in caught.value.detail
    assert f"s3://{bucket}/m" in " ".join(caught.value.errors)
    assert request_log.gets() == []
