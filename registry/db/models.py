"""SQLAlchemy 2 typed tables. The schema itself is owned by Alembic (``migrations/``);
a test checks these models and the migrations do not drift."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship
from sqlalchemy.types import TypeEngine

from registry import domain
from registry.db.names import folded_default

__all__ = [
    "ApiTokenRow",
    "Base",
    "BaseModelRow",
    "BrickLexicalRow",
    "BrickNameRow",
    "BrickRow",
    "BrickTagRow",
    "BrickVectorRow",
    "CompositionRow",
    "Embedding",
    "EventRow",
    "IndexStateRow",
    "RetrievalStatsRow",
    "as_utc",
    "utcnow",
]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware now, in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` as a timezone-aware UTC datetime: SQLite returns naive datetimes, and every
    stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention (stable migration names)."""

    metadata = MetaData(naming_convention=NAMING)


class BaseModelRow(Base):
    """A registered base model."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # registry.db.names: unique case-insensitively (migration 0012).
    name_folded: Mapped[str] = mapped_column(String(100), unique=True, default=folded_default("name"))
    path: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    architecture: Mapped[str] = mapped_column(String(200))
    dtype: Mapped[str] = mapped_column(String(16))
    parameter_count: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    linear_modules: Mapped[dict[str, Any]] = mapped_column(JSON)
    aliases: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(100))

    @classmethod
    def from_draft(cls, draft: domain.BaseModelDraft, *, created_by: str | None) -> BaseModelRow:
        """The row for a new base model (the inverse of `to_domain`)."""
        return cls(
            name=draft.name,
            path=draft.path,
            description=draft.description,
            architecture=draft.architecture,
            dtype=draft.dtype,
            parameter_count=draft.parameter_count,
            size_bytes=draft.size_bytes,
            fingerprint=draft.fingerprint,
            config=dict(draft.config),
            linear_modules={
                k: [v.out_features, v.in_features, v.fan_in_fan_out] for k, v in draft.linear_modules.items()
            },
            aliases=list(draft.aliases),
            created_by=created_by,
        )

    def to_domain(self) -> domain.BaseModel:
        """The domain object for this row."""
        return domain.BaseModel(
            name=self.name,
            path=self.path,
            description=self.description,
            architecture=self.architecture,
            dtype=self.dtype,
            parameter_count=self.parameter_count,
            size_bytes=self.size_bytes,
            fingerprint=self.fingerprint,
            linear_modules={k: domain.LinearShape(*v) for k, v in self.linear_modules.items()},
            config=self.config,
            aliases=tuple(self.aliases),
            created_at=as_utc(self.created_at),
            created_by=self.created_by,
        )


class BrickNameRow(Base):
    """One row per brick name: hands out version numbers, never reusing a deleted one."""

    __tablename__ = "brick_names"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    name_folded: Mapped[str] = mapped_column(String(100), unique=True, default=folded_default("name"))
    # 64-bit: an explicit version may be as large as 2^63 - 1 (int4 on PostgreSQL before 0006).
    last_version: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BrickRow(Base):
    """One version of a brick. Bytes live in the blob store under ``sha256``/``config_sha256``."""

    __tablename__ = "bricks"
    # A brick is its config and weights together: the same weights with another config
    # (a corrected lora_alpha, rsLoRA on) are another brick.
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_bricks_name_version"),
        UniqueConstraint("sha256", "config_sha256", name="uq_bricks_sha256_config"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), ForeignKey("brick_names.name"), index=True)
    version: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"), index=True)
    description: Mapped[str] = mapped_column(Text)
    examples: Mapped[list[Any]] = mapped_column(JSON)
    license: Mapped[str | None] = mapped_column(String(100))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    config_sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    config_size_bytes: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    lora_alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(Boolean)
    target_modules: Mapped[list[Any]] = mapped_column(JSON)
    modules: Mapped[list[Any]] = mapped_column(JSON)
    rank_pattern: Mapped[dict[str, Any]] = mapped_column(JSON)
    alpha_pattern: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(100))
    is_latest: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False, index=True)
    # "lora" (customized) or "emergent" (a neuron set; `emergent` holds its provenance).
    kind: Mapped[str] = mapped_column(String(16), server_default="lora", default="lora", index=True)
    emergent: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The quality check (migration 0011): eval pairs, and what a worker measured on them.
    evals: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    eval_prompt: Mapped[str | None] = mapped_column(String(500), nullable=True)
    quality: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    quality_status: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)

    # Only the name of the base model is part of a brick: a correlated subquery, so loading
    # bricks never hydrates the base model's config and module shapes (JSON, large for big models).
    base_model_name: Mapped[str] = column_property(
        select(BaseModelRow.name)
        .where(BaseModelRow.id == base_model_id)
        .correlate_except(BaseModelRow)
        .scalar_subquery()
    )
    tag_rows: Mapped[list[BrickTagRow]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", passive_deletes=True, order_by="BrickTagRow.tag"
    )

    @classmethod
    def from_draft(
        cls, draft: domain.BrickDraft, *, version: int, base_model_id: int, at: datetime, created_by: str | None
    ) -> BrickRow:
        """The row for a new brick version (the inverse of `to_domain`); ``at`` is its
        creation and update time."""
        return cls(
            name=draft.name,
            version=version,
            base_model_id=base_model_id,
            description=draft.description,
            examples=list(draft.examples),
            license=draft.license,
            metrics=dict(draft.metrics),
            sha256=draft.sha256,
            config_sha256=draft.config_sha256,
            size_bytes=draft.size_bytes,
            config_size_bytes=draft.config_size_bytes,
            rank=draft.rank,
            lora_alpha=draft.lora_alpha,
            use_rslora=draft.use_rslora,
            target_modules=list(draft.target_modules),
            modules=list(draft.modules),
            rank_pattern=dict(draft.rank_pattern),
            alpha_pattern=dict(draft.alpha_pattern),
            created_at=at,
            updated_at=at,
            created_by=created_by,
            tag_rows=[BrickTagRow(tag=t) for t in sorted(set(draft.tags))],
            kind=draft.kind,
            emergent=dict(draft.emergent) if draft.emergent is not None else None,
            evals=[{"input": i, "output": o} for i, o in draft.evals] if draft.evals else None,
            eval_prompt=draft.eval_prompt if draft.evals else None,
            quality_status="queued" if draft.evals else None,
        )

    def to_domain(self) -> domain.Brick:
        """The domain object for this row."""
        return domain.Brick(
            name=self.name,
            version=self.version,
            base_model=self.base_model_name,
            description=self.description,
            examples=tuple(self.examples),
            tags=tuple(t.tag for t in self.tag_rows),
            sha256=self.sha256,
            config_sha256=self.config_sha256,
            size_bytes=self.size_bytes,
            config_size_bytes=self.config_size_bytes,
            rank=self.rank,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            target_modules=tuple(self.target_modules),
            modules=tuple(self.modules),
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            license=self.license,
            metrics=dict(self.metrics),
            created_at=as_utc(self.created_at),
            updated_at=as_utc(self.updated_at),
            created_by=self.created_by,
            kind=self.kind,
            emergent=self.emergent,
            quality=dict(self.quality) if self.quality is not None else None,
            quality_status=self.quality_status,
        )


class BrickTagRow(Base):
    """A tag on a brick version."""

    __tablename__ = "brick_tags"

    brick_id: Mapped[int] = mapped_column(ForeignKey("bricks.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class Embedding(TypeDecorator[np.ndarray]):
    """A float32 vector: pgvector's ``vector`` on PostgreSQL, raw little-endian bytes elsewhere.

    The PostgreSQL column has no fixed dimension, so a model of another size can be
    indexed later; the HNSW index is an expression index per dimension (``dim`` column).
    """

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from pgvector.sqlalchemy import VECTOR

            return dialect.type_descriptor(VECTOR())
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return np.asarray(value, dtype="<f4").tobytes()

    def process_result_value(self, value: Any, dialect: Dialect) -> np.ndarray | None:
        if value is None:
            return None
        if dialect.name == "postgresql":
            return np.asarray(value, dtype=np.float32)
        return np.frombuffer(value, dtype="<f4")


class BrickVectorRow(Base):
    """One embedded text of a brick: its description or one of its examples."""

    __tablename__ = "brick_vectors"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    brick_id: Mapped[int] = mapped_column(ForeignKey("bricks.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200), index=True)
    dim: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[np.ndarray] = mapped_column(Embedding())


class IndexStateRow(Base):
    """A counter bumped by every write that changes what search can return, so that
    in-process indexes of other processes notice and reload."""

    __tablename__ = "index_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


class BrickLexicalRow(Base):
    """A brick's lexical vectors (`registry.search.lexical`): hashed indices and values per view;
    and the sum and sum of squares of its examples' layer vectors (float64)."""

    __tablename__ = "brick_lexical"

    brick_id: Mapped[int] = mapped_column(ForeignKey("bricks.id", ondelete="CASCADE"), primary_key=True)
    shape_idx: Mapped[bytes] = mapped_column(LargeBinary)
    shape_val: Mapped[bytes] = mapped_column(LargeBinary)
    prefix_idx: Mapped[bytes] = mapped_column(LargeBinary)
    prefix_val: Mapped[bytes] = mapped_column(LargeBinary)
    word_idx: Mapped[bytes] = mapped_column(LargeBinary)
    word_val: Mapped[bytes] = mapped_column(LargeBinary)
    layer_sum: Mapped[bytes] = mapped_column(LargeBinary)
    layer_sumsq: Mapped[bytes] = mapped_column(LargeBinary)


class RetrievalStatsRow(Base):
    """Corpus statistics for ranking (one row): the embedding model the vectors come from,
    the number of texts, the sum and count of example vectors, and the sum and sum of
    squares of the examples' layer vectors. Document frequencies: `RetrievalDfRow`."""

    __tablename__ = "retrieval_stats"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str | None] = mapped_column(String(200))
    dim: Mapped[int | None] = mapped_column(Integer)
    n_docs: Mapped[int] = mapped_column(BigInteger, default=0)
    example_count: Mapped[int] = mapped_column(BigInteger, default=0)
    example_sum: Mapped[bytes | None] = mapped_column(LargeBinary)
    layer_sum: Mapped[bytes | None] = mapped_column(LargeBinary)
    layer_sumsq: Mapped[bytes | None] = mapped_column(LargeBinary)


class RetrievalDfRow(Base):
    """How many texts contain a hashed lexical feature (``bucket``) of a ``view``: one row
    per feature seen, so registering a brick touches only the rows of its own features.
    ``generation`` is the index generation of the row's last change: a process mirroring
    the counts reads only the rows newer than its copy (rows at zero are kept for that)."""

    __tablename__ = "retrieval_df"

    view: Mapped[str] = mapped_column(String(16), primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(BigInteger, index=True)


class CompositionRow(Base):
    """A composition: its recipe (whose hash is the id), build status and cache bookkeeping."""

    __tablename__ = "compositions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"), index=True)
    output: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    requested_by: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_accessed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # Published to the blob store: [{path, sha256, size}] (registry.storage.composition_outputs); NULL
    # while the files are in the local compositions directory.
    files: Mapped[list[Any] | None] = mapped_column(JSON)

    def to_domain(self) -> domain.Composition:
        """The domain object for this row."""
        return domain.Composition(
            id=self.id,
            status=self.status,
            progress=self.progress,
            message=self.message,
            recipe=self.recipe,
            output=self.output,
            method=self.method,
            error=self.error,
            error_code=self.error_code,
            size_bytes=self.size_bytes,
            attempts=self.attempts,
            created_at=as_utc(self.created_at),
            started_at=as_utc(self.started_at) if self.started_at else None,
            finished_at=as_utc(self.finished_at) if self.finished_at else None,
            requested_by=self.requested_by,
        )


class CompositionLeaseRow(Base):
    """A download in progress of a composition's files: eviction leaves the composition
    alone while any unexpired lease holds it. A lease is renewed while bytes flow and
    dropped at the end; one left by a crashed server expires on its own."""

    __tablename__ = "composition_leases"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    composition_id: Mapped[str] = mapped_column(String(64), index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CompositionNameRow(Base):
    """A name that points at a composition (``brickyard composition name``); moving a name
    to another composition is an update of this row."""

    __tablename__ = "composition_names"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    name_folded: Mapped[str] = mapped_column(String(100), unique=True, default=folded_default("name"))
    composition_id: Mapped[str] = mapped_column(ForeignKey("compositions.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(100))


class CompositionBrickRow(Base):
    """A brick name used by a composition: lets listings filter by brick with an index
    instead of reading every recipe's JSON."""

    __tablename__ = "composition_bricks"

    composition_id: Mapped[str] = mapped_column(ForeignKey("compositions.id", ondelete="CASCADE"), primary_key=True)
    brick_name: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)


class BrickAliasRow(Base):
    """An alias of a brick version (``sentiment@production``), MLflow-style: one version per
    (name, alias); setting it again moves it."""

    __tablename__ = "brick_aliases"
    __table_args__ = (UniqueConstraint("name", "alias_folded", name="uq_brick_aliases_name_alias_folded"),)

    name: Mapped[str] = mapped_column(String(100), ForeignKey("brick_names.name"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(100), primary_key=True)
    alias_folded: Mapped[str] = mapped_column(String(100), default=folded_default("alias"))
    version: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(100))


class ApiTokenRow(Base):
    """An API token: only its sha256 is stored; ``prefix`` identifies it in listings."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(100))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class EventRow(Base):
    """The audit log: who did what to which subject, and when."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str | None] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(200), index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
