"""Server-side paths are confined (issue 15, item 1): base models only from the model roots,
never Brickyard's own data, symlinks resolved and kept inside, only regular files opened,
bounded config reads, and an allow-list of what a full output copies. Over HTTP, both backends."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import brick_metadata, register_base, upload, wait_ready


def _copy_base(llama_base: Path, target: Path) -> Path:
    shutil.copytree(llama_base, target)
    return target


def test_symlink_to_the_admin_token_is_refused(client: Any, registry: Any, llama_base: Path, tmp_path: Path) -> None:
    secret = registry.settings.admin_token_file
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("by_admin_secret\n")
    base = _copy_base(llama_base, tmp_path / "evil-base")
    (base / "tokenizer.json").unlink(missing_ok=True)
    (base / "tokenizer.json").symlink_to(secret)
    response = client.post("/v1/base-models", json={"name": "evil", "path": str(base)})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["type"].endswith("/invalid-base-model")
    assert any(e.startswith("tokenizer.json: links outside the model roots") for e in body["errors"])
    assert "by_admin_secret" not in response.text and str(secret) not in response.text
    assert client.get("/v1/base-models").json() == []


@pytest.mark.parametrize("target", ["/etc/passwd", "home-db"])
def test_symlinked_config_outside_the_roots_is_refused(
    client: Any, registry: Any, llama_base: Path, tmp_path: Path, target: str
) -> None:
    base = _copy_base(llama_base, tmp_path / "base")
    (base / "config.json").unlink()
    pointed = Path(target) if target.startswith("/") else registry.settings.home / "brickyard.db"
    if not pointed.exists():
        pointed.parent.mkdir(parents=True, exist_ok=True)
        pointed.write_text("{}")
    (base / "config.json").symlink_to(pointed)
    response = client.post("/v1/base-models", json={"name": "evil", "path": str(base)})
    assert response.status_code == 422
    assert "config.json: links outside the model roots" in response.json()["errors"]


def test_brickyard_home_is_not_model_data_but_home_models_is(client: Any, registry: Any, llama_base: Path) -> None:
    home = registry.settings.home
    inside_data = _copy_base(llama_base, home / "blobs" / "looks-like-a-model")
    refused = client.post("/v1/base-models", json={"name": "evil", "path": str(inside_data)})
    assert refused.status_code == 422
    shared = _copy_base(llama_base, home / "models" / "tiny")
    assert register_base(client, shared, name="in-home-models")["name"] == "in-home-models"


def test_outside_the_roots_and_missing_paths_answer_alike(
    client: Any, registry: Any, llama_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = tmp_path / "roots"
    roots.mkdir()
    monkeypatch.setattr(registry.settings, "model_roots", [roots])
    outside = client.post("/v1/base-models", json={"name": "x", "path": str(llama_base)})
    missing = client.post("/v1/base-models", json={"name": "x", "path": str(roots / "absent")})
    etc = client.post("/v1/base-models", json={"name": "x", "path": "/etc"})
    assert outside.status_code == missing.status_code == etc.status_code == 422
    assert outside.json()["errors"] == missing.json()["errors"] == etc.json()["errors"]
    assert "model roots" in outside.json()["errors"][0]
    # Through a symlink from inside the roots to outside: resolved, refused.
    (roots / "link").symlink_to(llama_base)
    assert client.post("/v1/base-models", json={"name": "x", "path": str(roots / "link")}).status_code == 422
    # The same model copied into the roots is accepted.
    inside = _copy_base(llama_base, roots / "tiny")
    assert register_base(client, inside, name="x")["name"] == "x"


def test_default_roots_are_the_user_home_and_home_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from registry.settings import Settings

    monkeypatch.delenv("BRICKYARD_MODEL_ROOTS", raising=False)
    settings = Settings(home=tmp_path / "h")
    assert settings.resolved_model_roots == [Path.home(), tmp_path / "h" / "models"]
    monkeypatch.setenv("BRICKYARD_MODEL_ROOTS", json.dumps(["/srv/models", "/data"]))
    assert Settings(home=tmp_path / "h").resolved_model_roots == [Path("/srv/models"), Path("/data")]


def test_fifo_config_is_refused_at_once_and_healthz_answers(client: Any, llama_base: Path, tmp_path: Path) -> None:
    base = _copy_base(llama_base, tmp_path / "fifo-base")
    (base / "config.json").unlink()
    os.mkfifo(base / "config.json")
    results: list[Any] = []

    def register() -> None:
        results.append(client.post("/v1/base-models", json={"name": "fifo", "path": str(base)}))

    threads = [threading.Thread(target=register, daemon=True) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        assert client.get("/healthz").status_code == 200
        for thread in threads:
            thread.join(timeout=10)
        assert all(not t.is_alive() for t in threads), "registration blocked on a FIFO"
    finally:
        for thread in threads:  # unblock an old server stuck in open(), so the test ends
            if thread.is_alive():
                fd = os.open(base / "config.json", os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
    assert time.monotonic() - started < 10
    assert [r.status_code for r in results] == [422] * 8
    assert "config.json: not a regular file" in results[0].json()["errors"]


def test_fifo_shard_and_device_config_are_refused(client: Any, llama_base: Path, tmp_path: Path) -> None:
    base = _copy_base(llama_base, tmp_path / "fifo-shard")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (base / shard).unlink()
    os.mkfifo(base / shard)
    response = client.post("/v1/base-models", json={"name": "fifo", "path": str(base)})
    assert response.status_code == 422
    assert f"{shard}: not a regular file" in response.json()["errors"]
    device = _copy_base(llama_base, tmp_path / "device")
    (device / "config.json").unlink()
    try:
        os.mknod(device / "config.json", 0o600 | 0o020000, os.makedev(1, 5))  # a /dev/zero of our own
    except PermissionError:
        (device / "config.json").symlink_to("/dev/zero")  # outside the roots: refused as well
    response = client.post("/v1/base-models", json={"name": "dev", "path": str(device)})
    assert response.status_code == 422


def test_large_config_is_refused_without_reading_it(client: Any, llama_base: Path, tmp_path: Path) -> None:
    base = _copy_base(llama_base, tmp_path / "big-config")
    with open(base / "config.json", "r+b") as handle:
        handle.truncate(200 * 1024 * 1024)  # sparse: costs no disk
    response = client.post("/v1/base-models", json={"name": "big", "path": str(base)})
    assert response.status_code == 422
    assert any(e.startswith("config.json: larger than") for e in response.json()["errors"])


def test_full_output_copies_only_hugging_face_model_files(
    client: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    base = _copy_base(llama_base, tmp_path / "with-extras")
    (base / "tokenizer_config.json").unlink(missing_ok=True)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (base / "LICENSE").write_text("MIT")
    (base / "notes-secret.txt").write_text("private")
    (base / "id_rsa").write_text("private key")
    register_base(client, base, aliases=[str(llama_base)])  # the LoRAs name the original directory
    assert upload(client, loras["r4"], metadata=brick_metadata("sentiment")).status_code == 201
    response = client.post(
        "/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "full"}
    )
    assert response.status_code in (200, 201, 202), response.text
    composition_id = response.json()["id"]
    assert wait_ready(client, composition_id)["status"] == "ready"
    names = {f["path"] for f in client.get(f"/v1/compositions/{composition_id}/files").json()}
    assert {"config.json", "tokenizer_config.json", "LICENSE"} <= names
    assert "notes-secret.txt" not in names and "id_rsa" not in names
    assert client.get(f"/v1/compositions/{composition_id}/files/id_rsa").status_code == 404


def test_hub_base_repository_serves_the_allow_list_only(client: Any, llama_base: Path, tmp_path: Path) -> None:
    base = _copy_base(llama_base, tmp_path / "hub-base")
    (base / "tokenizer_config.json").unlink(missing_ok=True)
    (base / "tokenizer_config.json").write_text("{}")
    (base / "secret.json").write_text('{"token": "x"}')
    register_base(client, base)
    info = client.get("/api/models/base-models/tiny-llama")
    assert info.status_code == 200, info.text
    names = {s["rfilename"] for s in info.json()["siblings"]}
    assert {"config.json", "tokenizer_config.json", "model.safetensors.index.json"} <= names
    assert "secret.json" not in names
    assert client.get("/base-models/tiny-llama/resolve/main/secret.json").status_code == 404


def test_admin_token_file_is_owner_only(tmp_path: Path, database_url: str) -> None:
    from registry.service import Registry
    from registry.settings import Settings

    settings = Settings(home=tmp_path / "home", database_url=database_url)
    settings.home.mkdir(parents=True)
    settings.admin_token_file.write_text("stale")
    settings.admin_token_file.chmod(0o644)
    registry = Registry.open(settings)
    try:
        assert registry.bootstrap_admin_token() is not None
    finally:
        registry.close()
    assert settings.admin_token_file.stat().st_mode & 0o777 == 0o600


def _full_composition_with_license(client: Any, registry: Any, llama_base: Path, tmp_path: Path) -> tuple[Path, Path]:
    secret = registry.settings.admin_token_file
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("by_admin_secret\n")
    base = _copy_base(llama_base, tmp_path / "swapped")
    (base / "LICENSE").write_text("MIT")
    return base, secret


def _swap_to_secret(base: Path, secret: Path) -> None:
    (base / "LICENSE").unlink()
    (base / "LICENSE").symlink_to(secret)


def _compose_full(client: Any, llama_base: Path, loras: dict[str, Path], base: Path) -> dict[str, Any]:
    register_base(client, base, aliases=[str(llama_base)])
    assert upload(client, loras["r4"], metadata=brick_metadata("sentiment")).status_code == 201
    response = client.post(
        "/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "output": "full"}
    )
    assert response.status_code in (200, 201, 202), response.text
    return wait_ready(client, response.json()["id"])


def test_a_symlink_swapped_while_the_build_reads_the_base_is_not_followed(
    client: Any, registry: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path, monkeypatch: Any
) -> None:
    """The build's files were checked and pinned open; a swap during the build (the hook:
    just before the composer starts) changes nothing it reads."""
    import composer

    base, secret = _full_composition_with_license(client, registry, llama_base, tmp_path)
    real_compose = composer.compose

    def swap_then_compose(*args: Any, **kwargs: Any) -> Any:
        _swap_to_secret(base, secret)
        return real_compose(*args, **kwargs)

    monkeypatch.setattr(composer, "compose", swap_then_compose)
    done = _compose_full(client, llama_base, loras, base)
    assert done["status"] == "ready", done
    license_file = client.get(f"/v1/compositions/{done['id']}/files/LICENSE")
    assert license_file.status_code == 200
    assert license_file.text == "MIT"  # the file as checked, not the swapped link's target
    assert (base / "LICENSE").is_symlink()  # the swap did happen


def test_a_symlink_swapped_between_the_check_and_the_open_is_refused(
    client: Any, registry: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path, monkeypatch: Any
) -> None:
    """The swap lands right after the build's model-roots check (the hook: a wrapper of
    the check, active inside the build only): the opened file is outside the roots, and
    the build fails naming it, without reading it."""
    import inspect

    from registry.storage.model_roots import ModelRoots

    base, secret = _full_composition_with_license(client, registry, llama_base, tmp_path)
    real_check = ModelRoots.check_model

    def check_then_swap(self: Any, directory: Path, shards: Any = ()) -> None:
        real_check(self, directory, shards)
        if not (base / "LICENSE").is_symlink() and any(f.function == "build_claimed" for f in inspect.stack()):
            _swap_to_secret(base, secret)

    monkeypatch.setattr(ModelRoots, "check_model", check_then_swap)
    done = _compose_full(client, llama_base, loras, base)
    assert (base / "LICENSE").is_symlink()  # the swap did happen, after the check
    assert done["status"] == "failed", done
    assert done["error_code"] == "invalid-recipe"
    assert "LICENSE: changed while it was being opened" in done["error"]
    assert "by_admin_secret" not in json.dumps(done) and str(secret) not in json.dumps(done)
