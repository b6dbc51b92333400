"""Brickyard's LoRA resolver plugin for vLLM (entry point group ``vllm.general_plugins``).

vLLM calls `register` in every process it starts; importing this package does not import vLLM.
"""

from __future__ import annotations

__all__ = ["RESOLVER_NAME", "register"]

RESOLVER_NAME = "brickyard"


def register() -> None:
    """Register the Brickyard resolver with vLLM's `LoRAResolverRegistry` (configured from the environment)."""
    from vllm.lora.resolver import LoRAResolverRegistry

    from brickyard_vllm.resolver import resolver_from_environment

    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver_from_environment())
