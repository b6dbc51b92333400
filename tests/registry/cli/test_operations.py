"""Operations through the command line (issue #21): one-line database errors, ``db current``
exit status, server-side paths of ``base add --url``, and what ``fsck --repair`` kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from registry.cli.app import app


def _run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_db_upgrade_on_an_unreachable_database_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BRICKYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BRICKYARD_DATABASE_URL", "postgresql+psycopg://brickyard:s3cret@127.0.0.1:9/brickyard")
    for command in (("db", "upgrade"), ("db", "current")):
        result = _run(*command)
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert lines[0].startswith("error: cannot use the database postgresql+psycopg://brickyard:***@127.0.0.1:9")
        assert "s3cret" not in result.output and "Traceback" not in result.output


def test_db_current_exits_non_zero_when_out_of_date(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, empty_database_url: str
) -> None:
    monkeypatch.setenv("BRICKYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BRICKYARD_DATABASE_URL", empty_database_url)
    stale = _run("db", "current")
    assert stale.exit_code == 1 and "out of date" in stale.output
    assert _run("db", "upgrade").exit_code == 0
    fresh = _run("db", "current")
    assert fresh.exit_code == 0 and "up to date" in fresh.output


def test_base_add_with_url_says_the_path_is_read_by_the_server(
    monkeypatch: pytest.MonkeyPatch, client: Any, tmp_path: Path, admin_token: str
) -> None:
    from fastapi.testclient import TestClient

    import registry.client as client_module

    original = client_module.RemoteClient
    monkeypatch.setattr(
        client_module,
        "RemoteClient",
        lambda url, *, token=None, **_: original(url, token=token, http=TestClient(client.app)),
    )
    monkeypatch.setenv("BRICKYARD_HOME", str(tmp_path / "client-home"))
    result = _run("--token", admin_token, "base", "add", "/nowhere/model", "-n", "m", "--url", "http://testserver")
    assert result.exit_code == 1
    assert "read by the server at http://testserver, on its file system" in result.output


def test_fsck_repair_says_what_it_kept_for_the_grace_period(
    monkeypatch: pytest.MonkeyPatch, registry: Any, settings: Any
) -> None:
    monkeypatch.setenv("BRICKYARD_HOME", str(settings.home))
    monkeypatch.setenv("BRICKYARD_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("COLUMNS", "200")
    staged = registry.blobs.stage_bytes(b"an upload in flight")
    registry.blobs.commit(staged)  # a blob no row references (yet): an orphan, seconds old
    kept = _run("fsck", "--repair", "--quick")
    assert kept.exit_code == 0, kept.output
    assert "kept 1 orphaned blobs or staging files younger than the grace period (3600 s)" in kept.output
    assert registry.blobs.exists(staged.sha256)
    removed = _run("fsck", "--repair", "--quick", "--grace", "0")
    assert "kept" not in removed.output and not registry.blobs.exists(staged.sha256)


def test_the_first_local_search_announces_the_one_time_export(tmp_path: Path) -> None:
    """In a process of its own, as a user runs it (the export is once per process and cache)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("BRICKYARD_")}
    env.update(
        BRICKYARD_HOME=str(tmp_path / "home"),
        BRICKYARD_EMBEDDING__CACHE_DIR=str(tmp_path / "fresh-cache"),  # nothing exported yet
        BRICKYARD_EMBEDDING__ISOLATION="thread",
    )
    command = [sys.executable, "-m", "registry", "search", "classify reviews"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "note: exporting embedding model" in first.stderr and "once" in first.stderr
    assert first.stdout == ""  # no hits, and the note stays off stdout
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "note:" not in second.stderr


def test_worker_prints_one_line_per_build(
    registry: Any, settings: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    """``brickyard worker`` as a user runs it (its own process), building a queued tiny
    composition: one line naming the build, its outcome and time; SIGTERM stops it cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    from tests.conftest import brick_metadata

    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    with (loras["r4"] / "adapter_model.safetensors").open("rb") as weights:
        config = (loras["r4"] / "adapter_config.json").read_bytes()
        registry.register_brick(brick_metadata("sentiment"), config, weights)
    good, _ = registry.compositions.request({"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}]})

    # Without PYTHONUNBUFFERED, as in a CI job or `brickyard worker | tee`: the line must be flushed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRICKYARD_") and k != "PYTHONUNBUFFERED"}
    env.update(
        BRICKYARD_HOME=str(settings.home),
        BRICKYARD_DATABASE_URL=settings.database_url,
        BRICKYARD_COMPOSE__ISOLATION="process",  # the default: builds in a child of the worker
        BRICKYARD_EMBEDDING__CACHE_DIR=os.environ["BRICKYARD_EMBEDDING__CACHE_DIR"],
        BRICKYARD_MODEL_ROOTS=os.environ["BRICKYARD_MODEL_ROOTS"],
    )
    lines: list[str] = []
    built = threading.Event()
    errors = settings.home / "worker-stderr.log"
    with (
        errors.open("wb") as stderr,
        subprocess.Popen(
            [sys.executable, "-m", "registry", "worker"], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        ) as worker,
    ):

        def read() -> None:
            assert worker.stdout is not None
            for line in worker.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith(good.id[:16]):
                    built.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            # A generous bound, not a budget: it only stops a hung worker from hanging the suite.
            assert built.wait(300), f"no build line; stdout {lines}"
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(60)
        reader.join(10)
    assert code == 0, errors.read_text()
    assert "building compositions with 1 worker(s); Ctrl-C to stop" in lines
    build_lines = [line for line in lines if line.startswith(good.id[:16])]
    assert len(build_lines) == 1, lines
    words = build_lines[0].split()
    assert words[1:3] == ["ready", "in"] and words[4].rstrip(":") == "s", build_lines
    assert float(words[3]) > 0
    assert registry.compositions.get(good.id).status == "ready"
