"""What a vLLM ``model`` string names in Brickyard, and the stable id of an adapter.

Pure functions: no I/O, no vLLM.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["BrickRef", "CompositionRef", "Reference", "adapter_key", "lora_int_id", "parse_reference"]

# The registry's own grammar (registry.inputs.NAME_PATTERN, VersionPath): a string outside it
# can never name a brick, so it is refused without asking the server.
_BRICK = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,99})(?:@(?P<version>[1-9][0-9]{0,9}))?$")
_COMPOSITION = re.compile(r"^[0-9a-f]{64}$")
_MAX_VERSION = 2**31 - 1


@dataclass(frozen=True)
class BrickRef:
    """A brick by name, at one version or (``version=None``) its latest."""

    name: str
    version: int | None = None


@dataclass(frozen=True)
class CompositionRef:
    """A built composition by id (the sha256 of its recipe)."""

    id: str


Reference = BrickRef | CompositionRef


def parse_reference(text: str) -> Reference | None:
    """Parse ``name``, ``name@version`` or a composition id (64 lowercase hex).

    A 64-hex string is always a composition id, never a brick name. Returns None for
    anything else (vLLM then answers "model not found").
    """
    if _COMPOSITION.match(text):
        return CompositionRef(text)
    match = _BRICK.match(text)
    if match is None:
        return None
    version = match.group("version")
    if version is None:
        return BrickRef(match.group("name"))
    if int(version) > _MAX_VERSION:
        return None
    return BrickRef(match.group("name"), int(version))


def adapter_key(files: Iterable[tuple[str, str]]) -> str:
    """The cache key of an adapter: sha256 over its (file name, content digest) pairs, sorted.

    Independent of listing order; changes when any file's content or name changes.
    """
    canonical = "\n".join(f"{name}\0{digest}" for name, digest in sorted(files))
    return hashlib.sha256(canonical.encode()).hexdigest()


def lora_int_id(key: str) -> int:
    """vLLM's ``lora_int_id`` for an adapter key: positive, below 2**31, the same in every process.

    vLLM tells adapters apart by this id (its own resolver uses ``abs(hash(name))``, which
    changes with PYTHONHASHSEED); deriving it from content makes equal adapters share a slot.
    """
    return int(key[:8], 16) % (2**31 - 1) + 1
