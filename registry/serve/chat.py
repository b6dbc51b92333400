"""Chat messages to a prompt when the base model's tokenizer has no chat template (pure).

Both engines use this one rendering, so a chat request gives the same tokens embedded and on
vLLM: ``"<role>: <content>\\n"`` per message, then ``"assistant:"``. A tokenizer with a
``chat_template`` uses its template instead (transformers' ``apply_chat_template``, vLLM's
chat route).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["has_chat_template", "render_plain_chat"]


def render_plain_chat(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt for ``messages`` without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def has_chat_template(model_dir: Path) -> bool:
    """Whether the model directory's tokenizer declares a chat template."""
    if (model_dir / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))
