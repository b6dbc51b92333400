"""Compositions as a service: resolve a request into a recipe, queue it, build it with the
composer, serve the result, and keep the cache within its budget.

A *recipe* is the fully resolved request: the base model (name and fingerprint), each
brick's exact version with the sha256 of its weights and config, the weights, the merge
method with every parameter (defaults filled in), the output kind and rank, and the
composer version. Its canonical JSON's sha256 is the composition id, so identical
requests, however phrased, share one build and one cached result.

With an instruction instead of named bricks, the top-``k`` compatible bricks from search
are used; unless ``weights`` are given, they get weights from their cosine similarity to
the instruction (`registry.builds.instruction_weights`: a softmax with a temperature, and a floor
below which a brick is dropped), summing to 1: a convex combination of the deltas, so the
merged delta stays on the scale of one brick. The recipe records the chosen bricks and
weights, so a client shows them before the build's result is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from registry import domain
from registry.builds.fitting import FIT_FRACTION, fit_recipe, fit_section, require_tokenizer
from registry.builds.instruction_weights import instruction_weights
from registry.composer_errors import composer_errors
from registry.errors import (
    BaseModelNotFound,
    BrickNotFound,
    BrickyardError,
    CompositionNotFound,
    Conflict,
    FileNotFound,
    IncompatibleBrick,
    InvalidInput,
    InvalidRecipe,
    ServiceUnavailable,
    StorageCorrupt,
)
from registry.inputs import ComposeRequest, SearchRequest, parse_json_model
from registry.storage.composition_outputs import PublishedFile, manifest_from_json, manifest_to_json, publish_directory
from registry.storage.composition_store import CANCELLED, FAILED, QUEUED, READY, RUNNING, STATUSES, CompositionStore
from registry.storage.model_roots import ModelRoots
from registry.suggest import did_you_mean

if TYPE_CHECKING:
    from registry.settings import Settings
    from registry.storage.blobs import BlobStore
    from registry.storage.store import Store

__all__ = ["Compositions", "recipe_id"]

log = logging.getLogger("brickyard.compositions")

RECIPE_SCHEMA = 1


def canonical_json(document: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, shortest float repr."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def recipe_id(recipe: dict[str, Any]) -> str:
    """The composition id: sha256 of the canonical recipe."""
    return hashlib.sha256(canonical_json(recipe)).hexdigest()


class Compositions:
    """Use cases of compositions; builds run through `build_claimed` (worker or local)."""

    def __init__(
        self,
        catalog: Store,
        blobs: BlobStore,
        settings: Settings,
        *,
        search: Callable[[SearchRequest], domain.SearchResult],
        resolve_version: Callable[[str, int | str | None], int | None] | None = None,
    ) -> None:
        """``catalog`` holds the base models and bricks a request names, ``blobs`` their bytes,
        ``search`` finds bricks for an instruction; compositions live in their own store
        (`CompositionStore`, on the catalog's database) and under ``settings.compositions_dir``."""
        self.catalog = catalog
        self.blobs = blobs
        self.settings = settings
        self.search = search
        self.resolve_version = resolve_version
        self.store = CompositionStore(catalog.db)
        self.root = settings.compositions_dir
        self.root.mkdir(parents=True, exist_ok=True)
        # With object storage, outputs are published there (registry.storage.composition_outputs) and
        # the local directory only holds builds in progress.
        self.publishes = settings.blobs.url is not None
        # Other jobs sharing the queue and its workers: recipe["job"] -> runner (e.g. emergent discovery).
        self.runners: dict[str, Callable[[domain.Composition, str], domain.Composition]] = {}
        # Called with (composition id, bytes) for every composition evicted to the budget (/metrics).
        self.eviction_listeners: list[Callable[[str, int], None]] = []

    # -- requests ------------------------------------------------------------------------

    def resolve(self, request: ComposeRequest | dict[str, Any], *, plan: bool = True) -> tuple[dict[str, Any], int]:
        """Resolve a request into its recipe (and the base model's row id), validating it
        completely (bricks, compatibility, method parameters; with ``plan``, the composer's
        plan against the base model too) before anything is queued.

        Raises:
            InvalidInput: malformed request. BaseModelNotFound / BrickNotFound: unknown names.
            IncompatibleBrick: bricks of another base model (all listed).
            InvalidRecipe: the composer refuses the recipe (every problem listed).
        """
        if not isinstance(request, ComposeRequest):
            request = parse_json_model(ComposeRequest, dict(request), what="composition")
        from composer import COMPOSER_VERSION, get_method, list_methods

        # Every problem is collected and reported in one answer, each unknown name with a
        # did-you-mean: a user fixing "sumarize" should not then learn about "density: 3".
        problems: list[str] = []
        missing: list[BrickyardError] = []
        base = None
        try:
            base = self.catalog.get_base_model(request.base_model)
        except BaseModelNotFound as exc:
            hint = did_you_mean(request.base_model, [b.name for b in self.catalog.list_base_models()])
            problems.append(f"base_model: {exc.detail}{hint}")
            missing.append(exc)
        method = None
        try:
            with composer_errors(into=InvalidRecipe):
                method = get_method(request.method)
        except InvalidRecipe as exc:
            problems.append(f"method: {exc.detail}{did_you_mean(request.method, [m.name for m in list_methods()])}")
        params: dict[str, Any] = {}
        if method is not None:
            try:
                with composer_errors(into=InvalidRecipe, field="params"):
                    params = method.validate_params(request.params).model_dump(mode="json")
            except InvalidRecipe as exc:
                known = list(method.params_schema().get("properties", {}))
                problems.extend(_with_param_hints(exc.errors or [exc.detail], known))
        chosen: list[tuple[domain.Brick, float]] = []
        if request.instruction is not None:
            if base is not None and not problems:
                chosen = self._chosen_by_instruction(request, base)
        else:
            assert request.bricks is not None
            names: list[str] | None = None
            for i, choice in enumerate(request.bricks):
                try:
                    version = choice.version
                    if isinstance(version, str) and self.resolve_version is not None:
                        version = self.resolve_version(choice.name, version)  # an alias: sentiment@production
                    if isinstance(version, str):
                        raise InvalidRecipe(f"brick {choice.name!r}: version aliases are not available here")
                    chosen.append((self.catalog.get_brick(choice.name, version), choice.weight))
                except BrickNotFound as exc:
                    names = names if names is not None else self.catalog.brick_names()
                    hint = did_you_mean(choice.name, names) if choice.name not in names else ""
                    problems.append(f"bricks[{i}]: {exc.detail}{hint}" + "".join(f"; {e}" for e in exc.errors))
                    missing.append(exc)
            problems.extend(
                f"bricks: {b.ref} is an emergent brick; name it under 'neurons'" for b, _ in chosen if b.kind != "lora"
            )
            if base is not None:
                foreign = [b for b, _ in chosen if not self._same_base(b.base_model, base)]
                if foreign and not problems:
                    raise IncompatibleBrick(
                        f"{len(foreign)} of the bricks were trained on another base model than {base.name!r}",
                        errors=[
                            f"{b.ref} is a brick of base model {b.base_model!r}, whose fingerprint differs"
                            for b in foreign
                        ],
                        extra={
                            "bricks": [
                                {"name": b.name, "version": b.version, "base_model": b.base_model} for b in foreign
                            ]
                        },
                    )
                problems.extend(f"{b.ref} is a brick of base model {b.base_model!r}" for b in foreign)
        if problems:
            if len(missing) == len(problems):  # only unknown names: 404, as for one
                raise type(missing[0])(
                    missing[0].detail if len(missing) == 1 else f"{len(missing)} names are not registered",
                    errors=problems,
                )
            count = f"{len(problems)} problems" if len(problems) > 1 else "a problem"
            raise InvalidRecipe(f"the composition request has {count}", errors=problems)
        assert base is not None and method is not None
        base_id = self.catalog.base_model_id(base.name)
        if request.fit is not None:
            # Fitting starts from uniform weights; the fitted ones are written at build time.
            chosen = [(b, 1.0 / len(chosen)) for b, _ in chosen]
        recipe = {
            "schema": RECIPE_SCHEMA,
            "composer_version": COMPOSER_VERSION,
            "base_model": {"name": base.name, "fingerprint": base.fingerprint},
            "bricks": [
                {
                    "name": b.name,
                    "version": b.version,
                    "sha256": b.sha256,
                    "config_sha256": b.config_sha256,
                    "weight": float(w),
                }
                for b, w in chosen
            ],
            "method": method.name,
            "params": params,
            "output": request.output,
            "rank": request.rank,
        }
        neurons = self._resolve_neurons(request, base.name, [b for b, _ in chosen])
        if neurons:  # absent otherwise, so recipes (and ids) without neuron operations are unchanged
            recipe["neurons"] = neurons
        self._check_roots(base.path)  # the roots may have changed since
        if request.fit is not None:
            require_tokenizer(self._base_files(base.path), base.name, base.path)
            recipe["fit"] = fit_section(request.fit)
        if plan:
            self._plan(recipe, self._base_dir(base.path, headers_only=True))
        return recipe, base_id

    def _resolve_neurons(
        self, request: ComposeRequest, base_model: str, chosen: list[domain.Brick]
    ) -> list[dict[str, Any]]:
        """The recipe's neuron operations: each emergent brick's exact version and sha256,
        and the index of the brick a ``restrict`` targets (None: every brick)."""
        resolved = []
        problems = []
        for index, choice in enumerate(request.neurons):
            name, _, version = choice.brick.partition("@")
            brick = self.catalog.get_brick(name, int(version) if version else None)
            where = f"neurons.{index}"
            if brick.kind != "emergent":
                problems.append(f"{where}: {brick.ref} is a {brick.kind} brick, not an emergent one")
            if brick.base_model != base_model:
                problems.append(f"{where}: {brick.ref} is a brick of base model {brick.base_model!r}")
            target = None
            if choice.target is not None:
                matches = [i for i, b in enumerate(chosen) if b.name == choice.target]
                if not matches:
                    problems.append(f"{where}: target {choice.target!r} is not a brick of this composition")
                else:
                    target = matches[0]
            resolved.append(
                {
                    "name": brick.name,
                    "version": brick.version,
                    "sha256": brick.sha256,
                    "op": choice.op,
                    "factor": choice.factor,
                    "target": target,
                }
            )
        if problems:
            raise InvalidRecipe("invalid neuron operations", errors=problems)
        return resolved

    def _neuron_ops(self, recipe: dict[str, Any]) -> list[Any]:
        from composer import NeuronOp

        ops = []
        for entry in recipe.get("neurons", ()):
            try:
                path = self.blobs.local_path(entry["sha256"])
            except FileNotFoundError:
                raise StorageCorrupt(
                    "stored files of some bricks are missing; run `brickyard fsck`",
                    errors=[f"{entry['name']}@{entry['version']}: blob missing"],
                ) from None
            ops.append(
                NeuronOp(f"{entry['name']}@{entry['version']}", entry["op"], path, entry["factor"], entry["target"])
            )
        return ops

    def _same_base(self, brick_base: str, base: domain.BaseModel) -> bool:
        """A brick fits every base model with the fingerprint of the one it was registered for
        (the same architecture, tensor names, dtypes and shapes: a copy, or the same model
        registered under another name)."""
        return brick_base == base.name or self.catalog.get_base_model(brick_base).fingerprint == base.fingerprint

    def _candidates(self, instruction: str, base_model: str, k: int) -> list[domain.SearchHit]:
        """The top-``k`` bricks for an instruction, among the bricks of every base model of
        ``base_model``'s fingerprint (they all fit it); with ``hide_bricks_not_beating_base``,
        bricks whose quality check found them no better than the base are passed over."""
        if not self.settings.compose.hide_bricks_not_beating_base:
            return self.search(
                SearchRequest(query=instruction, base_model=base_model, k=k, kind="lora", compatible=True)
            ).hits
        # Look further down the ranking so that k bricks remain after the filter.
        hits = self.search(
            SearchRequest(query=instruction, base_model=base_model, k=min(4 * k, 64), kind="lora", compatible=True)
        ).hits
        kept = [h for h in hits if not (h.brick.quality and h.brick.quality.get("beats_base") is False)]
        return kept[:k]

    def _chosen_by_instruction(
        self, request: ComposeRequest, base: domain.BaseModel
    ) -> list[tuple[domain.Brick, float]]:
        """The bricks an instruction finds and their weights (`registry.builds.instruction_weights`:
        a temperature on the similarities, bricks far behind the best dropped)."""
        assert request.instruction is not None
        hits = self._candidates(request.instruction, base.name, request.k)
        if not hits:
            raise InvalidRecipe(
                f"no brick of base model {base.name!r} matches the instruction",
                errors=["instruction: register bricks for this base model, or name bricks explicitly"],
            )
        if request.weights is not None:
            if len(request.weights) != len(hits):
                raise InvalidRecipe(
                    f"{len(request.weights)} weights given for {len(hits)} bricks found",
                    errors=[
                        f"weights: give {len(hits)} weights, in rank order: {', '.join(h.brick.ref for h in hits)}"
                    ],
                )
            return [(h.brick, w) for h, w in zip(hits, request.weights, strict=True)]
        weights = instruction_weights([h.similarity for h in hits])
        return [(h.brick, w) for h, w in zip(hits, weights, strict=True) if w > 0]

    def _brick_sources(self, recipe: dict[str, Any]) -> list[Any]:
        from composer import BrickSource

        sources = []
        missing = []
        for brick in recipe["bricks"]:
            ref = f"{brick['name']}@{brick['version']}"
            try:  # local files: the composer memory-maps them (an object store's are fetched once, verified)
                config = self.blobs.local_path(brick["config_sha256"])
                weights = self.blobs.local_path(brick["sha256"])
            except FileNotFoundError:
                missing.append(ref)
                continue
            sources.append(BrickSource(ref, config, weights, brick["weight"]))
        if missing:
            raise StorageCorrupt(
                "stored files of some bricks are missing; run `brickyard fsck`",
                errors=[f"{m}: blob missing" for m in missing],
            )
        return sources

    def _check_roots(self, path: str) -> None:
        """A local base model must lie inside the model roots (registry.storage.model_roots); one in
        object storage is read through Brickyard's own verified copy."""
        from registry.storage.s3_bases import is_s3_url

        if not is_s3_url(path):
            ModelRoots(self.settings).check_model(Path(path))

    def _pinned_base_dir(self, path: str, pins: ExitStack) -> Path:
        """The directory a build reads its base from: for a local base, the files checked
        against the model roots, pinned open until ``pins`` closes (registry.storage.model_roots:
        a symlink swapped after the check cannot redirect the build); for one in object
        storage, Brickyard's own verified copy."""
        from registry.storage.s3_bases import is_s3_url

        if is_s3_url(path):
            return self._base_dir(path)
        return pins.enter_context(ModelRoots(self.settings).pinned_model(Path(path)))

    def _base_dir(self, path: str, *, headers_only: bool = False) -> Path:
        """The local directory of a base model: a local copy of one in object storage, of every
        file for a build, of its config and headers only for planning (an API replica that
        only plans never downloads the weights)."""
        from registry.storage.s3_bases import base_model_dir, base_model_headers

        try:
            return (base_model_headers if headers_only else base_model_dir)(path, self.settings)
        except (OSError, ValueError) as exc:
            raise InvalidRecipe(f"cannot read the base model at {path}: {exc}") from None

    def _base_files(self, path: str) -> frozenset[str]:
        """Names of a base model's top-level files (one listing for one in object storage)."""
        from registry.storage.s3_bases import base_model_files

        try:
            return base_model_files(path, self.settings)
        except (OSError, ValueError) as exc:
            raise InvalidRecipe(f"cannot read the base model at {path}: {exc}") from None

    def _plan(self, recipe: dict[str, Any], base_path: Path) -> None:
        from composer import pattern_budget, plan_composition

        try:
            with composer_errors(into=InvalidRecipe), pattern_budget(self.settings.limits.pattern_seconds):
                plan_composition(
                    base_path,
                    self._brick_sources(recipe),
                    method=recipe["method"],
                    params=recipe["params"],
                    output=recipe["output"],
                    rank=recipe["rank"],
                    neurons=self._neuron_ops(recipe),
                )
        except OSError as exc:
            raise InvalidRecipe(f"cannot read the base model at {base_path}: {exc.strerror or exc}") from None

    def request(
        self, request: ComposeRequest | dict[str, Any], *, actor: str | None = None
    ) -> tuple[domain.Composition, bool]:
        """Resolve and queue a composition (once per recipe).

        Returns:
            (the composition, whether it is already built and ready to download).
        """
        recipe, base_id = self.resolve(request, plan=False)
        composition_id = recipe_id(recipe)
        # A recipe built before passed the composer's plan then: answering from the cache
        # skips re-planning, which rebuilds the base architecture on the meta device
        # (seconds for an 8B model). Any other request is planned before it is queued.
        built = self.store.get(composition_id)
        if built is None or built.status != READY or not self._complete(composition_id):
            base = self.catalog.get_base_model(recipe["base_model"]["name"])
            self._plan(recipe, self._base_dir(base.path, headers_only=True))
        while True:
            composition, _ = self.store.create(
                composition_id,
                recipe,
                base_model_id=base_id,
                output=recipe["output"],
                method=recipe["method"],
                actor=actor,
            )
            if composition.status != READY or self._complete(composition_id):
                break
            # The directory vanished (deleted by hand, evicted by another process): build it again.
            self.store.delete_ready(composition_id)
        return composition, composition.status == READY

    def get(self, composition_id: str) -> domain.Composition:
        """A composition (`CompositionNotFound` otherwise)."""
        composition = self.store.get(composition_id)
        if composition is None:
            raise CompositionNotFound(f"no composition {composition_id[:80]!r}", extra={"id": composition_id[:80]})
        return composition

    # -- files ---------------------------------------------------------------------------

    def directory(self, composition_id: str) -> Path:
        """The directory of a ready composition.

        Raises:
            CompositionNotFound: unknown id. Conflict: not built (yet).
        """
        self._ready(composition_id)
        path = self.root / composition_id
        if not self._complete(composition_id):
            raise StorageCorrupt(f"the files of composition {composition_id} are missing; request it again")
        self.store.touch(composition_id)
        return path

    def _ready(self, composition_id: str) -> None:
        composition = self.get(composition_id)
        if composition.status != READY:
            raise Conflict(
                f"composition {composition_id} is {composition.status}, not ready",
                errors=[composition.error] if composition.error else [],
                extra={"composition_status": composition.status, "progress": composition.progress},
            )

    def lease(self, composition_id: str, *, ttl_s: float = 300.0) -> DownloadLease:
        """Hold a ready composition for a download: eviction skips it until the lease is
        released or expires (renewed by `DownloadLease.keep_alive` while bytes flow).

        Raises:
            CompositionNotFound / Conflict / StorageCorrupt: as `directory`.
        """
        self.directory(composition_id)  # the errors of a composition that is not ready
        lease_id = self.store.lease(composition_id, ttl_s)
        if lease_id is None or not self._complete(composition_id):
            if lease_id is not None:
                self.store.release_lease(lease_id)
            raise CompositionNotFound(f"composition {composition_id} was evicted; request it again")
        return DownloadLease(self.store, lease_id, ttl_s)

    @contextmanager
    def download_lease(self, composition_id: str, *, ttl_s: float = 300.0) -> Iterator[DownloadLease]:
        """A lease (`lease`) held while a download's response is prepared: released if the
        block raises; otherwise the response takes it over and releases it when it ends
        (`DownloadLease.release` after the response, `DownloadLease.streaming` for streams).

        Raises:
            CompositionNotFound / Conflict / StorageCorrupt: as `lease`.
        """
        lease = self.lease(composition_id, ttl_s=ttl_s)
        try:
            yield lease
        except BaseException:
            lease.release()
            raise

    def _complete(self, composition_id: str) -> bool:
        if self.store.published_files(composition_id) is not None:
            return True  # the database is the source of truth; fsck checks the blobs
        return (self.root / composition_id / "brickyard.json").is_file()

    def published(self, composition_id: str) -> list[PublishedFile] | None:
        """The files of a ready composition published to the blob store, or None when its
        files are in the local directory (`directory`).

        Raises:
            CompositionNotFound: unknown id. Conflict: not built (yet).
        """
        self._ready(composition_id)
        rows = self.store.published_files(composition_id)
        if rows is None:
            return None
        self.store.touch(composition_id)
        return manifest_from_json(rows)

    def published_file(self, composition_id: str, relative: str) -> PublishedFile | None:
        """One published file of a ready composition, or None when its files are local.

        Raises:
            FileNotFound: a published composition without that file.
        """
        files = self.published(composition_id)
        if files is None:
            return None
        for file in files:
            if file.path == relative:
                return file
        raise FileNotFound(f"composition {composition_id} has no file {relative[:200]!r}")

    def open_file(self, composition_id: str, relative: str) -> BinaryIO:
        """Read one file of a ready composition, wherever it is stored."""
        stored = self.published_file(composition_id, relative)
        if stored is not None:
            return self.blobs.open(stored.sha256)
        return open(self.file(composition_id, relative), "rb")

    def files(self, composition_id: str) -> list[tuple[str, int]]:
        """(relative path, size) of every file of a ready composition."""
        published = self.published(composition_id)
        if published is not None:
            return [(f.path, f.size) for f in published]
        root = self.directory(composition_id)
        return [(p.relative_to(root).as_posix(), p.stat().st_size) for p in _walk(root)]

    def file(self, composition_id: str, relative: str) -> Path:
        """Local path of one file of a ready composition (never outside its directory)."""
        root = self.directory(composition_id).resolve()
        try:
            candidate = (root / relative).resolve()
            found = bool(relative) and candidate != root and root in candidate.parents and candidate.is_file()
        except (OSError, ValueError):  # a NUL byte, a name longer than the file system allows
            found = False
        if not found:
            raise FileNotFound(f"composition {composition_id} has no file {relative[:200]!r}")
        return candidate

    # -- builds --------------------------------------------------------------------------

    def build_claimed(self, composition: domain.Composition, worker: str) -> domain.Composition:
        """Build a composition this worker has claimed; record the outcome.

        Failures are recorded on the composition (status failed, error, error code); only
        an interruption (KeyboardInterrupt, SystemExit) propagates.
        """
        runner = self.runners.get(str(composition.recipe.get("job", "")))
        if runner is not None:
            return runner(composition, worker)
        from composer import ComposeError, compose, read_base_model

        recipe: dict[str, Any] = dict(composition.recipe)
        target = self.root / composition.id
        heartbeat = _Heartbeat(self.store, composition.id, worker)
        pins = ExitStack()
        try:
            base = self.catalog.get_base_model(recipe["base_model"]["name"])
            try:
                base_dir = self._pinned_base_dir(base.path, pins)
            except InvalidInput as exc:
                raise InvalidRecipe(exc.detail, errors=exc.errors) from None
            if read_base_model(base_dir).fingerprint() != recipe["base_model"]["fingerprint"]:
                raise InvalidRecipe(
                    f"the files of base model {base.name!r} at {base.path} changed since it was registered",
                    errors=["register the changed model under a new name"],
                )
            if target.exists():
                shutil.rmtree(target)  # a left-over that was never marked ready
            progress: Callable[[float, str], None] = heartbeat
            if "fit" in recipe:
                recipe = self._fit(composition.id, recipe, base_dir, heartbeat)
                progress = lambda fraction, message: heartbeat(  # noqa: E731
                    FIT_FRACTION + (1 - FIT_FRACTION) * fraction, message
                )
            result = compose(
                base_dir,
                self._brick_sources(recipe),
                target,
                method=recipe["method"],
                params=recipe["params"],
                output=recipe["output"],
                rank=recipe["rank"],
                recipe={"id": composition.id, **recipe},
                progress=progress,
                neurons=self._neuron_ops(recipe),
                # An adapter output names the registered base's directory, so PEFT's
                # AutoPeftModelForCausalLM loads it where it runs; the card names the base.
                base_name_or_path=base.path,
                card_base_model=base.name,
            )
            manifest = None
            if self.publishes:
                heartbeat(0.999, "uploading the output")
                manifest = manifest_to_json(publish_directory(self.blobs, target))
        except BuildCancelled:
            # Cancelled or deleted meanwhile: the composer removed its staging directory; a
            # directory published just before the cancel was seen goes too.
            log.info("composition %s: build stopped (%s)", composition.id, "cancelled")
            self._drop_unready_directory(composition.id)
            return self._current(composition)
        except ComposeError as exc:
            self.store.fail(composition.id, worker, str(exc), "invalid-recipe")
        except (InvalidRecipe, StorageCorrupt) as exc:
            self.store.fail(composition.id, worker, str(exc), exc.code)
        except ServiceUnavailable as exc:
            log.exception("composition %s failed on storage", composition.id)
            self.store.fail(composition.id, worker, str(exc), exc.code)
        except OSError as exc:
            log.exception("composition %s failed on I/O", composition.id)
            self.store.fail(composition.id, worker, f"I/O error: {exc}", "io-error")
        except Exception as exc:
            log.exception("composition %s failed", composition.id)
            self.store.fail(composition.id, worker, f"internal error: {type(exc).__name__}: {exc}", "internal")
        else:
            done = f"built in {result.seconds:.1f} s"
            if "fit" in recipe:
                fitted = ", ".join(f"{b['name']}@{b['version']}={b['weight']:.4g}" for b in recipe["bricks"])
                done = f"fitted weights {fitted} (loss {recipe['fit']['final_loss']:.4g}); {done}"
            try:
                finished = self._finish(composition.id, worker, result.total_bytes, done, manifest, target)
            except ServiceUnavailable as exc:  # fsck collected a published blob twice: fail, keep nothing
                self.store.fail(composition.id, worker, str(exc), exc.code)
                self._drop_unready_directory(composition.id)
                return self._current(composition)
            if finished:
                if manifest is not None:
                    shutil.rmtree(target, ignore_errors=True)  # published: the local copy was the build's
                self.evict_to_budget(keep=composition.id)
            else:  # cancelled (or deleted) while the last bytes were written: keep nothing
                self._drop_unready_directory(composition.id)
        finally:
            pins.close()  # the base's pinned files
        return self._current(composition)

    def _finish(
        self,
        composition_id: str,
        worker: str,
        size_bytes: int,
        message: str,
        manifest: list[dict[str, Any]] | None,
        target: Path,
    ) -> bool:
        """`CompositionStore.finish`, publishing once more when ``fsck --repair`` collected
        a blob the manifest deduplicated onto (an old orphan) before the row was written."""
        for attempt in range(2):

            def present(files: list[dict[str, Any]] | None = manifest) -> bool:
                return all(self.blobs.exists(str(f["sha256"])) for f in files or ())

            try:
                return self.store.finish(
                    composition_id, worker, size_bytes, message, files=manifest, blobs_present=present
                )
            except ServiceUnavailable:
                if manifest is None or attempt == 1:
                    raise
                log.warning(
                    "composition %s: published bytes were collected meanwhile; publishing again", composition_id
                )
                manifest = manifest_to_json(publish_directory(self.blobs, target))
        raise AssertionError("unreachable")

    # -- management: list, cancel, delete, names (issue #21) ------------------------------

    def _current(self, composition: domain.Composition) -> domain.Composition:
        """The composition as stored now; the given one marked deleted if its row is gone."""
        current = self.store.get(composition.id)
        if current is not None:
            return current
        from dataclasses import replace

        return replace(composition, status="deleted", message="deleted")

    def resolve_ref(self, ref: str) -> str:
        """The composition id of ``ref``: a 64-hex id, or a name given with `set_name`.

        Raises:
            CompositionNotFound: a name that points nowhere.
        """
        if _is_id(ref):
            return ref
        found = self.store.resolve_name(ref)
        if found is None:
            raise CompositionNotFound(
                f"no composition named {ref[:100]!r}",
                errors=["give a 64-hex composition id or a name set with `brickyard composition name`"],
                extra={"name": ref[:100]},
            )
        return found

    def describe(self, ref: str) -> domain.Composition:
        """A composition by id or name, with the names pointing at it."""
        from dataclasses import replace

        composition = self.get(self.resolve_ref(ref))
        return replace(composition, names=tuple(self.store.names_of([composition.id]).get(composition.id, [])))

    def list_page(
        self,
        *,
        base_model_id: int | None = None,
        brick: str | None = None,
        status: str | None = None,
        name: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> domain.Page[domain.Composition]:
        """A page of compositions, newest first, each with its names.

        Raises:
            InvalidInput: an unknown status or a limit outside 1..500.
        """
        from dataclasses import replace

        problems = []
        if status is not None and status not in STATUSES:
            problems.append(f"status: one of {', '.join(STATUSES)}")
        if not 1 <= limit <= 500:
            problems.append("limit: must be between 1 and 500")
        if problems:
            raise InvalidInput("invalid composition filter", errors=problems)
        items, next_cursor = self.store.list_page(
            base_model_id=base_model_id, brick=brick, status=status, name=name, cursor=cursor, limit=limit
        )
        names = self.store.names_of([c.id for c in items])
        return domain.Page(items=[replace(c, names=tuple(names.get(c.id, []))) for c in items], next_cursor=next_cursor)

    def cancel(self, ref: str, *, actor: str | None = None) -> domain.Composition:
        """Cancel a queued or running build. A running build stops at its next progress
        report (within about a second) and leaves no files; requesting the same recipe
        again queues it anew.

        Raises:
            CompositionNotFound: unknown id or name. Conflict: it is ready or failed already.
        """
        composition_id = self.resolve_ref(ref)
        if not self.store.cancel(composition_id, actor):
            current = self.get(composition_id)
            if current.status == CANCELLED:
                return current
            raise Conflict(
                f"composition {composition_id} is {current.status}: only queued or running builds can be cancelled",
                extra={"composition_status": current.status},
            )
        log.info("composition %s cancelled by %s", composition_id, actor or "anonymous")
        return self.get(composition_id)

    def delete(self, ref: str, *, actor: str | None = None) -> domain.Composition:
        """Delete a composition: cancel its build if one is queued or running, forget the row
        and its names, and remove its files.

        Downloads already under way finish: the directory is renamed away first, and a file
        a response has opened stays readable until it is closed (POSIX unlink semantics);
        a download that starts afterwards gets 404. (There are no download leases yet to
        defer the deletion itself.)

        Raises:
            CompositionNotFound: unknown id or name.
        """
        composition_id = self.resolve_ref(ref)
        self.get(composition_id)
        self.store.cancel(composition_id, actor)
        gone = self.store.delete(composition_id)
        if gone is None:  # claimed between the cancel and the delete: cancel once more
            self.store.cancel(composition_id, actor)
            gone = self.store.delete(composition_id)
        if gone is None:
            raise Conflict(f"composition {composition_id} changed while being deleted; try again")
        self._remove_directory(composition_id)
        log.info("composition %s deleted by %s", composition_id, actor or "anonymous")
        return gone

    def set_name(self, name: str, ref: str, *, actor: str | None = None) -> domain.Composition:
        """Point ``name`` at a composition (by id or by another name); moves an existing name.

        Raises:
            InvalidInput: the name is malformed or looks like an id. CompositionNotFound: no target.
        """
        import re

        from registry.inputs import NAME_PATTERN

        if not re.match(NAME_PATTERN, name) or _is_id(name):
            raise InvalidInput(
                f"invalid composition name {name[:100]!r}",
                errors=["name: 1-100 ASCII letters, digits, '.', '_' or '-', and not a 64-hex id"],
            )
        composition_id = self.resolve_ref(ref)
        self.get(composition_id)
        self.store.set_name(name, composition_id, actor)
        return self.describe(composition_id)

    def remove_name(self, name: str) -> str:
        """Remove a composition name; returns the id it pointed at (`CompositionNotFound` otherwise)."""
        composition_id = self.store.remove_name(name)
        if composition_id is None:
            raise CompositionNotFound(f"no composition named {name[:100]!r}", extra={"name": name[:100]})
        return composition_id

    def _remove_directory(self, composition_id: str) -> None:
        import uuid

        path = self.root / composition_id
        trash = self.root / f".{composition_id}.deleted-{uuid.uuid4().hex[:12]}"
        try:
            path.rename(trash)  # atomic: no reader sees a half-removed directory
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _drop_unready_directory(self, composition_id: str) -> None:
        current = self.store.get(composition_id)
        if current is None or current.status != READY:
            self._remove_directory(composition_id)

    def _fit(
        self, composition_id: str, recipe: dict[str, Any], base_path: Path, progress: Callable[[float, str], None]
    ) -> dict[str, Any]:
        """The recipe with fitted weights (see `registry.builds.fitting`)."""
        import tempfile

        sources = self._brick_sources(recipe)
        # Named like a build's staging directory, so that `recover` removes it after a crash.
        with tempfile.TemporaryDirectory(prefix=f".{composition_id}.composing-fit-", dir=self.root) as scratch:
            return fit_recipe(
                recipe, base_path, [(s.config_path, s.weights_path) for s in sources], progress, scratch=Path(scratch)
            )

    def evict_to_budget(self, *, keep: str | None = None) -> list[str]:
        """Delete least recently used ready compositions until the cache fits its budget."""
        budget = self.settings.compose.cache_bytes
        entries = self.store.ready_by_age()
        total = sum(size for _, size in entries)
        evicted = []
        for composition_id, size in entries:
            if total <= budget:
                break
            if composition_id == keep:
                continue
            published = self.store.published_files(composition_id)
            # A composition being downloaded is kept (its lease), even over the budget.
            if self.store.delete_ready_unleased(composition_id):
                shutil.rmtree(self.root / composition_id, ignore_errors=True)
                if published is not None:
                    self._delete_unused_blobs(manifest_from_json(published))
                total -= size
                evicted.append(composition_id)
                log.info("evicted composition %s (%d bytes) to stay within the cache budget", composition_id, size)
                self.report_eviction(composition_id, size)
        return evicted

    def report_eviction(self, composition_id: str, size: int) -> None:
        """Tell the eviction listeners; a build child's evictions are reported by its parent."""
        for listener in list(self.eviction_listeners):
            try:
                listener(composition_id, size)
            except Exception:  # a listener must not stop the eviction loop or the build
                log.exception("an eviction listener failed")

    def _delete_unused_blobs(self, files: list[PublishedFile]) -> None:
        """Delete the blobs of an evicted composition that no brick and no other composition
        uses (a digest is shared when two outputs, or an output and a brick, are identical)."""
        in_use = set(self.store.published_digests())
        for digests in self.catalog.blob_references().values():
            in_use.update(digests)
        for file in files:
            if file.sha256 not in in_use:
                self.blobs.delete(file.sha256)

    def recover(self, is_alive: Callable[[str], bool]) -> list[str]:
        """Fail running builds whose worker is gone (``is_alive(worker)`` False) or silent
        past the heartbeat timeout, and remove half-built directories. Returns their ids."""
        from registry.db.models import as_utc, utcnow

        timeout = self.settings.compose.heartbeat_timeout_s
        now = utcnow()
        failed = []
        for composition_id, worker, heartbeat in self.store.running():
            silent = heartbeat is None or (now - as_utc(heartbeat)).total_seconds() > timeout
            if (worker is not None and not is_alive(worker)) or silent:
                reason = "the build was interrupted (its worker stopped); request the composition again to retry"
                if self.store.fail(composition_id, worker, reason, "interrupted"):
                    failed.append(composition_id)
        active = {cid for cid, _, _ in self.store.running()}
        for leftover in self.root.glob(".*.composing-*"):
            if leftover.name[1:65] not in active:
                shutil.rmtree(leftover, ignore_errors=True)
        return failed


def _with_param_hints(problems: list[str], known: list[str]) -> list[str]:
    """``params.densty: Extra inputs are not permitted`` gets a did-you-mean for ``density``."""
    hinted = []
    for problem in problems:
        field, sep, _ = problem.partition(":")
        name = field.removeprefix("params.")
        if sep and field.startswith("params.") and "Extra inputs" in problem:
            problem += did_you_mean(name, known) or f" (parameters: {', '.join(known) or 'none'})"
        hinted.append(problem)
    return hinted


def _is_id(ref: str) -> bool:
    return len(ref) == 64 and all(c in "0123456789abcdef" for c in ref)


def _walk(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


class DownloadLease:
    """A download's hold on a composition (see `Compositions.lease`)."""

    def __init__(self, store: CompositionStore, lease_id: int, ttl_s: float) -> None:
        import time

        self.store = store
        self.lease_id = lease_id
        self.ttl_s = ttl_s
        self._renewed = time.monotonic()
        self._released = False

    def keep_alive(self) -> None:
        """Renew the lease when a fifth of its time has passed (cheap to call per chunk)."""
        import time

        now = time.monotonic()
        if now - self._renewed > self.ttl_s / 5:
            self.store.renew_lease(self.lease_id, self.ttl_s)
            self._renewed = now

    def streaming(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """``chunks``, renewing the lease while they flow and releasing it at the end, also
        when the client goes away (the generator is closed)."""
        try:
            for chunk in chunks:
                self.keep_alive()
                yield chunk
        finally:
            self.release()

    def release(self) -> None:
        """End the hold (idempotent)."""
        if not self._released:
            self._released = True
            self.store.release_lease(self.lease_id)


class BuildCancelled(Exception):
    """Raised from the progress callback when a build lost its claim (cancelled, deleted or
    taken over): it unwinds the composer, which removes its staging directory."""


class _Heartbeat:
    """Progress callback: writes progress to the database at most twice a second, and stops
    the build (`BuildCancelled`) once the row says it is no longer this worker's to run."""

    def __init__(self, store: CompositionStore, composition_id: str, worker: str) -> None:
        self.store = store
        self.composition_id = composition_id
        self.worker = worker
        self.last = -1.0

    def __call__(self, fraction: float, message: str) -> None:
        import time

        now = time.monotonic()
        if fraction < 1.0 and now - self.last < 0.5:
            return
        self.last = now
        if not self.store.heartbeat(self.composition_id, self.worker, min(fraction, 0.999), message):
            raise BuildCancelled(self.composition_id)


def worker_name(index: int) -> str:
    """``host:pid:index``: lets a restarted server tell its dead builds from live ones."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}:{index}"


def worker_alive(worker: str) -> bool:
    """Whether a worker named by `worker_name` can still be running (conservative: workers
    of other hosts are presumed alive and left to the heartbeat timeout)."""
    import socket

    host, _, rest = worker.partition(":")
    pid_text = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ += ["CANCELLED", "FAILED", "QUEUED", "RUNNING", "BuildCancelled", "worker_alive", "worker_name"]
