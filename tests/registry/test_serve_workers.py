"""``brickyard serve --workers N`` (issue #23): N server processes behind one port share one
database queue. Real processes: the command is started as a user starts it, and two queued
compositions are built at the same time by two different server processes, both children of
the one ``serve`` process, as the database's ``worker`` column and each build's own pid show."""

from __future__ import annotations

import io
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

from tests.conftest import brick_metadata, random_adapter

# Loaded by every Python process started with this directory on PYTHONPATH (the `site`
# module imports `sitecustomize`), so also by the server processes uvicorn spawns: each build
# first leaves a marker naming its process, then waits until two builds have started. One
# build thread per process (BRICKYARD_COMPOSE__WORKERS=1) means two builds waiting at once are
# in two processes; should only one process claim, the wait ends after five minutes and the
# test fails on the pids, not by hanging.
_SITECUSTOMIZE = """
import os, pathlib, time

_barrier = os.environ.get("BRICKYARD_TEST_BUILD_BARRIER")
if _barrier:
    from registry.builds import compositions
    _build = compositions.Compositions.build_claimed

    def _build_together(self, composition, worker):
        root = pathlib.Path(_barrier)
        (root / f"{composition.id}.{os.getpid()}").write_text(worker)
        deadline = time.monotonic() + 300
        while len(list(root.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        return _build(self, composition, worker)

    compositions.Compositions.build_claimed = _build_together
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parent_pid(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")".
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.fixture
def served(settings: Any, registry: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``brickyard serve --workers 2`` on a loopback port, on the test's database and home."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    barrier = tmp_path / "builds"
    barrier.mkdir()
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "BRICKYARD_HOME": str(settings.home),
        "BRICKYARD_DATABASE_URL": settings.database_url,
        "BRICKYARD_COMPOSE__WORKERS": "1",
        "BRICKYARD_COMPOSE__ISOLATION": "thread",
        "BRICKYARD_EMBEDDING__ISOLATION": "thread",
        "BRICKYARD_TEST_BUILD_BARRIER": str(barrier),
    }
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "registry", "serve", "--port", str(port), "--workers", "2", "--log-level", "info"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            # Every process must be serving (and its build workers started) before compositions
            # are queued: uvicorn logs one "Application startup complete" per worker process.
            started = log_path.read_text(errors="replace").count("Application startup complete")
            try:
                if started == 2 and httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        token, _ = registry.tokens.create("serve-workers-test", "admin", actor="tests")
        yield {"url": url, "token": token, "pid": process.pid, "barrier": barrier, "log": log_path}
    finally:
        process.terminate()  # uvicorn's manager stops its worker processes
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_two_server_processes_share_the_queue_and_build_at_once(
    served: dict[str, Any], registry: Any, llama_base: Path
) -> None:
    from sqlalchemy import select

    from registry.db.models import CompositionRow

    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    for seed, name in enumerate(("a", "b"), start=1):
        config, weights = random_adapter(seed)
        registry.register_brick(brick_metadata(name), config, io.BytesIO(weights))
    ids = []
    headers = {"Authorization": f"Bearer {served['token']}"}
    with httpx.Client(base_url=served["url"], headers=headers, timeout=60) as api:
        for name in ("a", "b"):
            queued = api.post("/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": name}]})
            assert queued.status_code == 202, queued.text
            ids.append(queued.json()["id"])
        deadline = time.monotonic() + 900
        for composition_id in ids:
            while (body := api.get(f"/v1/compositions/{composition_id}").json())["status"] not in ("ready", "failed"):
                assert time.monotonic() < deadline, served["log"].read_text(errors="replace")[-3000:]
                time.sleep(0.3)
            assert body["status"] == "ready", body

    # Each build left "<id>.<pid>" before waiting for the other: both waited at once.
    markers = {p.name.split(".")[0]: int(p.name.split(".")[1]) for p in served["barrier"].iterdir()}
    assert sorted(markers) == sorted(ids)
    build_pids = set(markers.values())
    assert len(build_pids) == 2, markers
    assert all(_parent_pid(pid) == served["pid"] for pid in build_pids)  # uvicorn's workers, not other servers
    with registry.store.db.session() as session:
        rows = session.execute(select(CompositionRow.id, CompositionRow.worker).where(CompositionRow.id.in_(ids)))
        workers = dict(rows.all())
    assert {composition_id: int(str(workers[composition_id]).split(":")[1]) for composition_id in ids} == markers
