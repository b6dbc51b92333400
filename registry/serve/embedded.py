"""The embedded engine: a long-lived child process (`registry.serve.worker`) generating with
transformers + PEFT, driven over JSON lines.

The server never imports torch for serving: the child does, once, and keeps its models. A
reader thread routes the child's events to each waiting request's asyncio queue. The child
serves one request at a time in arrival order. If it dies, every waiting request fails with
`ServiceUnavailable` (503, ``Retry-After``) at once and the next request starts a new child; a
child silent for ``timeout_s`` is killed the same way, so no request hangs. A request whose
client went away sends ``cancel``: the child stops at its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, Any

from registry.errors import BrickyardError, RequestRefused, ServiceUnavailable
from registry.serve.engine import Done, Event, Generation, Piece, Started

__all__ = ["EmbeddedEngine", "engine_threads"]

log = logging.getLogger("brickyard.serve")

_CRASHED = {"event": "crashed"}


def engine_threads(configured: int | None) -> int:
    """The child's torch threads: ``configured``, else the cores less one.

    Why not every core: the server process works per token too (the event stream, the next
    request's search). Measured on 2 busy cores, a 2-layer Llama generated 4-7 tokens/s with 2
    torch threads and 100-120 with 1: torch's threads wait on each other spinning, and one
    descheduled thread stalls every step.
    """
    if configured is not None:
        return configured
    return max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) - 1)


class _Child:
    def __init__(self, log_path: Path, on_event: Any) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "registry.serve.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self._write_lock = threading.Lock()
        self._on_event = on_event
        self.reader = threading.Thread(target=self._read, name="serve-engine-reader", daemon=True)
        self.reader.start()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, message: dict[str, Any]) -> bool:
        stdin: IO[str] | None = self.process.stdin
        try:
            with self._write_lock:
                assert stdin is not None
                stdin.write(json.dumps(message) + "\n")
                stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self._on_event(self, json.loads(line))
            except ValueError:
                log.warning("serve engine wrote a line that is not JSON: %r", line[:200])
        self.process.wait()
        for stream in (self.process.stdout, self.process.stdin):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
        log.warning("the embedded serve engine (pid %d) exited with %s", self.process.pid, self.process.returncode)
        self._on_event(self, _CRASHED)
        self._log.close()

    def kill(self) -> None:
        if self.alive:
            self.process.kill()


class EmbeddedEngine:
    """`registry.serve.engine.Engine` on transformers + PEFT in a child process."""

    name = "embedded"

    def __init__(self, settings: Any, *, log_path: Path) -> None:
        """``settings``: `registry.settings.ServeSettings`; the child's stderr goes to ``log_path``."""
        self.settings = settings
        self.log_path = log_path
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._next_id = 0
        self._waiting: dict[int, tuple[_Child, asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]]]] = {}
        self.cancelled = 0  # requests stopped early because their client went away
        self._closed = False

    @property
    def pending(self) -> int:
        """Requests sent to the child and not finished."""
        with self._lock:
            return len(self._waiting)

    @property
    def pid(self) -> int | None:
        """The child's process id (None before the first request)."""
        child = self._child
        return child.process.pid if child is not None and child.alive else None

    def _ensure_child(self) -> _Child:
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("the serving engine is shut down")
            if self._child is None or not self._child.alive:
                self._child = _Child(self.log_path, self._dispatch)
                self._child.send(
                    {
                        "op": "config",
                        "id": 0,
                        "max_loaded_adapters": self.settings.max_loaded_adapters,
                        "threads": engine_threads(self.settings.threads),
                    }
                )
            return self._child

    def _dispatch(self, child: _Child, event: dict[str, Any]) -> None:
        with self._lock:
            if event is _CRASHED:
                targets = [(rid, w) for rid, w in self._waiting.items() if w[0] is child]
            else:
                found = self._waiting.get(int(event.get("id", -1)))
                targets = [(int(event["id"]), found)] if found is not None else []
        for _, (_, loop, queue) in targets:
            with contextlib.suppress(RuntimeError):  # the request's loop is gone
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def _register(self) -> tuple[int, _Child, asyncio.Queue[dict[str, Any]]]:
        child = self._ensure_child()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            self._waiting[rid] = (child, asyncio.get_running_loop(), queue)
        return rid, child, queue

    async def _next(self, child: _Child, queue: asyncio.Queue[dict[str, Any]]) -> dict[str, Any]:
        try:
            event = await asyncio.wait_for(queue.get(), self.settings.timeout_s)
        except TimeoutError:
            child.kill()  # the reader thread then fails every other waiting request
            raise ServiceUnavailable(
                f"the embedded engine did not answer in {self.settings.timeout_s:g} s; it is restarting"
            ) from None
        if event is _CRASHED or event.get("event") == "crashed":
            raise ServiceUnavailable("the embedded engine stopped; it is restarting, try again")
        return event

    async def generate(self, generation: Generation) -> AsyncIterator[Event]:
        """Stream a generation's events (see `registry.serve.engine`)."""
        target = generation.target
        rid, child, queue = self._register()
        request = {
            "op": "generate",
            "id": rid,
            "base": str(target.base.path),
            "adapter_key": target.adapter.key if target.adapter else None,
            "adapter": str(target.adapter.path) if target.adapter else None,
            "prompt": generation.prompt,
            "messages": generation.messages,
            "max_tokens": generation.max_tokens,
            "temperature": generation.temperature,
            "top_p": generation.top_p,
            "seed": generation.seed,
            "stop": generation.stop,
            "n": generation.n,
            "stream": generation.stream,
        }
        finished = 0
        try:
            if not child.send(request):
                raise ServiceUnavailable("the embedded engine stopped; it is restarting, try again")
            while finished < generation.n:
                event = await self._next(child, queue)
                kind = event["event"]
                if kind == "start":
                    yield Started(int(event["prompt_tokens"]))
                elif kind == "token":
                    yield Piece(int(event["index"]), str(event["text"]))
                elif kind == "done":
                    finished += 1
                    yield Done(int(event["index"]), str(event["finish_reason"]), int(event["tokens"]))
                    if event["finish_reason"] == "cancelled":
                        return
                elif kind == "error":
                    raise _engine_error(event)
        finally:
            if finished < generation.n and child.alive:
                self.cancelled += 1
                child.send({"op": "cancel", "id": rid})
            with self._lock:
                self._waiting.pop(rid, None)

    async def forget(self, keys: Sequence[str]) -> None:
        """Unload adapters from the child (queued behind the generations before it); nothing
        to do when no child runs."""
        child = self._child
        if child is not None and child.alive:
            child.send({"op": "forget", "id": 0, "keys": list(keys)})

    async def child_status(self) -> dict[str, Any]:
        """The child's state: ``bases`` (base path -> adapter keys loaded), ``pid``, and
        ``cancelled`` (the last generations stopped by a cancel: id and tokens made). Empty
        when no child runs."""
        if self._child is None or not self._child.alive:
            return {}
        rid, child, queue = self._register()
        try:
            child.send({"op": "status", "id": rid})
            return await self._next(child, queue)
        finally:
            with self._lock:
                self._waiting.pop(rid, None)

    def status(self) -> dict[str, Any]:
        """The engine's name and child pid."""
        return {"engine": self.name, "pid": self.pid, "cancelled": self.cancelled}

    async def aclose(self) -> None:
        """Stop the child (it exits on end of input; killed if it does not within 5 s)."""
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
        if child is not None and child.alive:
            try:
                assert child.process.stdin is not None
                child.process.stdin.close()
                await asyncio.to_thread(child.process.wait, 5)
            except (OSError, subprocess.TimeoutExpired):
                child.kill()
        if child is not None:
            await asyncio.to_thread(child.reader.join, 10)


def _engine_error(event: dict[str, Any]) -> BrickyardError:
    message = str(event.get("message", "the engine failed"))
    if int(event.get("status", 500)) < 500:
        return RequestRefused(message, extra={"openai_code": event.get("code"), "param": event.get("param")})
    return ServiceUnavailable(f"the embedded engine failed: {message}")
