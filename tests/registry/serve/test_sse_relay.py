"""`registry.serve.sse_relay.ChunkRelay`: whole events out of any split of the byte stream,
``model`` renamed (and nothing else touched), ``[DONE]`` dropped."""

from __future__ import annotations

import json
from typing import Any

from registry.serve.sse_relay import ChunkRelay


def _event(chunk: dict[str, Any], *, compact: bool = True) -> bytes:
    separators = (",", ":") if compact else (", ", ": ")
    return b"data: " + json.dumps(chunk, separators=separators, ensure_ascii=False).encode() + b"\n\n"


def _chunks(model: str, texts: list[str]) -> list[dict[str, Any]]:
    return [
        {"id": "cmpl-7", "object": "text_completion", "created": 1, "model": model,
         "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}
        for text in texts
    ]  # fmt: skip


def _relay_in_pieces(relay: ChunkRelay, stream: bytes, size: int) -> bytes:
    out = b""
    for start in range(0, len(stream), size):
        out += relay.feed(stream[start : start + size])
    return out


def _parsed(events: bytes) -> list[dict[str, Any]]:
    assert events.endswith(b"\n\n") and b"[DONE]" not in events
    return [json.loads(line[6:]) for line in events.split(b"\n\n") if line]


def test_any_split_gives_the_same_events_with_the_clients_model() -> None:
    # Text that spells the member it must not be mistaken for, and a non-ASCII model name.
    texts = ["Hello", ' "model":"french@1" ', "é\n\n", ""]
    upstream = _chunks("french@1", texts)
    stream = b"".join(_event(c) for c in upstream) + b"data: [DONE]\n\n"
    expected = [{**c, "model": "auto:bäse"} for c in upstream]
    for size in (1, 2, 7, 64, len(stream)):
        relay = ChunkRelay("auto:bäse")
        out = _relay_in_pieces(relay, stream, size)
        assert _parsed(out) == expected, size
        assert relay.done and relay.response_id == "cmpl-7"
        assert relay.feed(b"data: {}\n\n") == b""  # nothing after [DONE]


def test_the_same_model_passes_the_bytes_unchanged() -> None:
    stream = b"".join(_event(c) for c in _chunks("sql@1", ["a", "b"]))
    relay = ChunkRelay("sql@1")
    assert relay.feed(stream + b"data: [DONE]\n\n") == stream and relay.done


def test_spaced_json_is_rewritten_chunk_by_chunk() -> None:
    upstream = _chunks("french@1", ["x", "y"])
    stream = b"".join(_event(c, compact=False) for c in upstream)
    relay = ChunkRelay("french")
    assert _parsed(relay.feed(stream)) == [{**c, "model": "french"} for c in upstream]
    assert not relay.done


def test_an_error_event_passes_through() -> None:
    error = {"error": {"message": "boom", "type": "BadRequestError", "code": 400}}
    relay = ChunkRelay("french")
    assert _parsed(relay.feed(_event(error) + b"data: [DONE]\n\n")) == [error]
    assert relay.done and relay.response_id is None
