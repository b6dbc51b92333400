"""The ``model`` grammar of the OpenAI routes (pure; no I/O).

=====================  ===================================================================
``model``              meaning
=====================  ===================================================================
``<base>``             the registered base model alone
``<brick>``            the latest version of a brick (on its own base model)
``<brick>@<version>``  that version of a brick
``<64 hex digits>``    a built composition (``output: adapter``) by its id
``auto``               the prompt picks the bricks: searched among the (single) base's bricks
``auto:<base>``        the same among the bricks of ``<base>``
=====================  ===================================================================

A plain name is a base model when one of that name is registered, a brick otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from registry.errors import InvalidInput

__all__ = ["ModelRef", "parse_model"]

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_COMPOSITION = re.compile(r"[0-9a-f]{64}")
_VERSIONED = re.compile(rf"({_NAME})@([1-9][0-9]{{0,9}})")
_PLAIN = re.compile(_NAME)
_AUTO = re.compile(rf"auto(?::({_NAME}))?")

Kind = Literal["name", "brick", "composition", "auto"]


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``model``: ``kind`` ``name`` (a base or brick, decided by the catalog),
    ``brick`` (with ``version``), ``composition`` (``name`` is the id) or ``auto`` (``name`` is
    the base, or None for the only one)."""

    kind: Kind
    name: str | None
    version: int | None = None


def parse_model(model: str) -> ModelRef:
    """Parse an OpenAI ``model`` field.

    Raises:
        InvalidInput: not in the grammar (the message lists the accepted forms).
    """
    if (auto := _AUTO.fullmatch(model)) is not None:
        return ModelRef("auto", auto.group(1))
    if _COMPOSITION.fullmatch(model):
        return ModelRef("composition", model)
    if (versioned := _VERSIONED.fullmatch(model)) is not None:
        return ModelRef("brick", versioned.group(1), int(versioned.group(2)))
    if _PLAIN.fullmatch(model):
        return ModelRef("name", model)
    raise InvalidInput(
        f"model {model[:200]!r} is not a model reference",
        errors=["model: give <base>, <brick>, <brick>@<version>, a composition id, auto or auto:<base>"],
    )
