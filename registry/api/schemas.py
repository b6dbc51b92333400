"""Response models of the REST API (request models live in `registry.inputs`, shared with
the CLI and the Python API)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from registry import domain
from registry.inputs import Name

__all__ = [
    "BaseModelDetail",
    "BaseModelOut",
    "BrickFileOut",
    "BrickOut",
    "CompositionFileOut",
    "CompositionOut",
    "EventOut",
    "MergeMethodOut",
    "Page",
    "SearchHitOut",
    "SearchOut",
    "TokenCreate",
    "TokenCreated",
    "TokenOut",
]

T = TypeVar("T")


class BrickOut(BaseModel):
    """A registered brick version."""

    name: str
    version: int
    base_model: str
    description: str
    examples: list[str]
    tags: list[str]
    sha256: str = Field(description="sha256 of adapter_model.safetensors")
    config_sha256: str = Field(description="sha256 of adapter_config.json")
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] = Field(description="leaf names of the adapted modules")
    module_count: int = Field(description="number of adapted modules")
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    size_bytes: int
    license: str | None
    metrics: dict[str, float]
    created_at: datetime
    updated_at: datetime
    created_by: str | None
    kind: Literal["lora", "emergent"] = Field("lora", description="lora (customized) or emergent (a neuron set)")
    emergent: dict[str, Any] | None = Field(
        None, description="emergent bricks: method, params, probe hashes, statistics, neurons, verification table"
    )
    quality: dict[str, Any] | None = Field(
        None, description="base vs brick on the registration's evals: loss, exact match, beats_base"
    )
    quality_status: str | None = Field(None, description="queued, running, done, failed; null without evals")

    @classmethod
    def of(cls, brick: domain.Brick) -> BrickOut:
        """From the domain object: every field of the same name (pydantic makes the lists and
        dicts), plus the module count; the fields are listed once, above."""
        fields = {name: getattr(brick, name) for name in cls.model_fields if name != "module_count"}
        return cls(**fields, module_count=len(brick.modules))


class BaseModelOut(BaseModel):
    """A registered base model (summary)."""

    name: str
    path: str
    description: str
    architecture: str
    dtype: str
    parameter_count: int
    size_bytes: int
    fingerprint: str
    linear_module_count: int
    aliases: list[str]
    created_at: datetime
    created_by: str | None

    @classmethod
    def of(cls, base: domain.BaseModel) -> BaseModelOut:
        """From the domain object."""
        return cls(
            name=base.name,
            path=base.path,
            description=base.description,
            architecture=base.architecture,
            dtype=base.dtype,
            parameter_count=base.parameter_count,
            size_bytes=base.size_bytes,
            fingerprint=base.fingerprint,
            linear_module_count=len(base.linear_modules),
            aliases=list(base.aliases),
            created_at=base.created_at,
            created_by=base.created_by,
        )


class LinearShapeOut(BaseModel):
    """Shape of a linear module."""

    out_features: int
    in_features: int
    fan_in_fan_out: bool


class BaseModelDetail(BaseModelOut):
    """A base model with the shape of every linear module."""

    linear_modules: dict[str, LinearShapeOut]

    @classmethod
    def of(cls, base: domain.BaseModel) -> BaseModelDetail:
        """From the domain object."""
        summary = BaseModelOut.of(base).model_dump()
        modules = {
            name: LinearShapeOut(
                out_features=s.out_features, in_features=s.in_features, fan_in_fan_out=s.fan_in_fan_out
            )
            for name, s in base.linear_modules.items()
        }
        return cls(**summary, linear_modules=modules)


class BrickFileOut(BaseModel):
    """A stored file of a brick."""

    filename: str
    sha256: str
    size_bytes: int
    media_type: str


class Page(BaseModel, Generic[T]):
    """A page of results; pass ``next_cursor`` as ``cursor`` for the next page."""

    items: list[T]
    next_cursor: str | None = None

    def __iter__(self) -> Iterator[T]:  # type: ignore[override]
        """The items (``for brick in client.list_bricks()``), not pydantic's (field, value) pairs."""
        return iter(self.items)

    def __len__(self) -> int:
        """How many items this page holds."""
        return len(self.items)


class SearchHitOut(BaseModel):
    """A ranked brick: why it matched and how well."""

    brick: BrickOut
    score: float = Field(description="ranking score (higher is better; comparable within one query)")
    matched: str = Field(description="'description' or 'example': which of the brick's texts matched best")
    text: str = Field(description="the matched text")
    similarity: float = Field(description="cosine similarity between the query and the matched text")


class SearchOut(BaseModel):
    """Search results, best first, at most one per brick version."""

    hits: list[SearchHitOut]


class CompositionOut(BaseModel):
    """A composition: its id (the recipe's hash), build status and recipe."""

    id: str
    status: str = Field(description="queued | running | ready | failed")
    progress: float = Field(description="0..1")
    message: str
    error: str | None
    error_code: str | None
    recipe: dict[str, Any]
    output: str
    method: str
    size_bytes: int | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    files_url: str
    archive_url: str
    names: list[str] = Field(default_factory=list, description="names pointing at this composition")

    @classmethod
    def of(cls, composition: domain.Composition) -> CompositionOut:
        """From the domain object."""
        base = f"/v1/compositions/{composition.id}"
        return cls(
            id=composition.id,
            status=composition.status,
            progress=composition.progress,
            message=composition.message,
            error=composition.error,
            error_code=composition.error_code,
            recipe=dict(composition.recipe),
            output=composition.output,
            method=composition.method,
            size_bytes=composition.size_bytes,
            attempts=composition.attempts,
            created_at=composition.created_at,
            started_at=composition.started_at,
            finished_at=composition.finished_at,
            files_url=f"{base}/files",
            archive_url=f"{base}/archive",
            names=list(composition.names),
        )


class CompositionFileOut(BaseModel):
    """A file of a composed model."""

    path: str
    size_bytes: int


class MergeMethodOut(BaseModel):
    """A merge method and its parameters (JSON schema with defaults and descriptions)."""

    name: str
    description: str
    params: dict[str, Any]


class TokenCreate(BaseModel):
    """A token to create."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    scope: Literal["read", "write", "admin"] = "write"


class TokenOut(BaseModel):
    """A token as listed (without its secret)."""

    name: str
    scope: str
    prefix: str = Field(description="the first characters of the token, to recognise it")
    created_at: datetime
    created_by: str | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, info: Any) -> TokenOut:
        """From a `registry.auth.TokenInfo`."""
        return cls(
            name=info.name,
            scope=info.scope,
            prefix=info.prefix,
            created_at=info.created_at,
            created_by=info.created_by,
            last_used_at=info.last_used_at,
            revoked_at=info.revoked_at,
        )


class TokenCreated(TokenOut):
    """A new token, with its secret (shown once)."""

    token: str


class EventOut(BaseModel):
    """An audit event."""

    at: datetime
    actor: str | None
    action: str
    subject: str
    details: dict[str, Any]

    @classmethod
    def of(cls, event: Any) -> EventOut:
        """From a `registry.db.events.Event`."""
        return cls(at=event.at, actor=event.actor, action=event.action, subject=event.subject, details=event.details)


class BrickAliasOut(BaseModel):
    """An alias of a brick version."""

    name: str
    alias: str
    version: int
    created_at: datetime
    created_by: str | None

    @classmethod
    def of(cls, alias: domain.BrickAlias) -> BrickAliasOut:
        """From the domain object."""
        return cls(
            name=alias.name,
            alias=alias.alias,
            version=alias.version,
            created_at=alias.created_at,
            created_by=alias.created_by,
        )


class BrickAliasIn(BaseModel):
    """Where an alias points: a version number or another alias."""

    model_config = ConfigDict(extra="forbid")

    version: int | str = Field(description="a version number, or an alias to copy")


class CompositionNameIn(BaseModel):
    """The composition a name points at."""

    model_config = ConfigDict(extra="forbid")

    composition: str = Field(min_length=1, max_length=100, description="a composition id or another name")
