"""Base models registered from an ``s3://`` prefix (registry.s3_bases), on both backends:
registered as from a directory, composed from the local copy, refused when changed."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from registry.compositions import worker_name
from registry.s3_bases import base_model_dir
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
