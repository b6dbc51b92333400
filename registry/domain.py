"""Domain objects: what the stores return and the service, API and CLI speak in.

Frozen dataclasses, free of ORM and HTTP concerns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

__all__ = [
    "BaseModel",
    "BaseModelDraft",
    "Brick",
    "BrickDraft",
    "BrickFile",
    "BrickPatch",
    "Composition",
    "LinearShape",
    "Page",
    "SearchHit",
    "SearchResult",
]

T = TypeVar("T")


@dataclass(frozen=True)
class LinearShape:
    """Shape of one linear module of a base model (``out x in``; Conv1D stores ``in x out``)."""

    out_features: int
    in_features: int
    fan_in_fan_out: bool = False


@dataclass(frozen=True)
class BaseModel:
    """A registered base model: what was read from its config and safetensors headers."""

    name: str
    path: str
    description: str
    architecture: str
    dtype: str
    parameter_count: int
    size_bytes: int
    fingerprint: str
    linear_modules: Mapping[str, LinearShape]
    config: Mapping[str, object]
    aliases: tuple[str, ...]
    created_at: datetime
    created_by: str | None = None


@dataclass(frozen=True)
class Brick:
    """One version of a registered LoRA brick."""

    name: str
    version: int
    base_model: str
    description: str
    examples: tuple[str, ...]
    tags: tuple[str, ...]
    sha256: str
    config_sha256: str
    size_bytes: int
    config_size_bytes: int
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    modules: tuple[str, ...]
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    license: str | None
    metrics: Mapping[str, float]
    created_at: datetime
    updated_at: datetime
    created_by: str | None = None
    kind: str = "lora"
    emergent: Mapping[str, object] | None = None
    """An emergent brick's provenance (`registry.emergent.bricks`); None for a LoRA."""
    # The quality check: base vs brick on the registration's evals (see registry.builds.quality).
    quality: Mapping[str, object] | None = None
    quality_status: str | None = None

    @property
    def ref(self) -> str:
        """``name@version``, the label used in messages and recipes."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class BrickFile:
    """A stored file of a brick: its public name and the blob holding its bytes."""

    filename: str
    sha256: str
    size_bytes: int
    media_type: str


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; ``next_cursor`` is None on the last page."""

    items: list[T] = field(default_factory=list)
    next_cursor: str | None = None


@dataclass(frozen=True)
class BaseModelDraft:
    """Everything needed to record a base model (what the inspector read)."""

    name: str
    path: str
    description: str
    architecture: str
    dtype: str
    parameter_count: int
    size_bytes: int
    fingerprint: str
    linear_modules: Mapping[str, LinearShape]
    config: Mapping[str, object]
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class BrickDraft:
    """A validated brick about to be stored (its blobs are already in the blob store)."""

    name: str
    base_model: str
    description: str
    examples: tuple[str, ...]
    tags: tuple[str, ...]
    sha256: str
    config_sha256: str
    size_bytes: int
    config_size_bytes: int
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    modules: tuple[str, ...]
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    license: str | None
    metrics: Mapping[str, float]
    version: int | None = None
    kind: str = "lora"
    emergent: Mapping[str, object] | None = None
    evals: tuple[tuple[str, str], ...] = ()
    eval_prompt: str = "{input}"


@dataclass(frozen=True)
class BrickPatch:
    """Fields a PATCH may change; None leaves a field as it is."""

    description: str | None = None
    examples: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Composition:
    """A requested composed model. ``id`` is the sha256 of its canonical recipe."""

    id: str
    status: str
    progress: float
    message: str
    recipe: Mapping[str, object]
    output: str
    method: str
    error: str | None
    error_code: str | None
    size_bytes: int | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    requested_by: str | None = None
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchHit:
    """One search result: the brick, its ranking score, and what matched (and how well)."""

    brick: Brick
    score: float
    matched: str
    text: str
    similarity: float


@dataclass(frozen=True)
class SearchResult:
    """Hits, best first, and where the time went (milliseconds per stage)."""

    hits: list[SearchHit]
    timings_ms: dict[str, float]


@dataclass(frozen=True)
class BrickAlias:
    """An alias of a brick version (``sentiment@production`` -> ``sentiment@3``)."""

    name: str
    alias: str
    version: int
    created_at: datetime
    created_by: str | None = None
