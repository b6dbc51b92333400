"""Request bodies of the OpenAI routes, and Brickyard's own options on them.

Fields OpenAI defines that Brickyard does not act on (``user``, ``logprobs``, ...) are ignored,
as OpenAI-compatible servers do; Brickyard's options come in a ``brickyard`` object or as
top-level keys (what the ``openai`` client's ``extra_body`` sends).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "RoutingOptions", "SamplingRequest"]

_OPTION_KEYS = ("k", "min_score", "method", "bricks")


class RoutingOptions(BaseModel):
    """How ``auto`` picks and merges bricks."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(3, ge=1, le=16, description="at most this many bricks are composed")
    min_score: float | None = Field(
        None, allow_inf_nan=False, description="bricks scoring below this are not used (default serve.min_score)"
    )
    method: Annotated[str, Field(min_length=1, max_length=64)] = Field("linear", description="merge method")
    bricks: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, max_length=16, description="only these bricks (name or name@version) are candidates"
    )


class SamplingRequest(BaseModel):
    """What both routes share: the model, sampling, streaming, Brickyard's options."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=300)]
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(None)
    seed: int | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    brickyard: RoutingOptions = Field(default_factory=RoutingOptions)

    @model_validator(mode="before")
    @classmethod
    def _top_level_options(cls, data: Any) -> Any:
        """``extra_body={"k": 2}`` puts the option at the top level: fold it into ``brickyard``."""
        if isinstance(data, dict) and any(key in data for key in _OPTION_KEYS):
            data = dict(data)
            options = dict(data.get("brickyard") or {})
            for key in _OPTION_KEYS:
                if key in data:
                    options.setdefault(key, data.pop(key))
            data["brickyard"] = options
        return data

    @property
    def stops(self) -> list[str]:
        """The stop strings as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: a prompt (text, or token ids)."""

    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]

    @property
    def query(self) -> str | None:
        """What ``auto`` searches for: the prompt text."""
        return self.prompt if isinstance(self.prompt, str) else None


class ChatMessage(BaseModel):
    """One chat message (text content)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)

    @property
    def query(self) -> str | None:
        """What ``auto`` searches for: the last user message."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content
        return None
