"""Settings come from BRICKYARD_* environment variables, with sane defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.settings import Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("BRICKYARD_HOME", "BRICKYARD_DATABASE_URL", "BRICKYARD_BLOB_DIR", "BRICKYARD_EMBEDDING__CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    settings = Settings()
    assert settings.home == tmp_path / ".brickyard"
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path / '.brickyard' / 'brickyard.db'}"
    assert settings.is_embedded_sqlite
    assert settings.blob_root == tmp_path / ".brickyard" / "blobs"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.embedding.resolved_model_path().joinpath("config.json").exists()
    assert settings.embedding.runtime == "onnx"
    # The user's cache, not the home: every home on the machine shares one export.
    assert settings.embedding_cache_dir == tmp_path / ".cache" / "brickyard" / "embeddings"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BRICKYARD_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("BRICKYARD_DATABASE_URL", "postgresql://u:p@db:5432/brickyard")
    monkeypatch.setenv("BRICKYARD_LIMITS__MAX_ADAPTER_BYTES", "1234")
    monkeypatch.setenv("BRICKYARD_EMBEDDING__MODEL_PATH", str(tmp_path / "model"))
    monkeypatch.setenv("BRICKYARD_EMBEDDING__RUNTIME", "torch")
    monkeypatch.setenv("BRICKYARD_EMBEDDING__CACHE_DIR", str(tmp_path / "exported"))
    settings = Settings()
    assert settings.home == tmp_path / "h"
    assert settings.sqlalchemy_url == "postgresql+psycopg://u:p@db:5432/brickyard"
    assert not settings.is_embedded_sqlite
    assert settings.limits.max_adapter_bytes == 1234
    assert settings.embedding.resolved_model_path() == tmp_path / "model"
    assert settings.embedding.runtime == "torch"
    assert settings.embedding_cache_dir == tmp_path / "exported"


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("BRICKYARD_PORT", "99999")
    with pytest.raises(ValidationError):
        Settings()


def test_the_embedding_export_cache_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BRICKYARD_EMBEDDING__CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    one, other = Settings(home=tmp_path / "a"), Settings(home=tmp_path / "b")
    assert one.embedding_cache_dir == other.embedding_cache_dir == tmp_path / "xdg" / "brickyard" / "embeddings"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG rule: a relative path is ignored
    assert Settings().embedding_cache_dir == tmp_path / "user" / ".cache" / "brickyard" / "embeddings"
