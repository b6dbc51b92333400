"""The vLLM side: a `LoRAResolver` over `AdapterSource`. Imports vLLM (only inside its server)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from brickyard_vllm.fetch import AdapterRefused, AdapterSource
from brickyard_vllm.refs import lora_int_id, parse_reference

__all__ = ["BrickyardResolver", "resolver_from_environment"]

# Under "vllm.": vLLM configures handlers for its own logger tree only, so a logger outside it
# would print nothing in the server's log.
log = init_logger("vllm.brickyard")


class BrickyardResolver(LoRAResolver):  # type: ignore[misc]  # vLLM is not installed where mypy runs
    """Resolves an unknown ``model`` (brick reference or composition id) from a Brickyard server."""

    def __init__(self, source: AdapterSource) -> None:
        """Serve adapters from ``source``."""
        self.source = source

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """vLLM's hook: a `LoRARequest` for ``lora_name`` on ``base_model_name``, or None (vLLM: not found).

        Downloads run in a thread: this is called on the API server's event loop.
        """
        ref = parse_reference(lora_name)
        if ref is None:
            return None
        try:
            adapter = await asyncio.to_thread(self.source.fetch, base_model_name, ref)
        except AdapterRefused as exc:
            log.warning("Brickyard adapter %r refused: %s", lora_name, exc)
            return None
        except httpx.HTTPError as exc:
            log.error("Brickyard adapter %r: cannot reach the server: %s", lora_name, exc)
            return None
        if adapter is None:
            log.info("Brickyard adapter %r: no such brick or composition", lora_name)
            return None
        log.info("Brickyard adapter %r resolved to %s in %s", lora_name, adapter.label, adapter.path)
        return LoRARequest(lora_name=lora_name, lora_int_id=lora_int_id(adapter.key), lora_path=str(adapter.path))


def resolver_from_environment() -> BrickyardResolver:
    """A resolver configured by ``BRICKYARD_URL``, ``BRICKYARD_TOKEN`` and ``BRICKYARD_VLLM_CACHE``."""
    url = os.environ.get("BRICKYARD_URL", "http://127.0.0.1:8000")
    token = os.environ.get("BRICKYARD_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    cache = os.environ.get("BRICKYARD_VLLM_CACHE") or str(Path.home() / ".cache" / "brickyard" / "vllm-adapters")
    http = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(60.0, connect=5.0))
    return BrickyardResolver(AdapterSource(http, Path(cache)))
