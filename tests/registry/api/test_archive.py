"""The archive download's Content-Length equals the bytes sent, whatever tar needs for the
names (PAX headers for names over 100 characters and non-ASCII names): issue 15, item 6."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from registry.api.files import tar_length, tar_stream
from tests.conftest import brick_metadata, register_base, upload, wait_ready

LONG = "sub/" + "a-very-long-file-name-" * 6 + ".json"  # 136 characters
UNICODE = "tokenizer-für-Übersetzung-東京.json"


def test_tar_length_is_the_streamed_length(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    names = ["plain.json", LONG, UNICODE]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(b"x" * (700 * i + 3))
    body = b"".join(tar_stream(tmp_path, names))
    assert tar_length(tmp_path, names) == len(body)
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert tar.getnames() == names
        assert tar.extractfile(LONG).read() == b"x" * 703  # type: ignore[union-attr]


def test_archive_with_long_and_non_ascii_names_over_http(
    client: Any, registry: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    register_base(client, llama_base)
    assert upload(client, loras["r4"], metadata=brick_metadata("sentiment")).status_code == 201
    response = client.post(
        "/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "adapter"}
    )
    composition_id = response.json()["id"]
    assert wait_ready(client, composition_id)["status"] == "ready"
    directory = registry.compositions.root / composition_id
    (directory / "sub").mkdir()
    (directory / LONG).write_text('{"long": true}')
    (directory / UNICODE).write_text('{"unicode": true}')
    archive = client.get(f"/v1/compositions/{composition_id}/archive")
    assert archive.status_code == 200
    assert int(archive.headers["content-length"]) == len(archive.content)
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        names = tar.getnames()
        assert LONG in names and UNICODE in names
        assert tar.extractfile(UNICODE).read() == b'{"unicode": true}'  # type: ignore[union-attr]
