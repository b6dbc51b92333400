"""The use cases: register, inspect, list, patch and delete base models and bricks.

`Registry` is the Python API; the REST routes and the CLI are thin layers over it. Its
collaborators (store, blob store) are passed in, so tests and other deployments can
swap them. Order of work on registration: validate everything, then write the blobs,
then the row: a failure leaves no row, and no visible partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, BinaryIO

from composer import find_linear_modules, read_base_model
from registry import domain
from registry.auth import TokenStore
from registry.builds.compositions import Compositions
from registry.composer_errors import composer_errors
from registry.db.events import Event
from registry.db.migrate import ensure_schema
from registry.db.session import Database
from registry.emergent import NEURONS_FILENAME, EmergentBricks
from registry.errors import (
    BaseModelNotFound,
    BrickNotFound,
    FileNotFound,
    InvalidAdapter,
    InvalidBaseModel,
    InvalidInput,
    PayloadTooLarge,
    ServiceUnavailable,
    VersionExists,
)
from registry.fsck import FsckReport, fsck
from registry.inputs import (
    MAX_VERSION,
    NAME_PATTERN,
    BaseModelCreate,
    BrickMetadata,
    BrickPatchIn,
    SearchRequest,
    parse_json_model,
)
from registry.search.embed import Embedder, shared_embedder
from registry.search.hit_cache import BrickCache
from registry.search.index import SearchFilters, SearchIndex, make_index
from registry.search.index_rows import EmbeddedTexts
from registry.search.ranking import rank_bricks
from registry.settings import Settings
from registry.spec import inspect_adapter
from registry.storage.aliases import BrickAliasStore, check_alias, parse_version_or_alias
from registry.storage.blob_check import StreamedBlobCheck, VerifiedBlobs
from registry.storage.blobs import BlobStore, LocalBlobStore, StagedBlob
from registry.storage.model_roots import ModelRoots
from registry.storage.store import Store

if TYPE_CHECKING:
    from registry.search.embed_process import ProcessEmbedder

__all__ = ["CONFIG_FILENAME", "WEIGHTS_FILENAME", "Registry"]

log = logging.getLogger("brickyard")

CONFIG_FILENAME = "adapter_config.json"
WEIGHTS_FILENAME = "adapter_model.safetensors"


class Registry:
    """Brickyard's service layer over a SQL store, a blob store and a search index."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        blobs: BlobStore,
        *,
        embedder: Embedder | None = None,
        index: SearchIndex | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self._embedder = embedder
        self._embedder_given = embedder is not None
        self._embed_child: ProcessEmbedder | None = None
        self._embed_child_lock = threading.Lock()
        self._closed = False
        self.index = index if index is not None else make_index(store.db)
        self.compositions = Compositions(
            store, blobs, settings, search=self.search, resolve_version=self.resolve_brick_ref
        )
        self.aliases = BrickAliasStore(store.db)
        self.emergent = EmergentBricks(store, blobs, self.compositions, embed=self._embed)
        self.tokens = TokenStore(store.db)
        self._hit_bricks = BrickCache(store, size=_BRICK_CACHE_SIZE)
        self._verified_blobs = VerifiedBlobs(blobs) if isinstance(blobs, LocalBlobStore) else None
        # Every download route checks the bytes it serves with this (registry.storage.blob_check).
        self.download_check: VerifiedBlobs | StreamedBlobCheck = self._verified_blobs or StreamedBlobCheck(blobs)

    @property
    def embedder(self) -> Embedder:
        """The embedding model (loaded on first use, shared by the process)."""
        if self._embedder is None:
            embedding = self.settings.embedding
            self._embedder = shared_embedder(
                embedding.resolved_model_path(),
                runtime=embedding.runtime,
                cache_dir=self.settings.embedding_cache_dir,
                quantize=embedding.quantize,
                threads=embedding.threads,
            )
        return self._embedder

    @property
    def brick_embedder(self) -> Embedder:
        """What embeds brick descriptions and examples: with ``embedding.isolation =
        "process"``, a low-priority child process (see `registry.search.embed_process`), so that
        registrations do not take the CPU from searches; otherwise `embedder`. An embedder
        given to the constructor serves both."""
        if self._embedder_given or self.settings.embedding.isolation == "thread":
            return self.embedder
        if self._embed_child is None:
            with self._embed_child_lock:
                if self._closed:
                    raise ServiceUnavailable("the registry is closed")
                if self._embed_child is None:
                    self._embed_child = self._new_embed_child()
        return self._embed_child

    def _new_embed_child(self) -> ProcessEmbedder:
        from registry.search.embed_process import ProcessEmbedder

        embedding = self.settings.embedding
        config = {
            "path": str(embedding.resolved_model_path()),
            "runtime": embedding.runtime,
            "cache_dir": str(self.settings.embedding_cache_dir),
            "quantize": embedding.quantize,
            "threads": embedding.threads,
        }
        log_path = self.settings.home / "logs" / "embed-worker.log"
        return ProcessEmbedder(config, log_path, timeout_s=embedding.timeout_s)

    def _embed(self, description: str, examples: tuple[str, ...]) -> EmbeddedTexts:
        embedder = self.brick_embedder
        vectors, layers = embedder.embed_with_layer([description, *examples])
        return EmbeddedTexts(
            model=embedder.name,
            description=description,
            examples=examples,
            desc_vec=vectors[0],
            ex_vecs=vectors[1:],
            ex_layers=layers[1:],
        )

    @classmethod
    def open(cls, settings: Settings | None = None) -> Registry:
        """Connect to the configured database and blob store.

        The embedded SQLite default migrates itself; any other database must be at the
        latest schema (`registry.errors.SchemaOutOfDate` names ``brickyard db upgrade``).
        """
        settings = settings or Settings()
        settings.home.mkdir(parents=True, exist_ok=True)
        db = Database.from_url(settings.sqlalchemy_url)
        try:
            ensure_schema(db.engine, auto_upgrade=settings.is_embedded_sqlite)
        except BaseException:
            db.dispose()
            raise
        from registry.storage.s3_blobs import make_blob_store

        return cls(settings, Store(db), make_blob_store(settings))

    def close(self) -> None:
        """Release database connections and stop the embedding child, if any."""
        with self._embed_child_lock:
            self._closed = True  # a warm-up still running must not start a child now
            child = self._embed_child
        if child is not None:
            child.close()
        self.store.db.dispose()

    def check_database(self) -> str:
        """Run a trivial query; returns the database dialect. Raises `ServiceUnavailable`
        (through the session's error translation) when the database does not answer."""
        return self.store.ping()

    def brick_history(self, name: str, *, limit: int = 100) -> list[Event]:
        """Audit events of every version of brick ``name``, newest first."""
        return self.store.events(f"brick:{name}@", limit=limit)

    def fsck(
        self,
        *,
        repair: bool = False,
        verify: bool = True,
        grace_s: float = 3600.0,
        after_listing: Callable[[], None] | None = None,
    ) -> FsckReport:
        """Check rows against stored bytes; with ``repair``, remove unreferenced leftovers
        (``after_listing``: a test hook between listing references and deleting)."""
        return fsck(
            self.store,
            self.blobs,
            self.compositions,
            repair=repair,
            verify=verify,
            grace_s=grace_s,
            job_blobs=self.emergent.job_blobs(),
            after_listing=after_listing,
        )

    def bootstrap_admin_token(self) -> str | None:
        """With auth on and no admin token yet, create one named ``admin``, save it to
        ``admin_token_file`` (mode 0600) and return it; otherwise None."""
        if not (self.settings.auth.enabled and self.settings.auth.bootstrap_admin) or self.tokens.any_admin():
            return None
        from registry.errors import Conflict

        try:
            token, _ = self.tokens.create("admin", "admin", actor="bootstrap")
        except Conflict:  # another process bootstrapped first, or "admin" was revoked: leave it
            return None
        path = self.settings.admin_token_file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)  # the mode of O_CREAT does not apply to a file that existed
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        return token

    # -- base models -------------------------------------------------------------------

    def add_base_model(
        self, request: BaseModelCreate | Mapping[str, Any], *, actor: str | None = None
    ) -> domain.BaseModel:
        """Register a base model from a local directory or an ``s3://`` prefix; only the config,
        the shard index and the safetensors headers are read (from object storage by ranged
        GETs, `registry.storage.s3_bases.base_model_headers`), never the weights.

        Raises:
            InvalidInput: invalid name or fields.
            InvalidBaseModel: the directory is not a readable HF safetensors model.
            BaseModelExists: the name is taken.
        """
        if not isinstance(request, BaseModelCreate):
            request = parse_json_model(BaseModelCreate, dict(request), what="base model")
        from registry.storage.s3_bases import base_model_headers, is_s3_url

        source = request.path
        if not is_s3_url(request.path):
            # Confined to the model roots, every file checked before it is opened (registry.storage.model_roots).
            roots = ModelRoots(self.settings)
            resolved = roots.directory(request.path)
            roots.check_model(resolved)
            source = str(resolved)
        try:
            path = base_model_headers(source, self.settings)  # an s3:// base: a local view of its headers
            with composer_errors():
                layout = read_base_model(path, max_header_bytes=self.settings.limits.max_header_bytes)
                linear = find_linear_modules(layout)
        except (OSError, ValueError) as exc:  # unreadable, too long, or not a path at all
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise InvalidBaseModel(
                f"cannot read base model at {request.path[:200]!r}", errors=[f"path: {reason}"]
            ) from None
        if not linear:
            raise InvalidBaseModel(
                f"no linear modules found in {request.path[:200]!r}",
                errors=["the model has no adaptable linear layers"],
            )
        draft = domain.BaseModelDraft(
            name=request.name,
            path=request.path if is_s3_url(request.path) else str(path.resolve()),
            description=request.description,
            architecture=layout.architecture,
            dtype=layout.dtype,
            parameter_count=layout.parameter_count,
            size_bytes=layout.size_bytes,
            fingerprint=layout.fingerprint(),
            linear_modules={
                name: domain.LinearShape(m.out_features, m.in_features, m.fan_in_fan_out) for name, m in linear.items()
            },
            config=dict(layout.config),
            aliases=tuple(request.aliases),
        )
        base = self.store.add_base_model(draft, actor=actor)
        log.info("registered base model %s (%s, %d parameters)", base.name, base.architecture, base.parameter_count)
        return base

    def get_base_model(self, name: str) -> domain.BaseModel:
        """The base model called ``name`` (`BaseModelNotFound` otherwise)."""
        return self.store.get_base_model(name)

    def list_base_models(self) -> list[domain.BaseModel]:
        """Every registered base model."""
        return self.store.list_base_models()

    def add_base_model_alias(self, name: str, alias: str, *, actor: str | None = None) -> domain.BaseModel:
        """Let adapters that record ``alias`` as their ``base_model_name_or_path`` (a Hub id,
        a training path's last component) register for base model ``name``. Adding an alias
        it has already changes nothing.

        Raises:
            InvalidInput: an empty, overlong or non-printable alias, or one alias too many.
            BaseModelNotFound: no such base model.
        """
        alias = _valid_alias(alias)

        def add(aliases: tuple[str, ...]) -> tuple[str, ...]:
            if alias in aliases:
                return aliases
            if len(aliases) >= _MAX_ALIASES:
                raise InvalidInput(
                    f"base model {name!r} has {len(aliases)} aliases already",
                    errors=[f"alias: at most {_MAX_ALIASES} aliases; remove one first"],
                )
            return (*aliases, alias)

        return self.store.change_base_model_aliases(name, add, actor=actor, action="base_model.alias_add")

    def remove_base_model_alias(self, name: str, alias: str, *, actor: str | None = None) -> domain.BaseModel:
        """Remove an alias of base model ``name``.

        Raises:
            BaseModelNotFound: no such base model. NotFound: it has no such alias.
        """
        from registry.errors import NotFound

        def remove(aliases: tuple[str, ...]) -> tuple[str, ...]:
            if alias not in aliases:
                raise NotFound(
                    f"base model {name!r} has no alias {alias[:300]!r}",
                    errors=[f"its aliases are {list(aliases)}" if aliases else "it has no aliases"],
                )
            return tuple(a for a in aliases if a != alias)

        return self.store.change_base_model_aliases(name, remove, actor=actor, action="base_model.alias_remove")

    def delete_base_model(self, name: str, *, actor: str | None = None) -> domain.BaseModel:
        """Remove a base model's registration (its files are not touched).

        Raises:
            BaseModelNotFound: no such base model.
            BaseModelInUse: bricks or compositions reference it (they are named).
        """
        base = self.store.delete_base_model(name, actor=actor)
        log.info("deleted base model %s (by %s)", base.name, actor or "anonymous")
        return base

    # -- bricks ------------------------------------------------------------------------

    def register_brick(
        self,
        metadata: BrickMetadata | Mapping[str, Any] | str | bytes,
        config: bytes | BinaryIO,
        weights: BinaryIO | StagedBlob,
        *,
        actor: str | None = None,
    ) -> domain.Brick:
        """Validate and store a brick: ``adapter_config.json`` bytes and the weights stream.

        Args:
            metadata: name, base_model, description, examples, tags, version, license, metrics.
            config: the adapter config (bytes or a binary file).
            weights: the ``adapter_model.safetensors`` stream (read once, never buffered whole),
                or those bytes already staged in the blob store (an upload streamed there,
                registry.api.uploads): this call then owns them (commits or discards them).
            actor: who registers it (token name), recorded on the brick.

        Raises:
            PayloadTooLarge: a file exceeds a size limit.
            UnsupportedMediaType: the weights are not safetensors.
            InvalidInput / InvalidAdapter: every problem with metadata, config and weights.
            BrickExists: the same weights with the same config are registered already.
            VersionExists: the explicit version is taken.
        """
        limits = self.settings.limits
        problems: list[str] = []
        meta: BrickMetadata | None = None
        try:
            if isinstance(metadata, (str, bytes)) and len(metadata) > limits.max_metadata_bytes:
                raise PayloadTooLarge(
                    f"metadata is larger than the limit of {limits.max_metadata_bytes} bytes",
                    extra={"limit_bytes": limits.max_metadata_bytes},
                )
            try:
                meta = metadata if isinstance(metadata, BrickMetadata) else _parse_metadata(metadata)
            except InvalidInput as exc:
                problems.extend(exc.errors or [exc.detail])
            config_bytes = _read_bounded(config, limits.max_config_bytes, CONFIG_FILENAME)
        except BaseException:
            if isinstance(weights, StagedBlob):
                self.blobs.discard(weights)
            raise
        staged = (
            weights
            if isinstance(weights, StagedBlob)
            else self.blobs.stage(weights, max_bytes=limits.max_adapter_bytes, what=WEIGHTS_FILENAME)
        )
        try:
            base: domain.BaseModel | None = None
            base_name = meta.base_model if meta is not None else _claimed_base_model(metadata)
            if base_name is not None:
                try:
                    base = self.store.get_base_model(base_name)
                except BaseModelNotFound:
                    problems.append(f"metadata.base_model: no base model named {base_name!r} is registered")
            adapter_problems: list[str] = []
            # A brick fits every base model of its base's fingerprint: naming any of them is fine.
            twins = tuple(
                b for b in self.store.list_base_models() if base is not None and b.fingerprint == base.fingerprint
            )
            spec = inspect_adapter(
                config_bytes,
                staged.path,
                base,
                max_header_bytes=limits.max_header_bytes,
                problems=adapter_problems,
                pattern_seconds=limits.pattern_seconds,
                twins=twins,
            )
            if problems or adapter_problems or spec is None or meta is None:
                error = InvalidAdapter if adapter_problems else InvalidInput
                target = f" for base model {base.name!r}" if base is not None else ""
                raise error(f"the brick cannot be registered{target}", errors=problems + adapter_problems)
            self.store.ensure_new_brick(staged.sha256, hashlib.sha256(config_bytes).hexdigest())
            if meta.version is not None:
                self._ensure_version_free(meta.name, meta.version)
            config_blob = self.blobs.stage_bytes(config_bytes)
            draft = domain.BrickDraft(
                name=meta.name,
                base_model=meta.base_model,
                description=meta.description,
                examples=tuple(meta.examples),
                tags=tuple(meta.tags),
                sha256=staged.sha256,
                config_sha256=config_blob.sha256,
                size_bytes=staged.size,
                config_size_bytes=len(config_bytes),
                rank=spec.settings.r,
                lora_alpha=spec.settings.lora_alpha,
                use_rslora=spec.settings.use_rslora,
                target_modules=spec.target_modules,
                modules=spec.modules,
                rank_pattern=dict(spec.settings.rank_pattern),
                alpha_pattern=dict(spec.settings.alpha_pattern),
                license=meta.license,
                metrics=dict(meta.metrics),
                version=meta.version,
                evals=tuple((e.input, e.output) for e in meta.evals or ()),
                eval_prompt=meta.eval_prompt,
            )
        except BaseException:
            self.blobs.discard(staged)
            raise
        try:
            embedded = self._embed(draft.description, draft.examples)
            self.store.ensure_index_model(embedded.model)
        except BaseException:
            self.blobs.discard(staged)
            self.blobs.discard(config_blob)
            raise
        # Bytes first, row second: a crash in between leaves an unreferenced blob for
        # `brickyard fsck` to collect, never a row without its bytes.
        self.blobs.commit(staged)
        self.blobs.commit(config_blob)
        brick = self.store.add_brick(
            draft,
            embedded=embedded,
            actor=actor,
            blobs_present=lambda: self.blobs.exists(staged.sha256) and self.blobs.exists(config_blob.sha256),
        )
        log.info("registered brick %s (%s, %d bytes)", brick.ref, brick.sha256[:12], brick.size_bytes)
        return brick

    def _ensure_version_free(self, name: str, version: int) -> None:
        try:
            self.store.get_brick(name, version)
        except BrickNotFound:
            return
        raise VersionExists(f"{name}@{version} already exists", extra={"name": name, "version": version})

    def brick_generation(self) -> int:
        """Raised by every brick register, metadata change and delete (`Store.brick_generation`)."""
        return self.store.brick_generation()

    def get_brick(self, name: str, version: int | None = None) -> domain.Brick:
        """A brick version; the latest when ``version`` is None (`BrickNotFound` otherwise)."""
        return self.store.get_brick(name, version)

    def list_bricks(
        self,
        *,
        name: str | None = None,
        base_model: str | None = None,
        tag: str | None = None,
        all_versions: bool = False,
        cursor: str | None = None,
        limit: int = 50,
        kind: str | None = None,
    ) -> domain.Page[domain.Brick]:
        """A page of bricks (latest version of each name unless ``all_versions``; of one
        ``kind``, ``lora`` or ``emergent``, when given)."""
        if not 1 <= limit <= 500:
            raise InvalidInput("invalid limit", errors=["limit: must be between 1 and 500"])
        if kind is not None and kind not in ("lora", "emergent"):
            raise InvalidInput("invalid kind", errors=["kind: must be 'lora' or 'emergent'"])
        return self.store.list_bricks(
            name=name,
            base_model=base_model,
            tag=tag.lower() if tag else None,
            all_versions=all_versions,
            cursor=cursor,
            limit=limit,
            kind=kind,
        )

    def update_brick(
        self, name: str, version: int, patch: BrickPatchIn | Mapping[str, Any], *, actor: str | None = None
    ) -> domain.Brick:
        """Change description, examples or tags of a brick version."""
        if not isinstance(patch, BrickPatchIn):
            patch = parse_json_model(BrickPatchIn, dict(patch), what="patch")
        change = domain.BrickPatch(
            description=patch.description,
            examples=tuple(patch.examples) if patch.examples is not None else None,
            tags=tuple(patch.tags) if patch.tags is not None else None,
        )
        embedded = None
        if change.description is not None or change.examples is not None:
            current = self.store.get_brick(name, version)
            embedded = self._embed(
                change.description if change.description is not None else current.description,
                change.examples if change.examples is not None else current.examples,
            )
        return self.store.update_brick(name, version, change, embedded=embedded, actor=actor)

    def delete_brick(self, name: str, version: int, *, actor: str | None = None) -> domain.Brick:
        """Delete a brick version. Its blobs stay until `brickyard fsck` collects them
        (another brick or a cached composition may share them)."""
        brick = self.store.delete_brick(name, version, actor=actor)
        log.info("deleted brick %s (by %s)", brick.ref, actor or "anonymous")
        return brick

    # -- search ------------------------------------------------------------------------

    def search(self, request: SearchRequest | Mapping[str, Any]) -> domain.SearchResult:
        """Rank the compatible bricks for a task description or an example input.

        Filters (base model, tags, latest version) apply before ranking, so ``k`` hits
        come back whenever ``k`` eligible bricks exist.

        Raises:
            InvalidInput: empty or oversized query, bad filters.
            BaseModelNotFound: the base model filter names no registered base model.
            ServiceUnavailable: the index was built with another embedding model.
        """
        if not isinstance(request, SearchRequest):
            request = parse_json_model(SearchRequest, dict(request), what="search")
        base_ids = None
        if request.base_model is not None and request.compatible:
            # A brick fits every base model of its base's fingerprint, so it is found for each.
            base_ids = self.store.compatible_base_model_ids(request.base_model)
        elif request.base_model is not None:
            base_ids = (self.store.base_model_id(request.base_model),)
        filters = SearchFilters(
            base_model_ids=base_ids, tags=tuple(request.tags), all_versions=request.all_versions, kind=request.kind
        )
        clock = time.perf_counter()
        timings: dict[str, float] = {}

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = (now - clock) * 1000
            clock = now

        query_vecs, query_layers = self.embedder.embed_with_layer([request.query])
        query_vec = query_vecs[0]
        lap("embed")
        wanted = request.k + request.offset
        n = max(_MIN_CANDIDATE_VECTORS, _VECTORS_PER_HIT * wanted)
        while True:
            found = self.index.candidates(
                query_vec,
                model=self.embedder.name,
                filters=filters,
                n=n,
                max_bricks=max(_MAX_CANDIDATE_BRICKS, wanted),
                exact=request.exact,
            )
            enough = len(found.features) >= wanted or n >= _MAX_CANDIDATE_VECTORS
            if enough or len(found.features) == 0:
                break
            n *= 4
        lap("index")
        stats = replace(found.stats, df=self.index.doc_freqs(found.generation))
        ranked = rank_bricks(
            query_vec, request.query, found.features, found.max_example_sim, stats, query_layer=query_layers[0]
        )
        if request.min_score is not None:
            ranked = [r for r in ranked if r.score >= request.min_score]
        ranked = ranked[request.offset : wanted]
        bricks = self._hit_bricks.get([r.brick_id for r in ranked], found.generation)
        hits = []
        for r in ranked:
            brick = bricks.get(r.brick_id)
            if brick is None:  # deleted between ranking and lookup
                continue
            text = brick.description if r.matched == "description" else brick.examples[r.ordinal]
            hits.append(
                domain.SearchHit(brick=brick, score=r.score, matched=r.matched, text=text, similarity=r.similarity)
            )
        lap("rank")
        return domain.SearchResult(hits=hits, timings_ms=timings)

    def reindex(self, progress: Callable[[int, int], None] | None = None, *, batch: int = 64) -> int:
        """Re-embed every brick with the configured model and rebuild the index.

        Args:
            progress: called with (bricks done, bricks in all).
            batch: bricks embedded per batch.

        Returns:
            The number of bricks indexed.
        """
        refs = self.store.all_brick_texts()
        embedded: dict[int, EmbeddedTexts] = {}
        for start in range(0, len(refs), batch):
            for brick_id, description, examples in refs[start : start + batch]:
                embedded[brick_id] = self._embed(description, examples)
            if progress is not None:
                progress(min(start + batch, len(refs)), len(refs))
        self.store.replace_index(embedded, embed=lambda d, e: self._embed(d, e))
        self.index.invalidate()
        return len(embedded)

    def brick_files(self, name: str, version: int) -> list[domain.BrickFile]:
        """The stored files of a brick version."""
        brick = self.store.get_brick(name, version)
        if brick.kind == "emergent":
            return [domain.BrickFile(NEURONS_FILENAME, brick.sha256, brick.size_bytes, "application/octet-stream")]
        return [
            domain.BrickFile(CONFIG_FILENAME, brick.config_sha256, brick.config_size_bytes, "application/json"),
            domain.BrickFile(WEIGHTS_FILENAME, brick.sha256, brick.size_bytes, "application/octet-stream"),
        ]

    def brick_file(self, name: str, version: int, filename: str) -> domain.BrickFile:
        """A stored file of a brick version (its bytes are the blob ``file.sha256``).

        Raises:
            BrickNotFound: no such brick version.
            FileNotFound: no such file.
            StorageCorrupt: its blob is missing or not the registered bytes.
        """
        for file in self.brick_files(name, version):
            if file.filename == filename:
                if self._verified_blobs is not None:
                    # Never serve bytes other than the registered ones (registry.storage.blob_check); an
                    # object store checks its objects' checksums itself (registry.storage.s3_blobs).
                    self._verified_blobs.path(file.sha256, file.size_bytes, what=f"{name}@{version}/{filename}")
                return file
        raise FileNotFound(
            f"{name}@{version} has no file {filename[:100]!r}",
            errors=[f"files are {CONFIG_FILENAME} and {WEIGHTS_FILENAME}"],
        )

    # -- Hugging Face Hub view (registry.hub) ------------------------------------------------

    def ready_compositions(self, *, base_model: str | None = None) -> list[domain.Composition]:
        """Ready compositions (of one base model when given), most recently used last.

        The cache budget keeps them few, so one look-up each is cheap enough."""
        from registry.errors import NotFound

        found = []
        for composition_id, _ in self.compositions.store.ready_by_age():
            try:
                composition = self.compositions.get(composition_id)
            except NotFound:  # evicted meanwhile
                continue
            if "job" in composition.recipe:  # another job on the queue (emergent discovery), not a model
                continue
            if composition.status == "ready" and (
                base_model is None or composition.recipe["base_model"]["name"] == base_model  # type: ignore[index]
            ):
                found.append(composition)
        return found

    # -- brick version aliases (issue #21) ---------------------------------------------------

    def resolve_brick_ref(self, name: str, version_or_alias: int | str | None) -> int | None:
        """The version a reference names: a number (or digit string) is a version, an alias
        (``production``) is looked up, None/``latest``/``main`` mean the latest (None back).

        Raises:
            BrickNotFound: no brick ``name``, or it has no such alias.
        """
        ref = parse_version_or_alias(version_or_alias) if isinstance(version_or_alias, str) else version_or_alias
        if isinstance(ref, int) and not 1 <= ref <= MAX_VERSION:
            raise InvalidInput(
                f"version {ref} is out of range", errors=[f"version: a number from 1 to {MAX_VERSION} (64-bit)"]
            )
        if not isinstance(ref, str):
            return ref
        version = self.aliases.version_of(name, ref)
        if version is None:
            self.store.get_brick(name)  # an unknown brick says so first
            known = [a.alias for a in self.aliases.of_brick(name)]
            raise BrickNotFound(
                f"brick {name!r} has no version or alias {ref[:100]!r}",
                errors=[f"aliases of {name}: {', '.join(known) if known else 'none'}"],
                extra={"name": name},
            )
        return version

    def hub_alias(self, name: str, revision: str) -> int | None:
        """``registry.hub.Hub``'s alias resolver: the version ``name@revision`` names, or None."""
        return self.aliases.version_of(name, revision)

    def set_brick_alias(
        self, name: str, version_or_alias: int | str, alias: str, *, actor: str | None = None
    ) -> domain.BrickAlias:
        """Point ``name@alias`` at a version (given by number or by another alias); moves it
        if it pointed elsewhere.

        Raises:
            InvalidInput: a malformed, numeric or reserved alias. BrickNotFound: no such version.
        """
        check_alias(alias)
        brick = self.store.get_brick(name, self.resolve_brick_ref(name, version_or_alias))
        found = self.aliases.set(name, alias, brick.version, actor)
        log.info("alias %s@%s -> version %d (by %s)", name, alias, brick.version, actor or "anonymous")
        return found

    def remove_brick_alias(self, name: str, alias: str) -> domain.BrickAlias:
        """Remove ``name@alias`` (`BrickNotFound` when it does not exist)."""
        return self.aliases.remove(name, alias)

    def brick_aliases(self, name: str) -> list[domain.BrickAlias]:
        """Every alias of brick ``name`` (`BrickNotFound` for an unknown brick)."""
        self.store.get_brick(name)
        return self.aliases.of_brick(name)


def _parse_metadata(raw: Mapping[str, Any] | str | bytes) -> BrickMetadata:
    return parse_json_model(BrickMetadata, raw if isinstance(raw, (str, bytes)) else dict(raw), what="metadata")


_MIN_CANDIDATE_VECTORS = 200
# Bricks scored in full per query: those owning the best vector hits. Their features are
# fetched (PostgreSQL) and ranked. (The quality bench has 60 bricks, so this does not bind there;
# at 50 it loses one top-3 hit of 300.)
_MAX_CANDIDATE_BRICKS = 64
_BRICK_CACHE_SIZE = 10_000
_VECTORS_PER_HIT = 8
_MAX_CANDIDATE_VECTORS = 20_000


_MAX_ALIASES = 16  # as many as a registration may give (`BaseModelCreate.aliases`)
_MAX_ALIAS_CHARS = 300


def _valid_alias(alias: Any) -> str:
    if (
        not isinstance(alias, str)
        or not alias
        or len(alias) > _MAX_ALIAS_CHARS
        or not alias.isprintable()
        or alias != alias.strip()
    ):
        raise InvalidInput(
            "invalid alias",
            errors=[
                f"alias: a printable name of 1 to {_MAX_ALIAS_CHARS} characters without surrounding spaces "
                "(e.g. a Hub id such as 'meta-llama/Llama-3.2-1B')"
            ],
        )
    return alias


def _claimed_base_model(raw: Any) -> str | None:
    """The base model named by metadata that failed validation, to check the adapter
    against it anyway and report every problem in one answer."""
    try:
        data = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except (ValueError, RecursionError):
        return None
    name = data.get("base_model") if isinstance(data, Mapping) else None
    return name if isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) else None


def _read_bounded(source: bytes | BinaryIO, limit: int, what: str) -> bytes:
    data = source if isinstance(source, bytes) else source.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"{what} is larger than the limit of {limit} bytes", extra={"limit_bytes": limit})
    return data
