"""The vLLM engine: forward generations to a vLLM OpenAI server started with ``--enable-lora``
and Brickyard's LoRA resolver plugin (``serving/vllm_plugin``).

The ``model`` sent is what the resolver accepts, already resolved here: ``name@version`` for a
brick (never a plain name: vLLM remembers a resolved name for as long as it runs, so a plain
name would keep its first version), a composition id, or vLLM's own served base name for the
base alone. A streamed request is streamed from vLLM, a whole one asked whole (vLLM's
streamed text of a token-id prompt starts with the prompt's text); either way vLLM's answer
becomes the same events as the embedded engine's, except that a gateway's stream
(``Generation.relay``) gets vLLM's chunks as bytes (`registry.serve.sse_relay`).
Chat requests go to vLLM's chat route when the base's tokenizer has a chat template, and as
the plain rendering of `registry.serve.chat` to its completions route otherwise (vLLM refuses
chat without a template). vLLM unreachable or failing: `ServiceUnavailable` (503, Retry-After).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from registry.errors import BrickyardError, RequestRefused, ServiceUnavailable
from registry.serve.chat import has_chat_template, render_plain_chat
from registry.serve.engine import Done, Event, Generation, Piece, Relayed, Started
from registry.serve.sse_relay import ChunkRelay

__all__ = ["VllmEngine"]

log = logging.getLogger("brickyard.serve")


class VllmEngine:
    """`registry.serve.engine.Engine` forwarding to vLLM over HTTP."""

    name = "vllm"

    def __init__(self, settings: Any, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``settings``: `registry.settings.ServeSettings` (``vllm_url``, ``timeout_s``)."""
        self.settings = settings
        self.url = settings.vllm_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(settings.timeout_s, connect=5.0), transport=transport
        )
        self._base_name: str | None = None

    async def _served_base(self) -> str:
        """vLLM's name of its base model (the model without a parent in its /v1/models)."""
        if self._base_name is None:
            response = await self._request("GET", "/v1/models")
            roots = [m["id"] for m in response.json().get("data", []) if not m.get("parent")]
            if not roots:
                raise ServiceUnavailable(f"vLLM at {self.url} serves no base model")
            self._base_name = str(roots[0])
        return self._base_name

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the vLLM server at {self.url} is not reachable: {exc}") from None
        if response.status_code >= 400:
            raise _vllm_error(response.status_code, response.text)
        return response

    async def generate(self, generation: Generation) -> AsyncIterator[Event]:
        """Stream a generation's events from vLLM."""
        target = generation.target
        model = target.adapter.key if target.adapter is not None else await self._served_base()
        # Only what differs from vLLM's defaults: the request is what a client asking vLLM
        # directly for the same thing would send.
        body: dict[str, Any] = {"model": model, "temperature": generation.temperature}
        if generation.max_tokens is not None:
            body["max_tokens"] = generation.max_tokens
        if generation.top_p != 1.0:
            body["top_p"] = generation.top_p
        if generation.n != 1:
            body["n"] = generation.n
        if generation.stream:
            body["stream"] = True
        if generation.seed is not None:
            body["seed"] = generation.seed
        if generation.stop:
            body["stop"] = generation.stop
        path = "/v1/completions"
        if generation.messages is not None:
            if has_chat_template(Path(target.base.path)):
                path, body["messages"] = "/v1/chat/completions", generation.messages
            else:
                body["prompt"] = render_plain_chat(generation.messages)
        else:
            body["prompt"] = generation.prompt
        # Relayed only when vLLM answers in the client's format: a chat rendered as a plain
        # prompt comes back as completion chunks, which become events the gateway writes.
        relay = generation.relay and (generation.messages is None or path == "/v1/chat/completions")
        if generation.stream and not relay:  # relayed chunks go out as they are: no usage chunk
            body["stream_options"] = {"include_usage": True}
        if not generation.stream:
            whole = (await self._request("POST", path, json=body)).json()
            yield Started(int((whole.get("usage") or {}).get("prompt_tokens") or 0))
            tokens = int((whole.get("usage") or {}).get("completion_tokens") or 0)
            for choice in whole.get("choices") or []:
                index = int(choice.get("index", 0))
                text = choice.get("text")
                if text is None:
                    text = (choice.get("message") or {}).get("content") or ""
                yield Piece(index, text)
                yield Done(index, str(choice.get("finish_reason") or "stop"), tokens // max(generation.n, 1))
            return
        counts = [0] * generation.n
        try:
            async with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    raise _vllm_error(response.status_code, (await response.aread()).decode(errors="replace"))
                if relay:
                    relayed = ChunkRelay(str(target.used.get("model") or model))
                    # Read to the end (past ``[DONE]``): a response left unread closes its
                    # connection, and the next request would pay for a new one.
                    async for received in response.aiter_raw():
                        events = relayed.feed(received)
                        if events:
                            yield Relayed(events, relayed.response_id or "")
                    return
                async for line in _event_lines(response):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue  # read to the end, as above: the connection goes back to the pool
                    chunk = json.loads(data)
                    usage = chunk.get("usage")
                    if usage:
                        yield Started(int(usage.get("prompt_tokens") or 0))
                    for choice in chunk.get("choices") or []:
                        index = int(choice.get("index", 0))
                        text = choice.get("text")
                        if text is None:
                            text = (choice.get("delta") or {}).get("content")
                        if text:
                            counts[index] += 1
                            yield Piece(index, text)
                        if choice.get("finish_reason"):
                            yield Done(index, str(choice["finish_reason"]), counts[index])
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the vLLM server at {self.url} is not reachable: {exc}") from None

    async def forget(self, keys: Sequence[str]) -> None:
        """Unload adapters from vLLM (``/v1/unload_lora_adapter``, mounted when vLLM runs with
        ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``).

        vLLM answers a name it has resolved once from its own table and never asks the resolver
        again, so a deleted brick requested directly from vLLM would still be answered; once
        unloaded, the next request asks the resolver, which finds nothing. 404: vLLM had not
        loaded it. vLLM unreachable: logged (a vLLM that is down holds no adapters once
        restarted, but one that merely did not answer keeps them: the log says which).
        """
        for key in keys:
            try:
                response = await self._http.post("/v1/unload_lora_adapter", json={"lora_name": key})
            except httpx.HTTPError as exc:
                log.warning("could not unload adapter %r from vLLM at %s: %s", key, self.url, exc)
                continue
            if response.status_code not in (200, 404):
                log.warning("vLLM at %s refused to unload adapter %r (%d): %s", self.url, key,
                            response.status_code, response.text[:300])  # fmt: skip

    def status(self) -> dict[str, Any]:
        """The engine's name and URL."""
        return {"engine": self.name, "url": self.url}

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._http.aclose()


async def _event_lines(response: httpx.Response) -> AsyncIterator[bytes]:
    """The lines of a server-sent event stream, cut at ``\n`` alone: httpx's ``aiter_lines``
    also cuts at U+2028, U+2029 and U+0085, which vLLM's JSON leaves unescaped inside text, and
    a chunk cut there is no JSON."""
    rest = b""
    async for data in response.aiter_bytes():
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r")
    if rest:
        yield rest


def _vllm_error(status: int, text: str) -> BrickyardError:
    try:
        message = str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = text[:500]
    if status == 404:
        # Only models the registry knows are sent, so vLLM not finding one means its resolver
        # could not fetch it (Brickyard unreachable from vLLM, a refused token, another base):
        # a server-side failure, not the client's request.
        return ServiceUnavailable(
            f"vLLM could not load the model: {message} (its Brickyard resolver found nothing; "
            "the vLLM server's log says why)"
        )
    if 400 <= status < 500:
        return RequestRefused(f"vLLM refused the request: {message}", extra={"engine_status": status})
    return ServiceUnavailable(f"the vLLM server failed ({status}): {message}")
