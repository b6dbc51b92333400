"""Pass an upstream OpenAI server's streamed chunks (server-sent events) to the client as bytes.

Parsing every chunk's JSON and writing it again costs the gateway about as much CPU per token
as the rest of a request's handling (profiled with 8 streaming clients on vLLM), and on a
machine the engine saturates that CPU comes out of the engine's share. The chunks already
have OpenAI's format; only ``model`` differs (the upstream names the adapter it loaded, the
client asked for e.g. ``auto``). So the relay cuts the byte stream into whole events and
replaces the one ``"model":"<upstream>"`` member by the client's with a bytes replace, after
checking on the first event that this is how the upstream writes it (compact JSON, as vLLM's
pydantic does). If it is not, each event is parsed and written again: slower, same output.

The replace cannot touch text: inside a JSON string every quote is escaped, so
``"model":"x"`` (quote, colon, quote unescaped) only occurs as a member.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["ChunkRelay"]

_EVENT_END = b"\n\n"
_DONE = b"data: [DONE]"


class ChunkRelay:
    """Cuts an SSE byte stream into whole events, with ``model`` renamed to ``model``.

    Args:
        model: the model name the client asked for, written into every chunk.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self.response_id: str | None = None  # the first chunk's ``id``
        self.done = False  # ``data: [DONE]`` was seen (it is not relayed)
        self._buffer = b""
        self._rewrite: Callable[[bytes], bytes] | None = None

    def feed(self, data: bytes) -> bytes:
        """The events that ``data`` completes, ready for the client (``b""`` when none is).

        Bytes after the last complete event wait for the next ``feed``; everything from
        ``data: [DONE]`` on is dropped and sets `done`.
        """
        if self.done:
            return b""
        buffer = self._buffer + data
        cut = buffer.rfind(_EVENT_END)
        if cut < 0:
            self._buffer = buffer
            return b""
        block, self._buffer = buffer[: cut + 2], buffer[cut + 2 :]
        end = block.find(_DONE)
        if end >= 0:
            block, self.done = block[:end], True
        if not block:
            return b""
        if self._rewrite is None:
            self._rewrite = self._rewriter(block)
        return self._rewrite(block)

    def _rewriter(self, block: bytes) -> Callable[[bytes], bytes]:
        """How to rename ``model`` in this stream, decided on its first event."""
        first = _first_chunk(block)
        if first is None or not isinstance(first.get("model"), str):
            return self._reserialise  # an error event first, or not JSON: the general way
        if isinstance(first.get("id"), str):
            self.response_id = first["id"]
        upstream = first["model"]
        if upstream == self.model:
            return _unchanged
        needle = b'"model":' + json.dumps(upstream, ensure_ascii=False).encode()
        if needle not in block:
            return self._reserialise  # spaced or escaped differently than we would write it
        replacement = b'"model":' + json.dumps(self.model, ensure_ascii=False).encode()
        return lambda events: events.replace(needle, replacement)

    def _reserialise(self, block: bytes) -> bytes:
        out = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                try:
                    chunk = json.loads(line[5:])
                except ValueError:
                    chunk = None
                if isinstance(chunk, dict) and "model" in chunk:
                    chunk["model"] = self.model
                    line = b"data: " + json.dumps(chunk, ensure_ascii=False).encode()
            out.append(line)
        return b"\n".join(out)


def _first_chunk(block: bytes) -> dict[str, Any] | None:
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                chunk = json.loads(line[5:])
            except ValueError:
                return None
            return chunk if isinstance(chunk, dict) else None
    return None


def _unchanged(block: bytes) -> bytes:
    return block
