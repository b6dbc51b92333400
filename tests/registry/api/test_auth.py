"""Access control over HTTP on both backends: scopes, 401/403 problems, hashed storage,
revocation, open or closed reads, the bootstrap admin token, and the audit trail."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from registry.db.models import ApiTokenRow
from tests.conftest import brick_metadata, random_adapter, register_base, stored_blobs, upload


def _as(client: Any, token: str | None) -> TestClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return TestClient(client.app, raise_server_exceptions=False, headers=headers)


@pytest.fixture
def tokens(client: Any) -> dict[str, str]:
    made = {}
    for scope in ("read", "write", "admin"):
        response = client.post("/v1/tokens", json={"name": f"{scope}-token", "scope": scope})
        assert response.status_code == 201, response.text
        made[scope] = response.json()["token"]
    return made


def test_writes_need_a_write_token(client: Any, tokens: dict[str, str], llama_base: Path) -> None:
    anonymous = _as(client, None)
    denied = anonymous.post("/v1/base-models", json={"name": "tiny-llama", "path": str(llama_base)})
    assert denied.status_code == 401
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.headers["www-authenticate"] == "Bearer"
    assert denied.json()["type"].endswith("/unauthorized")
    reader = _as(client, tokens["read"])
    forbidden = reader.post("/v1/base-models", json={"name": "tiny-llama", "path": str(llama_base)})
    assert forbidden.status_code == 403
    assert forbidden.json()["type"].endswith("/forbidden")
    assert forbidden.json()["needed"] == "write"
    writer = _as(client, tokens["write"])
    assert writer.post("/v1/base-models", json={"name": "tiny-llama", "path": str(llama_base)}).status_code == 201
    config, weights = random_adapter(5)
    assert upload(reader, metadata=brick_metadata(), config=config, weights=weights).status_code == 403
    assert upload(anonymous, metadata=brick_metadata(), config=config, weights=weights).status_code == 401
    created = upload(writer, metadata=brick_metadata(), config=config, weights=weights)
    assert created.status_code == 201
    assert created.json()["created_by"] == "write-token"
    for method, path, body in (
        ("PATCH", "/v1/bricks/sentiment/versions/1", {"tags": []}),
        ("DELETE", "/v1/bricks/sentiment/versions/1", None),
        ("POST", "/v1/compositions", {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}]}),
    ):
        assert reader.request(method, path, json=body).status_code == 403, path
        assert anonymous.request(method, path, json=body).status_code == 401, path
    # reads are open by default
    assert anonymous.get("/v1/bricks").status_code == 200
    assert anonymous.post("/v1/search", json={"query": "sentiment"}).status_code == 200


def test_unauthenticated_upload_is_refused_before_the_body_is_read(
    client: Any, registry: Any, llama_base: Path
) -> None:
    register_base(client, llama_base)
    received = 0

    def body() -> Any:
        nonlocal received
        for _ in range(2000):
            received += 1
            yield b"x" * 65536

    response = _as(client, None).post(
        "/v1/bricks", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 401
    assert received < 2000  # the 128 MB body was not consumed
    assert registry.store.count_bricks() == 0
    assert stored_blobs(registry.settings.home) == []


def test_token_management_needs_admin(client: Any, tokens: dict[str, str]) -> None:
    writer = _as(client, tokens["write"])
    assert writer.post("/v1/tokens", json={"name": "x", "scope": "read"}).status_code == 403
    assert writer.get("/v1/tokens").status_code == 403
    assert _as(client, None).get("/v1/tokens").status_code == 401
    listed = client.get("/v1/tokens").json()
    assert {t["name"] for t in listed} >= {"read-token", "write-token", "admin-token"}
    assert all("token" not in t for t in listed)
    assert all(t["prefix"].startswith("bky_") for t in listed)


def test_tokens_are_stored_hashed(client: Any, registry: Any, tokens: dict[str, str]) -> None:
    with registry.store.db.session() as session:
        rows = {r.name: r for r in session.scalars(select(ApiTokenRow))}
    for scope, token in tokens.items():
        row = rows[f"{scope}-token"]
        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
        stored = json.dumps([str(getattr(row, c.key)) for c in ApiTokenRow.__table__.columns])
        assert token not in stored
        assert token[10:] not in stored


def test_revoked_and_bad_tokens_are_401(client: Any, tokens: dict[str, str]) -> None:
    writer = _as(client, tokens["write"])
    assert writer.patch("/v1/bricks/x/versions/1", json={}).status_code == 404  # authenticated, then not found
    assert client.delete("/v1/tokens/write-token").json()["revoked_at"] is not None
    assert writer.patch("/v1/bricks/x/versions/1", json={}).status_code == 401
    assert _as(client, "bky_" + "A" * 43).post("/v1/search", json={"query": "x"}).status_code == 401
    malformed = TestClient(client.app, raise_server_exceptions=False, headers={"Authorization": "Basic dXNlcg=="})
    assert malformed.get("/v1/bricks").status_code == 401
    assert client.delete("/v1/tokens/nope").status_code == 404
    assert client.post("/v1/tokens", json={"name": "read-token", "scope": "read"}).status_code == 409
    assert client.post("/v1/tokens", json={"name": "x", "scope": "root"}).status_code == 422


def test_closed_reads_need_a_read_token(settings: Any, llama_base: Path) -> None:
    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import AuthSettings

    closed = settings.model_copy(update={"auth": AuthSettings(open_reads=False, bootstrap_admin=False)})
    registry = Registry.open(closed)
    try:
        token, _ = registry.tokens.create("reader", "read", actor="tests")
        with TestClient(create_app(registry=registry), raise_server_exceptions=False) as anonymous:
            assert anonymous.get("/v1/bricks").status_code == 401
            assert anonymous.post("/v1/search", json={"query": "x"}).status_code == 401
            assert anonymous.get("/healthz").status_code == 200
            reader = TestClient(anonymous.app, headers={"Authorization": f"Bearer {token}"})
            assert reader.get("/v1/bricks").status_code == 200
            assert reader.get("/v1/merge-methods").status_code == 200
    finally:
        registry.close()


def test_bootstrap_admin_token_is_created_once_and_saved_privately(settings: Any) -> None:
    from registry.service import Registry

    registry = Registry.open(settings)
    try:
        token = registry.bootstrap_admin_token()
        assert token is not None and token.startswith("bky_")
        path = settings.admin_token_file
        assert path.read_text().strip() == token
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert registry.tokens.authenticate(token).scope == "admin"
        assert registry.bootstrap_admin_token() is None
    finally:
        registry.close()


def test_history_shows_who_registered_changed_and_deleted(
    client: Any, tokens: dict[str, str], llama_base: Path
) -> None:
    register_base(client, llama_base)
    writer = _as(client, tokens["write"])
    config, weights = random_adapter(8)
    assert upload(writer, metadata=brick_metadata(), config=config, weights=weights).status_code == 201
    assert writer.patch("/v1/bricks/sentiment/versions/1", json={"tags": ["x"]}).status_code == 200
    assert client.delete("/v1/bricks/sentiment/versions/1").status_code == 200
    history = client.get("/v1/bricks/sentiment/history").json()
    assert [(e["action"], e["actor"], e["subject"]) for e in history] == [
        ("brick.delete", "test-admin", "brick:sentiment@1"),
        ("brick.update", "write-token", "brick:sentiment@1"),
        ("brick.register", "write-token", "brick:sentiment@1"),
    ]
    assert history[1]["details"] == {"fields": ["tags"]}
    assert all(e["at"] for e in history)


def test_token_cli(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    from typer.testing import CliRunner

    from registry.cli.app import app
    from registry.service import Registry

    monkeypatch.setenv("BRICKYARD_HOME", str(settings.home))
    monkeypatch.setenv("BRICKYARD_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    created = runner.invoke(app, ["token", "create", "--scope", "write", "--name", "ci"])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("bky_")
    listing = runner.invoke(app, ["token", "list"]).output
    assert "ci" in listing and "write" in listing and token not in listing
    assert runner.invoke(app, ["token", "revoke", "ci"]).exit_code == 0
    registry = Registry.open(settings)
    try:
        from registry.errors import Unauthorized

        with pytest.raises(Unauthorized):
            registry.tokens.authenticate(token)
    finally:
        registry.close()
    assert runner.invoke(app, ["token", "create", "--scope", "root", "--name", "x"]).exit_code != 0


def test_closed_reads_close_the_api_description_too(settings: Any) -> None:
    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import AuthSettings

    closed = settings.model_copy(update={"auth": AuthSettings(open_reads=False, bootstrap_admin=False)})
    registry = Registry.open(closed)
    try:
        token, _ = registry.tokens.create("reader", "read", actor="tests")
        with TestClient(create_app(registry=registry), raise_server_exceptions=False) as anonymous:
            for path in ("/openapi.json", "/docs", "/redoc"):
                response = anonymous.get(path)
                assert response.status_code == 401, path
                assert response.headers["content-type"] == "application/problem+json"
            reader = TestClient(anonymous.app, headers={"Authorization": f"Bearer {token}"})
            assert reader.get("/openapi.json").json()["info"]["title"] == "Brickyard"
            assert reader.get("/docs").status_code == 200
    finally:
        registry.close()


def test_open_reads_leave_the_api_description_open(client: Any) -> None:
    from fastapi.testclient import TestClient as Plain

    anonymous = Plain(client.app)
    assert anonymous.get("/openapi.json").status_code == 200
