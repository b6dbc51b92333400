"""The embedding child: same vectors as the server's own model, low priority, and a dead or
stalled child fails one call cleanly and is replaced."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from registry.errors import ServiceUnavailable
from registry.search.embed import OnnxEmbedder
from registry.search.embed_process import NICENESS, ProcessEmbedder
from registry.settings import EmbeddingSettings
from tests.registry.search.test_embed import assert_concurrent_callers_get_their_own_vectors

MODEL = EmbeddingSettings().resolved_model_path()
TEXTS = [
    "translate customer emails from Romanian to English",
    "UPPER case and ünïcödé 🙂",
    "a long input that goes past the model's 256-token window " * 40,
]


def _config(cache: Path, **changes: Any) -> dict[str, Any]:
    return {"path": str(MODEL), "runtime": "onnx", "cache_dir": str(cache), "quantize": False, "threads": 1} | changes


@pytest.fixture(scope="module")
def child(embedding_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessEmbedder]:
    embedder = ProcessEmbedder(_config(embedding_cache), tmp_path_factory.mktemp("logs") / "embed.log")
    embedder.start()
    yield embedder
    embedder.close()


def _process_mode(settings: Any) -> Any:
    """``settings`` with brick texts embedded in the child process."""
    return settings.model_copy(update={"embedding": settings.embedding.model_copy(update={"isolation": "process"})})


def _pid(embedder: ProcessEmbedder) -> int:
    assert embedder._child is not None
    return embedder._child.process.pid


def _kill_once_sent(embedder: ProcessEmbedder, monkeypatch: pytest.MonkeyPatch) -> threading.Thread:
    """Stop the child, then SIGKILL it as soon as the next request has been written to it,
    so that the request is in flight when the child dies."""
    child = embedder._child
    assert child is not None
    pid, sent, send = child.process.pid, threading.Event(), child._send

    def spy(payload: bytes, deadline: float) -> None:
        send(payload, deadline)
        sent.set()

    monkeypatch.setattr(child, "_send", spy)
    os.kill(pid, signal.SIGSTOP)

    def kill() -> None:
        assert sent.wait(60)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    return killer


def test_the_child_gives_the_servers_vectors_and_identity(child: ProcessEmbedder, embedding_cache: Path) -> None:
    local = OnnxEmbedder(MODEL, embedding_cache)
    want_sentences, want_layers = local.embed_with_layer(TEXTS)
    got_sentences, got_layers = child.embed_with_layer(TEXTS)
    assert got_sentences.dtype == np.float32 and got_sentences.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got_sentences, want_sentences, atol=1e-6)
    np.testing.assert_allclose(got_layers, want_layers, atol=1e-6)
    assert child.name == local.name and child.dim == 384
    assert child.embed([]).shape == (0, 384)


def test_the_child_runs_at_background_priority(child: ProcessEmbedder) -> None:
    child.embed(TEXTS[:1])  # the encoding thread starts on the first call
    pid = _pid(child)
    tasks = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    assert len(tasks) >= 3  # main, onnxruntime's, the encoding thread (and numpy's)
    for task in tasks:  # every thread, also those started before it lowered itself
        assert os.getpriority(os.PRIO_PROCESS, task) == NICENESS
        assert os.sched_getscheduler(task) == os.SCHED_IDLE


def test_concurrent_callers_get_their_own_vectors(child: ProcessEmbedder) -> None:
    assert_concurrent_callers_get_their_own_vectors(child, TEXTS, 9, atol=1e-6)


def test_a_child_killed_during_a_call_fails_that_call_and_is_replaced(
    child: ProcessEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = _pid(child)
    killer = _kill_once_sent(child, monkeypatch)
    with pytest.raises(ServiceUnavailable, match="killed by signal 9"):
        child.embed(TEXTS)
    killer.join()
    assert child.embed(TEXTS[:1]).shape == (1, 384)
    assert _pid(child) != pid


def test_a_stalled_child_times_out_and_is_replaced(embedding_cache: Path, tmp_path: Path) -> None:
    # The short timeout is for calls; starting (loading the model) has its own.
    embedder = ProcessEmbedder(_config(embedding_cache), tmp_path / "embed.log", timeout_s=1.0, start_timeout_s=120)
    try:
        embedder.start()
        pid = _pid(embedder)
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="no answer in time"):
            embedder.embed(TEXTS)
        assert time.monotonic() - started < 5
        with pytest.raises(ProcessLookupError):  # the stalled child was killed, not left behind
            os.kill(pid, 0)
        embedder.timeout_s = 120  # the replacement runs at idle priority: give a busy machine time
        assert embedder.embed(TEXTS[:1]).shape == (1, 384)
    finally:
        embedder.close()


def test_a_model_that_does_not_load_is_a_clear_503(tmp_path: Path) -> None:
    embedder = ProcessEmbedder(_config(tmp_path, path=str(tmp_path / "no-such-model")), tmp_path / "embed.log")
    with pytest.raises(ServiceUnavailable, match="did not start") as caught:
        embedder.embed(TEXTS)
    assert str(tmp_path / "embed.log") in str(caught.value)
    embedder.close()


def test_the_child_exits_when_its_server_goes_away(embedding_cache: Path, tmp_path: Path) -> None:
    embedder = ProcessEmbedder(_config(embedding_cache), tmp_path / "embed.log")
    embedder.start()
    assert embedder._child is not None
    process = embedder._child.process
    assert process.stdin is not None
    process.stdin.close()  # what the child sees when the server dies
    assert process.wait(30) == 0
    embedder.close()


def test_the_child_exits_when_its_server_is_killed(embedding_cache: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; from registry.search.embed_process import ProcessEmbedder\n"
        f"e = ProcessEmbedder({_config(embedding_cache)!r}, Path({str(tmp_path / 'embed.log')!r}))\n"
        "e.start(); print(e._child.process.pid, flush=True); sys.stdin.read()\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as server:
        assert server.stdout is not None
        child_pid = int(server.stdout.readline())
        os.kill(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _running(child_pid):
        if time.monotonic() > deadline:
            os.kill(child_pid, signal.SIGKILL)
            pytest.fail("the embedding child outlived its killed server")
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited child waiting to be reaped by init does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_closed_embedder_does_not_start_a_child(embedding_cache: Path, tmp_path: Path) -> None:
    embedder = ProcessEmbedder(_config(embedding_cache), tmp_path / "embed.log")
    embedder.start()
    assert embedder._child is not None
    process = embedder._child.process
    embedder.close()
    assert process.poll() is not None
    with pytest.raises(ServiceUnavailable, match="stopped"):
        embedder.embed(TEXTS)
    assert embedder._child is None
    assert embedder.name and embedder.dim == 384  # known facts, no new child


def test_a_closed_registry_starts_no_embedding_child(settings: Any) -> None:
    from registry.service import Registry

    registry = Registry.open(_process_mode(settings))
    registry.close()
    with pytest.raises(ServiceUnavailable, match="closed"):
        registry.brick_embedder  # noqa: B018 - what a late warm-up thread does


def test_a_registry_embeds_brick_texts_in_the_child(settings: Any, embedding_cache: Path) -> None:
    from registry.service import Registry

    process_settings = _process_mode(settings)
    registry = Registry.open(process_settings)
    try:
        query_vector = registry.embedder.embed(["a search first loads the server's own model"])
        assert query_vector.shape == (1, 384)
        embedder = registry.brick_embedder
        assert isinstance(embedder, ProcessEmbedder)
        embedded = registry._embed("classify the sentiment of a review", ("the food was cold",))
        want = registry.embedder.embed(["classify the sentiment of a review", "the food was cold"])
        np.testing.assert_allclose(np.vstack([embedded.desc_vec, embedded.ex_vecs]), want, atol=1e-6)
        assert embedded.model == registry.embedder.name
        process = embedder._child.process if embedder._child is not None else None
        assert process is not None and process.poll() is None
    finally:
        registry.close()
    assert process.poll() is not None


def test_in_thread_mode_the_registry_uses_its_own_embedder(registry: Any) -> None:
    assert registry.settings.embedding.isolation == "thread"
    assert registry.brick_embedder is registry.embedder


def test_an_embedder_given_to_the_registry_serves_brick_texts_too(settings: Any) -> None:
    from registry.service import Registry
    from registry.storage.store import Store

    given = OnnxEmbedder(MODEL, settings.embedding_cache_dir)
    process_settings = _process_mode(settings)
    opened = Registry.open(process_settings)
    registry = Registry(process_settings, Store(opened.store.db), opened.blobs, embedder=given)
    try:
        assert registry.brick_embedder is given
    finally:
        opened.close()


@pytest.fixture
def process_client(settings: Any, llama_base: Path) -> Iterator[tuple[Any, Any]]:
    """The app over a registry that embeds brick texts in its child process."""
    from fastapi.testclient import TestClient

    from registry.api import create_app
    from registry.service import Registry
    from tests.conftest import register_base

    registry = Registry.open(_process_mode(settings))
    token, _ = registry.tokens.create("admin", "admin", actor="tests")
    try:
        with TestClient(
            create_app(registry=registry), raise_server_exceptions=False, headers={"Authorization": f"Bearer {token}"}
        ) as client:
            register_base(client, llama_base)
            yield client, registry
    finally:
        registry.close()


def test_a_registration_whose_embedding_child_dies_is_a_503_that_leaves_nothing(
    process_client: tuple[Any, Any], loras: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import upload
    from tests.registry.api.test_bad_input import assert_nothing_stored, assert_problem

    client, registry = process_client
    embedder = registry.brick_embedder
    assert isinstance(embedder, ProcessEmbedder)
    embedder.start()
    pid = _pid(embedder)
    killer = _kill_once_sent(embedder, monkeypatch)
    response = upload(client, loras["r4"])
    killer.join()
    assert_problem(response, 503, "service-unavailable", "embedding failed", "killed by signal 9")
    assert_nothing_stored(registry)
    # The next registration starts a new child and succeeds, with its vectors searchable.
    again = upload(client, loras["r4"])
    assert again.status_code == 201, again.text
    assert _pid(embedder) != pid
    hits = client.post("/v1/search", json={"query": "classify sentiment", "k": 1}).json()["hits"]
    assert [hit["brick"]["name"] for hit in hits] == ["sentiment"]
