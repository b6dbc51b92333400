"""The Hugging Face model card of an adapter directory (``README.md``): its YAML front
matter (``license``, ``tags``, ``base_model``, ``description``) and first paragraph, as
defaults for ``brickyard brick push`` so an adapter downloaded from the Hub needs no
``--description``. Pure parsing: the caller reads the file."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["card_metadata"]

_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)(.*)\Z", re.S)
_TAG = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,63}$")  # registry.inputs.TAG_PATTERN
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # registry.inputs.NAME_PATTERN
_TEMPLATE = "[More Information Needed]"  # the unfilled model card template (peft's save_pretrained)


def card_metadata(text: str) -> tuple[dict[str, Any], list[str]]:
    """Brick metadata a model card provides, and notes on what was left out.

    Returns:
        ({"description"?, "tags"?, "license"?, "base_model"?}, notes). The description is the
        front matter's ``description`` or else the first plain paragraph before the first
        ``##`` section (none from an unfilled template); tags are lower-cased, invalid ones
        skipped; ``base_model`` only when it can be a registered name (not a path or repo id).
    """
    import yaml

    found: dict[str, Any] = {}
    notes: list[str] = []
    match = _FRONT.match(text)
    front: Any = {}
    body = text
    if match:
        try:
            front = yaml.safe_load(match.group(1)) or {}
        except yaml.YAMLError:
            notes.append("README.md: the front matter is not valid YAML; ignored")
            front = {}
        body = match.group(2)
    if not isinstance(front, dict):
        front = {}
    description = front.get("description")
    if not isinstance(description, str) or not description.strip():
        description = _first_paragraph(body)
    if description:
        found["description"] = " ".join(description.split())[:4000]
    tags = front.get("tags")
    if isinstance(tags, str):
        tags = [tags]
    if isinstance(tags, list):
        tags = [str(t) for t in tags if not str(t).startswith("base_model:")]  # the Hub's own bookkeeping
        kept = [t.strip().lower() for t in tags if _TAG.match(t.strip().lower())]
        skipped = [t for t in tags if not _TAG.match(t.strip().lower())]
        if kept:
            found["tags"] = list(dict.fromkeys(kept))
        if skipped:
            notes.append(f"README.md: skipped tags that are not valid tags: {', '.join(skipped)}")
    license_id = front.get("license")
    if isinstance(license_id, str) and license_id.strip():
        found["license"] = license_id.strip()[:100]
    base = front.get("base_model")
    if isinstance(base, list) and len(base) == 1:
        base = base[0]
    if isinstance(base, str) and base.strip():
        if _NAME.match(base.strip()):
            found["base_model"] = base.strip()
        else:  # a Hub repo id or a local path: not a name base models are registered under
            notes.append(f"README.md: base_model {base.strip()[:200]!r} is not a registered name; pass --base")
    return found, notes


def _first_paragraph(body: str) -> str:
    """The summary paragraph: before the first section (``## ...``) of a filled-in card."""
    if _TEMPLATE in body:
        return ""
    body = re.sub(r"<!--.*?-->", "", body, flags=re.S)
    body = re.split(r"^##\s", body, maxsplit=1, flags=re.M)[0]
    for block in re.split(r"\n\s*\n", body):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or lines[0].startswith(("#", "|", "```", "<", "![", "---", "- ", "* ", "+ ", ">")):
            continue
        return " ".join(lines)
    return ""
