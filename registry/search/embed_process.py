"""Embedding brick texts in a child process at low priority.

A registration embeds its description and up to dozens of examples: tens of milliseconds of
CPU each, against a few for a one-line search query. Run in the server, that work competes
with searches for the same two cores and the same GIL, and a mixed load makes every search
wait behind it (profiled with ``bench/load.py --profile``: the MiniLM forward pass was the
largest share of the server's CPU). `ProcessEmbedder` moves it to one long-lived child,
``python -m registry.search.embed_process``, at background priority (`registry.priority`; it loads
the model first, at normal priority): the kernel gives the child the CPU that searches
leave, so under load registrations wait instead of searches. Queries stay in the server.
On a CPU saturated for long, a background task still gets a sliver (a registration's
~80 ms of CPU then takes tens of seconds); a call not answered within ``timeout_s`` fails.

The child loads the same model with the same settings, so its vectors are the ones the
server would compute. It reads length-prefixed JSON lists of texts on stdin and answers each
with both views as raw float32. When the server goes away the child reads end-of-file and
exits; when the child dies or stalls, the call raises `ServiceUnavailable` (the request
fails cleanly) and the next call starts a new child.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from registry.errors import ServiceUnavailable
from registry.priority import lower_to_background

__all__ = ["ProcessEmbedder", "main"]

log = logging.getLogger("brickyard.embed")

NICENESS = 19
_HEADER = struct.Struct("<BII")  # status (0 ok, 1 error), rows, dim (or message length)
_LENGTH = struct.Struct("<I")
_OK, _ERROR = 0, 1


class ProcessEmbedder:
    """An `registry.search.embed.Embedder` that runs the model in a low-priority child process.

    Args:
        config: how the child loads the model, the keyword arguments of
            `registry.search.embed.shared_embedder` plus ``path`` (JSON-serialisable).
        log_path: where the child's stderr goes.
        timeout_s: a call not answered in this time fails, and the child is replaced.
        start_timeout_s: how long a new child may take to load the model (it loads at
            normal priority, exporting the ONNX graph first if no process has yet).
    """

    def __init__(
        self, config: dict[str, Any], log_path: Path, *, timeout_s: float = 120.0, start_timeout_s: float = 300.0
    ) -> None:
        self.config = config
        self.log_path = Path(log_path)
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()  # one call at a time talks to the child
        self._child: _Child | None = None
        self._facts: dict[str, Any] | None = None  # the model's name and dim, once known
        self._closed = False
        self.starts = 0  # children started so far; /metrics reports the restarts (starts - 1)

    @property
    def name(self) -> str:
        """Identity of the model (starts the child the first time)."""
        return str(self._known_facts()["name"])

    @property
    def dim(self) -> int:
        """Vector dimension (starts the child the first time)."""
        return int(self._known_facts()["dim"])

    def start(self) -> None:
        """Start the child and load its model now rather than on the first call."""
        with self._lock:
            self._ensure_child()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for ``texts`` (float32)."""
        return self.embed_with_layer(texts)[0]

    def embed_with_layer(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Unit sentence vectors and unit layer vectors, computed by the child.

        Raises:
            ServiceUnavailable: the child could not start, died, stalled past ``timeout_s``
                or failed; it is replaced on the next call.
        """
        if not texts:
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return empty, empty
        with self._lock:
            child = self._ensure_child()
            try:
                return child.embed(list(texts), time.monotonic() + self.timeout_s)
            except _ChildFailed as exc:
                self._replace()
                raise ServiceUnavailable(f"embedding failed: {exc}; see {self.log_path}") from None
            except BaseException:
                self._replace()  # the pipe may be mid-frame: never reuse it
                raise

    def close(self) -> None:
        """Stop the child; later calls raise `ServiceUnavailable`. A call in progress fails
        at once (the child is killed first, then cleaned up once the call lets go)."""
        self._closed = True
        child = self._child
        if child is not None:
            child.signal_kill()
        with self._lock:
            self._replace()

    def _known_facts(self) -> dict[str, Any]:
        if self._facts is None:
            with self._lock:
                self._ensure_child()
        assert self._facts is not None
        return self._facts

    def _ensure_child(self) -> _Child:
        if self._closed:
            raise ServiceUnavailable("the embedding process was stopped (the registry is closed)")
        if self._child is not None and self._child.alive:
            return self._child
        self._replace()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        child = _Child(self.log_path)
        try:
            facts = child.hello(self.config, time.monotonic() + self.start_timeout_s)
        except BaseException as exc:
            child.kill()
            if isinstance(exc, _ChildFailed):
                raise ServiceUnavailable(f"the embedding process did not start: {exc}; see {self.log_path}") from None
            raise
        self._child, self._facts = child, facts
        self.starts += 1
        return child

    def _replace(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child = None


class _ChildFailed(Exception):
    """The child died, stalled or answered an error."""


class _Child:
    def __init__(self, log_path: Path) -> None:
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the child
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "registry.search.embed_process"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                process_group=0 if sys.platform != "win32" else None,  # Ctrl-C is for the server
            )
        except BaseException:
            self._log.close()
            raise
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin_fd = self.process.stdin.fileno()
        self._stdout_fd = self.process.stdout.fileno()
        os.set_blocking(self._stdin_fd, False)  # writes wait with a deadline, like reads

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def hello(self, config: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Send the model config; the child's answer once the model is loaded."""
        _, length = self._call(config, deadline)
        body = self._read(length, deadline)
        try:
            facts = json.loads(body)
            return {"name": str(facts["name"]), "dim": int(facts["dim"])}
        except (ValueError, KeyError, TypeError) as exc:
            raise _ChildFailed(f"the embedding process answered {body[:200]!r}") from exc

    def embed(self, texts: list[str], deadline: float) -> tuple[np.ndarray, np.ndarray]:
        rows, size = self._call(texts, deadline)
        if rows != len(texts):
            raise _ChildFailed(f"asked for {len(texts)} vectors, got {rows}")
        both = np.frombuffer(self._read(2 * rows * size * 4, deadline), dtype=np.float32).reshape(2, rows, size)
        return both[0].copy(), both[1].copy()

    def _call(self, request: Any, deadline: float) -> tuple[int, int]:
        """Send ``request`` as JSON; the (rows, size) of a good answer, whose body follows."""
        self._send(json.dumps(request).encode(), deadline)
        status, rows, size = _HEADER.unpack(self._read(_HEADER.size, deadline))
        if status != _OK:
            raise _ChildFailed(self._read(size, deadline).decode(errors="replace"))
        return rows, size

    def signal_kill(self) -> None:
        """Kill the process, leaving its pipes to whoever is using them."""
        with contextlib.suppress(OSError):
            self.process.kill()

    def kill(self) -> None:
        self.signal_kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()

    def _send(self, payload: bytes, deadline: float) -> None:
        view = memoryview(_LENGTH.pack(len(payload)) + payload)
        while view:
            self._wait(self._stdin_fd, selectors.EVENT_WRITE, deadline)
            try:
                written = os.write(self._stdin_fd, view)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _ChildFailed(self._exit_reason() or str(exc)) from None
            view = view[written:]

    def _read(self, n: int, deadline: float) -> bytes:
        chunks: list[bytes] = []
        while n:
            self._wait(self._stdout_fd, selectors.EVENT_READ, deadline)
            try:
                chunk = os.read(self._stdout_fd, min(n, 1 << 20))
            except OSError as exc:
                raise _ChildFailed(str(exc)) from None
            if not chunk:
                self.process.wait()
                raise _ChildFailed(self._exit_reason() or "the embedding process closed its output")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(fd, event)
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise _ChildFailed("no answer in time")

    def _exit_reason(self) -> str | None:
        code = self.process.poll()
        if code is None:
            return None
        if code < 0:
            return f"the embedding process was killed by signal {-code}"
        return f"the embedding process exited with code {code}"


def main() -> int:
    """Child entry point: the config as the first frame, then one frame of texts per call.

    The model loads at the priority the child was started with (a saturated server must not
    starve the start-up); then every thread drops to background priority."""
    # Answers go to a private copy of stdout; whatever a library prints goes to the log.
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    config = _read_frame(stdin)
    if config is None:
        return 0
    try:
        from registry.search.embed import shared_embedder

        options = json.loads(config)
        path = Path(options.pop("path"))
        cache_dir = options.pop("cache_dir", None)
        embedder = shared_embedder(path, cache_dir=Path(cache_dir) if cache_dir else None, **options)
        hello = json.dumps({"name": embedder.name, "dim": embedder.dim}).encode()
    except Exception as exc:  # reported to the parent, which raises it
        log.exception("could not load the embedding model")
        _write(stdout, _error_frame(str(exc)))
        return 1
    lower_to_background(NICENESS, all_threads=True)  # onnxruntime's threads exist by now
    _write(stdout, _HEADER.pack(_OK, 0, len(hello)) + hello)
    while (frame := _read_frame(stdin)) is not None:
        try:
            texts = json.loads(frame)
            sentences, layers = embedder.embed_with_layer(texts)
            body = np.ascontiguousarray(np.stack([sentences, layers]), dtype=np.float32).tobytes()
            answer = _HEADER.pack(_OK, len(texts), sentences.shape[1]) + body
        except Exception as exc:  # noqa: BLE001 - one bad call does not end the child
            answer = _error_frame(f"{type(exc).__name__}: {exc}")
        _write(stdout, answer)
    return 0


def _error_frame(message: str) -> bytes:
    encoded = message.encode()
    return _HEADER.pack(_ERROR, 0, len(encoded)) + encoded


def _read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(head)
    return stream.read(length)


def _write(stream: IO[bytes], data: bytes) -> None:
    stream.write(data)
    stream.flush()


if __name__ == "__main__":
    sys.exit(main())
