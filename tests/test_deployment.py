"""What can be checked of the deployment files without Docker: they parse, they wire the
API to PostgreSQL with pgvector, and every BRICKYARD_* variable they set is a real setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from registry.cli.app import app
from registry.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _is_setting(env_name: str) -> bool:
    path = env_name.removeprefix("BRICKYARD_").lower().split("__")
    model: type[BaseModel] = Settings
    for depth, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if depth < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def test_compose_has_api_and_pgvector_with_volumes_and_healthchecks() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) >= {"api", "db"}
    assert services["db"]["image"].startswith("pgvector/pgvector:")
    for name in ("api", "db"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["volumes"], name
    named_volumes = set(compose["volumes"])
    for name in ("api", "db"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert source.startswith(".") or source in named_volumes, volume
    assert services["api"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["api"]["environment"]["BRICKYARD_DATABASE_URL"].startswith("postgresql://")
    assert (ROOT / services["api"]["build"] / "Dockerfile").exists()


def test_every_brickyard_variable_is_a_real_setting() -> None:
    names = [k for k in _compose()["services"]["api"]["environment"] if k.startswith("BRICKYARD_")]
    assert names
    for name in names:
        assert _is_setting(name), name
    assert not _is_setting("BRICKYARD_NO_SUCH_THING")


def test_compose_command_uses_real_cli_commands() -> None:
    command = " ".join(_compose()["services"]["api"]["command"])
    top = {c.name or c.callback.__name__ for c in app.registered_commands}
    groups = {g.name for g in app.registered_groups}
    assert "brickyard serve" in command and "serve" in top
    assert "brickyard db upgrade" in command and "db" in groups


def test_compose_stores_blobs_in_minio_with_a_bucket_made_at_start() -> None:
    services = _compose()["services"]
    assert services["minio"]["image"].startswith("minio/minio")
    assert services["buckets"]["image"].startswith("minio/mc")
    assert services["minio"]["healthcheck"]["test"]
    assert services["buckets"]["depends_on"]["minio"]["condition"] == "service_healthy"
    bucket_command = " ".join(services["buckets"]["command"])
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["BRICKYARD_BLOBS__ENDPOINT_URL"] == "http://minio:9000", name
        assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"], name
        bucket = Settings(blobs={"url": env["BRICKYARD_BLOBS__URL"]}).blobs.url.removeprefix("s3://").split("/")[0]
        assert f"mc mb --ignore-existing local/{bucket}" in bucket_command, name
    assert services["api"]["depends_on"]["buckets"]["condition"] == "service_completed_successfully"
    assert services["api"]["environment"]["BRICKYARD_COMPOSE__WORKERS"] == "0"  # the worker service builds


def test_worker_service_runs_the_worker_command_with_real_settings() -> None:
    worker = _compose()["services"]["worker"]
    assert worker["command"][:2] == ["brickyard", "worker"]
    top = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert "worker" in top
    assert worker["healthcheck"]["test"]
    names = [k for k in worker["environment"] if k.startswith("BRICKYARD_")]
    assert "BRICKYARD_DATABASE_URL" in names
    for name in names:
        assert _is_setting(name), name
