"""Recipe files for ``brickyard compose --recipe``: a composition request written as YAML or
JSON (what mergekit users keep in a file), or the ``brickyard.json`` of a composed model,
to build the same recipe again.

A request file holds the fields of `registry.inputs.ComposeRequest`::

    base_model: tiny-llama
    method: ties
    params: {density: 0.5}
    output: adapter
    bricks:
      - {name: sentiment, version: production, weight: 0.7}
      - summarize          # a bare name: the latest version, weight 1
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from registry.errors import InvalidInput

__all__ = ["RecipeFile", "load_recipe_file", "request_from_document"]


class RecipeFile:
    """A compose request read from a file, and the composition id it was built as (for a
    ``brickyard.json``: re-running should give the same id unless something changed)."""

    def __init__(self, request: dict[str, Any], expected_id: str | None) -> None:
        self.request = request
        self.expected_id = expected_id


def load_recipe_file(path: Path) -> RecipeFile:
    """Read ``path`` (``.yaml``/``.yml`` or JSON; a directory means its ``brickyard.json``).

    Raises:
        InvalidInput: unreadable, not a mapping, or not a recipe.
    """
    if path.is_dir():
        path = path / "brickyard.json"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read the recipe file {str(path)[:200]}", errors=[str(exc)]) from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidInput(f"{path.name} is not valid YAML", errors=[" ".join(str(exc).split())]) from None
    else:
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise InvalidInput(f"{path.name} is not valid JSON", errors=[str(exc)]) from None
    return request_from_document(document, source=path.name)


def request_from_document(document: Any, *, source: str = "recipe") -> RecipeFile:
    """The compose request a parsed document describes (see the module docstring)."""
    if not isinstance(document, dict):
        raise InvalidInput(f"{source}: a recipe is a mapping of fields", errors=["start with base_model: ..."])
    if isinstance(document.get("recipe"), dict) and "composer" in document:  # a brickyard.json
        recipe = document["recipe"]
        request = {
            "base_model": recipe["base_model"]["name"] if isinstance(recipe.get("base_model"), dict) else None,
            "bricks": [
                {"name": b["name"], "version": b["version"], "weight": b["weight"]} for b in recipe.get("bricks", [])
            ],
            "method": recipe.get("method"),
            "params": recipe.get("params") or {},
            "output": recipe.get("output"),
        }
        if recipe.get("rank") is not None:
            request["rank"] = recipe["rank"]
        return RecipeFile({k: v for k, v in request.items() if v is not None}, recipe.get("id"))
    request = dict(document)
    bricks = request.get("bricks")
    if isinstance(bricks, list):
        request["bricks"] = [{"name": b} if isinstance(b, str) else b for b in bricks]
    return RecipeFile(request, None)
