"""What an engine is given and what it streams back (the engines: `registry.serve.embedded`,
`registry.serve.vllm`; `registry.serve.gateway.make_engine` picks one by setting)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from registry.serve.routing import Target

__all__ = ["Done", "Engine", "Generation", "Piece", "Relayed", "Started"]


@dataclass(frozen=True)
class Generation:
    """One request for an engine: the target and the sampling. Exactly one of ``prompt``
    (text or token ids) and ``messages`` is set."""

    target: Target
    prompt: str | list[int] | None
    messages: list[dict[str, str]] | None
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    n: int
    stream: bool = False
    # The caller takes `Relayed` events in place of `Piece`s and `Done`s (the gateway's
    # streamed responses): an engine that already speaks OpenAI's chunk format may pass its
    # bytes through instead of having every chunk parsed and written again.
    relay: bool = False


@dataclass(frozen=True)
class Started:
    """Generation began: the prompt's length in tokens."""

    prompt_tokens: int


@dataclass(frozen=True)
class Piece:
    """New text of choice ``index``."""

    index: int
    text: str


@dataclass(frozen=True)
class Done:
    """Choice ``index`` ended (``stop``, ``length`` or ``cancelled``) after ``tokens`` tokens."""

    index: int
    finish_reason: str
    tokens: int


@dataclass(frozen=True)
class Relayed:
    """Whole server-sent events in OpenAI's chunk format (``data: {...}\n\n`` each), for the
    client as they are: ``model`` already reads as the client asked, no ``data: [DONE]``.
    ``response_id``: the ``id`` those chunks carry (the gateway's own first chunk uses it)."""

    data: bytes
    response_id: str


Event = Started | Piece | Done | Relayed


class Engine(Protocol):
    """Generates text for a `Generation`; failures are `registry.errors.BrickyardError`s
    (`ServiceUnavailable` when the engine is down, `InvalidInput` for requests it refuses)."""

    name: str

    def generate(self, generation: Generation) -> AsyncIterator[Event]:
        """Stream the events of one request; closing the iterator early cancels it."""
        ...

    async def forget(self, keys: Sequence[str]) -> None:
        """Drop the adapters named ``keys`` if loaded (a deleted brick): no request may be
        answered with them again. Best effort when the engine is down (it then holds nothing)."""
        ...

    async def aclose(self) -> None:
        """Stop the engine (its child or its HTTP client)."""
        ...

    def status(self) -> dict[str, Any]:
        """What the engine has loaded (for /v1/models and tests)."""
        ...
