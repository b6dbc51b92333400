"""The two embedding runtimes give the same vectors; the batching thread serves many callers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from registry.search.embed import OnnxEmbedder, TorchEmbedder, _BatchingEmbedder, _next_pass, _Request, shared_embedder
from registry.settings import EmbeddingSettings

MODEL = EmbeddingSettings().resolved_model_path()
TEXTS = [
    "translate customer emails from Romanian to English",
    "  leading and trailing spaces  ",
    "UPPER case and ünïcödé 🙂",
    "x",
    "a long input that goes past the model's 256-token window " * 40,
    "Is the following review positive or negative? The food was cold and the waiter rude.",
]


@pytest.fixture(scope="module")
def torch_embedder() -> TorchEmbedder:
    return TorchEmbedder(MODEL)


@pytest.fixture(scope="module")
def onnx_embedder(embedding_cache: Path) -> OnnxEmbedder:
    return OnnxEmbedder(MODEL, embedding_cache)


def test_onnx_and_torch_give_the_same_vectors(torch_embedder: TorchEmbedder, onnx_embedder: OnnxEmbedder) -> None:
    want_sentences, want_layers = torch_embedder.embed_with_layer(TEXTS)
    got_sentences, got_layers = onnx_embedder.embed_with_layer(TEXTS)
    assert got_sentences.shape == got_layers.shape == (len(TEXTS), 384)
    assert got_sentences.dtype == np.float32
    np.testing.assert_allclose(got_sentences, want_sentences, atol=1e-5)
    np.testing.assert_allclose(got_layers, want_layers, atol=1e-5)
    # The two views are different vectors, each of unit length.
    assert np.abs(got_sentences - got_layers).max() > 0.1
    np.testing.assert_allclose(np.linalg.norm(got_sentences, axis=1), 1.0, atol=1e-5)
    # Same vectors, same identity: switching runtime needs no reindex.
    assert onnx_embedder.name == torch_embedder.name


def test_a_text_embeds_the_same_alone_and_in_a_batch(onnx_embedder: OnnxEmbedder) -> None:
    batch = onnx_embedder.embed(TEXTS)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(onnx_embedder.embed([text])[0], batch[i], atol=1e-5)


def assert_concurrent_callers_get_their_own_vectors(
    embedder: Any, texts: list[str], callers: int, *, atol: float
) -> None:
    """``callers`` threads at once, each embedding one of ``texts``, each get its vector."""
    expected = embedder.embed(texts)
    results: dict[int, np.ndarray] = {}

    def ask(i: int) -> None:
        results[i] = embedder.embed([texts[i % len(texts)]])[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, vector in results.items():
        np.testing.assert_allclose(vector, expected[i % len(texts)], atol=atol)
    assert len(results) == callers


def test_concurrent_callers_each_get_their_own_vectors(onnx_embedder: OnnxEmbedder) -> None:
    assert_concurrent_callers_get_their_own_vectors(onnx_embedder, TEXTS, 24, atol=1e-5)


def test_idle_onnx_threads_sleep_rather_than_spin(onnx_embedder: OnnxEmbedder) -> None:
    onnx_embedder.embed(["load the session"])
    options = onnx_embedder._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_no_texts_give_an_empty_array(onnx_embedder: OnnxEmbedder) -> None:
    vectors, layers = onnx_embedder.embed_with_layer([])
    assert vectors.shape == layers.shape == (0, 384)


def test_int8_vectors_are_close_but_named_apart(embedding_cache: Path, onnx_embedder: OnnxEmbedder) -> None:
    quantized = OnnxEmbedder(MODEL, embedding_cache, quantize=True)
    cosines = (quantized.embed(TEXTS) * onnx_embedder.embed(TEXTS)).sum(axis=1)
    assert cosines.min() > 0.95
    assert cosines.max() < 0.99999  # really quantized, not the float model again
    assert quantized.name == onnx_embedder.name + "-int8-onnx"


def test_shared_embedder_is_one_per_process_and_configuration(embedding_cache: Path) -> None:
    first = shared_embedder(MODEL, cache_dir=embedding_cache)
    assert shared_embedder(MODEL, cache_dir=embedding_cache) is first
    assert isinstance(first, OnnxEmbedder)
    assert isinstance(shared_embedder(MODEL, runtime="torch"), TorchEmbedder)
    with pytest.raises(ValueError, match="cache directory"):
        shared_embedder(MODEL, runtime="onnx", cache_dir=None)


def test_a_process_embedding_with_onnx_never_imports_torch(onnx_embedder: OnnxEmbedder, embedding_cache: Path) -> None:
    onnx_embedder.embed(["export first"])  # the export (which needs torch) is done by now
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from registry.search.embed import OnnxEmbedder\n"
        "from registry.settings import EmbeddingSettings\n"
        f"e = OnnxEmbedder(EmbeddingSettings().resolved_model_path(), Path({str(embedding_cache)!r}))\n"
        "print(e.embed(['hello']).shape, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["(1,", "384)", "False"]


class _Recording(_BatchingEmbedder):
    """Vectors derived from the text alone; records each forward pass; the first pass waits
    for ``gate`` so that requests pile up behind it."""

    def __init__(self) -> None:
        super().__init__(Path("."), "recording")
        self.passes: list[list[str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()  # the first pass is running (waiting for the gate)

    @property
    def dim(self) -> int:
        return 3

    def _encode_chunk(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not self.passes:
            self.entered.set()
            self.gate.wait(10)
        self.passes.append(list(texts))
        time.sleep(0.05)  # a forward pass takes time: callers answered early get to run meanwhile
        if any("boom" in t for t in texts):
            raise RuntimeError("boom")
        rows = np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], np.float32)
        return rows, -rows


def _expected(texts: list[str]) -> np.ndarray:
    return np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], np.float32)


def test_a_short_query_overtakes_a_long_registration() -> None:
    embedder = _Recording()
    long_texts = [f"example {i} " * (20 + i) for i in range(40)]
    finished: list[str] = []
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def call(label: str, texts: list[str]) -> None:
        results[label] = embedder.embed_with_layer(texts)
        finished.append(label)

    first = threading.Thread(target=call, args=("first", ["warm"]))
    first.start()
    assert embedder.entered.wait(10)  # the encoding thread is blocked on the gate with "warm"
    registration = threading.Thread(target=call, args=("registration", long_texts))
    registration.start()
    query = threading.Thread(target=call, args=("query", ["short query"]))
    query.start()
    deadline = time.monotonic() + 10
    assert embedder._queue is not None
    while embedder._queue.qsize() < 2 and time.monotonic() < deadline:  # both queued behind it
        time.sleep(0.001)
    embedder.gate.set()
    for thread in (first, registration, query):
        thread.join(10)
    assert finished.index("query") < finished.index("registration")
    assert embedder.passes[1][0] == "short query"  # in the pass right after the running one
    assert all(len(p) <= 16 for p in embedder.passes)
    np.testing.assert_array_equal(results["registration"][0], _expected(long_texts))  # order kept
    np.testing.assert_array_equal(results["registration"][1], -_expected(long_texts))
    np.testing.assert_array_equal(results["query"][0], _expected(["short query"]))


def test_a_caller_waiting_too_long_goes_first() -> None:
    old = _Request(["a long text " * 50])
    fresh = _Request(["short"])
    old.since -= 10
    assert _next_pass([fresh, old], old.since + 10)[0] == (old, 0)
    assert _next_pass([fresh, _Request(["a long text " * 50])], fresh.since)[0] == (fresh, 0)


def test_a_pass_is_bounded_by_padded_characters() -> None:
    # Padding every text to the longest of a wide pass cost twice the CPU of narrow passes:
    # long texts go in small passes, one-line queries still share one.
    long_texts = ["x" * 300, "y" * 200, "z" * 250]
    registration = _Request(long_texts)
    first = _next_pass([registration], registration.since)
    assert [registration.texts[i] for _, i in first] == ["y" * 200, "z" * 250]  # 2 x 250 <= 512; 3 x 300 is not
    queries = [_Request([f"query {i}"]) for i in range(20)]
    batch = _next_pass(list(queries), queries[0].since)
    assert len(batch) == 16  # 16 short texts fit in 512 padded characters
    alone = _Request(["w" * 2000])
    assert _next_pass([alone], alone.since) == [(alone, 0)]  # a text longer than the budget still goes


def test_every_text_is_encoded_once_in_bounded_passes() -> None:
    embedder = _Recording()
    embedder.gate.set()
    texts = [("word " * n).strip() for n in (1, 90, 3, 40, 2, 100, 7)]
    sentences, layers = embedder.embed_with_layer(texts)
    np.testing.assert_array_equal(sentences, _expected(texts))
    np.testing.assert_array_equal(layers, -_expected(texts))
    assert sorted(t for p in embedder.passes for t in p) == sorted(texts)
    assert all(len(p) == 1 or len(p) * max(map(len, p)) <= 512 for p in embedder.passes)


def test_a_failing_pass_fails_only_its_callers() -> None:
    embedder = _Recording()
    embedder.gate.set()
    with pytest.raises(RuntimeError, match="boom"):
        embedder.embed(["boom"])
    np.testing.assert_array_equal(embedder.embed(["fine"]), _expected(["fine"]))
