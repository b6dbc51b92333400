"""Compositions as a service: resolve a request into a recipe, queue it, build it with the
composer, serve the result, and keep the cache within its budget.

A *recipe* is the fully resolved request: the base model (name and fingerprint), each
brick's exact version with the sha256 of its weights and config, the weights, the merge
method with every parameter (defaults filled in), the output kind and rank, and the
composer version. Its canonical JSON's sha256 is the composition id, so identical
requests, however phrased, share one build and one cached result.

With an instruction instead of named bricks, the top-``k`` compatible bricks from search
are used; unless ``weights`` are given, brick i gets ``softmax(score)_i`` over those k
(weights summing to 1: a convex combination of the deltas, so the merged delta stays on
the scale of one brick, and a clearly better match dominates).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import domain
from registry.composer_errors import composer_errors
from registry.composition_store import FAILED, READY, RUNNING, CompositionStore
from registry.errors import (
    CompositionNotFound,
    Conflict,
    FileNotFound,
    IncompatibleBrick,
    InvalidRecipe,
    StorageCorrupt,
)
from registry.inputs import ComposeRequest, SearchRequest, parse_json_model

if TYPE_CHECKING:
    from registry.blobs import BlobStore
    from registry.settings import Settings
    from registry.store import Store

__all__ = ["Compositions", "instruction_weights", "recipe_id", "softmax_weights"]

log = logging.getLogger("brickyard.compositions")

RECIPE_SCHEMA = 1


def canonical_json(document: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, shortest float repr."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def recipe_id(recipe: dict[str, Any]) -> str:
    """The composition id: sha256 of the canonical recipe."""
    return hashlib.sha256(canonical_json(recipe)).hexdigest()


def softmax_weights(scores: list[float]) -> list[float]:
    """``softmax(scores)``: the weights given to bricks found by an instruction."""
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def instruction_weights(hits: list[domain.SearchHit]) -> list[float]:
    """The documented score rule: the weights of bricks found by an instruction, in rank order
    (also used by ``auto`` serving, so both pick weights the same way)."""
    return softmax_weights([h.score for h in hits])


class Compositions:
    """Use cases of compositions; builds run through `build_claimed` (worker or local)."""

    def __init__(
        self,
        catalog: Store,
        blobs: BlobStore,
        settings: Settings,
        *,
        search: Callable[[SearchRequest], domain.SearchResult],
    ) -> None:
        """``catalog`` holds the base models and bricks a request names, ``blobs`` their bytes,
        ``search`` finds bricks for an instruction; compositions live in their own store
        (`CompositionStore`, on the catalog's database) and under ``settings.compositions_dir``."""
        self.catalog = catalog
        self.blobs = blobs
        self.settings = settings
        self.search = search
        self.store = CompositionStore(catalog.db)
        self.root = settings.compositions_dir
        self.root.mkdir(parents=True, exist_ok=True)

    # -- requests ------------------------------------------------------------------------

    def resolve(self, request: ComposeRequest | dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Resolve a request into its recipe (and the base model's row id), validating it
        completely (bricks, compatibility, method parameters) before anything is queued.

        Raises:
            InvalidInput: malformed request. BaseModelNotFound / BrickNotFound: unknown names.
            IncompatibleBrick: bricks of another base model (all listed).
            InvalidRecipe: the composer refuses the recipe (every problem listed).
        """
        if not isinstance(request, ComposeRequest):
            request = parse_json_model(ComposeRequest, dict(request), what="composition")
        base = self.catalog.get_base_model(request.base_model)
        base_id = self.catalog.base_model_id(base.name)
        if request.instruction is not None:
            hits = self.search(SearchRequest(query=request.instruction, base_model=base.name, k=request.k)).hits
            if not hits:
                raise InvalidRecipe(
                    f"no brick of base model {base.name!r} matches the instruction",
                    errors=["instruction: register bricks for this base model, or name bricks explicitly"],
                )
            if request.weights is not None and len(request.weights) != len(hits):
                raise InvalidRecipe(
                    f"{len(request.weights)} weights given for {len(hits)} bricks found",
                    errors=[
                        f"weights: give {len(hits)} weights, in rank order: {', '.join(h.brick.ref for h in hits)}"
                    ],
                )
            weights = request.weights or instruction_weights(hits)
            chosen = [(h.brick, w) for h, w in zip(hits, weights, strict=True)]
        else:
            assert request.bricks is not None
            chosen = []
            for choice in request.bricks:
                chosen.append((self.catalog.get_brick(choice.name, choice.version), choice.weight))
            foreign = [b for b, _ in chosen if b.base_model != base.name]
            if foreign:
                raise IncompatibleBrick(
                    f"{len(foreign)} of the bricks were trained on another base model than {base.name!r}",
                    errors=[f"{b.ref} is a brick of base model {b.base_model!r}" for b in foreign],
                    extra={
                        "bricks": [{"name": b.name, "version": b.version, "base_model": b.base_model} for b in foreign]
                    },
                )
        from composer import COMPOSER_VERSION, get_method

        with composer_errors(into=InvalidRecipe):
            method = get_method(request.method)
        with composer_errors(into=InvalidRecipe, field="params"):
            params = method.validate_params(request.params).model_dump(mode="json")
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
        self._plan(recipe, Path(base.path))
        return recipe, base_id

    def _brick_sources(self, recipe: dict[str, Any]) -> list[Any]:
        from composer import BrickSource

        sources = []
        missing = []
        for brick in recipe["bricks"]:
            config = self.blobs.path(brick["config_sha256"])
            weights = self.blobs.path(brick["sha256"])
            if not (config.exists() and weights.exists()):
                missing.append(f"{brick['name']}@{brick['version']}")
            sources.append(BrickSource(f"{brick['name']}@{brick['version']}", config, weights, brick["weight"]))
        if missing:
            raise StorageCorrupt(
                "stored files of some bricks are missing; run `brickyard fsck`",
                errors=[f"{m}: blob missing" for m in missing],
            )
        return sources

    def _plan(self, recipe: dict[str, Any], base_path: Path) -> None:
        from composer import plan_composition

        try:
            with composer_errors(into=InvalidRecipe):
                plan_composition(
                    base_path,
                    self._brick_sources(recipe),
                    method=recipe["method"],
                    params=recipe["params"],
                    output=recipe["output"],
                    rank=recipe["rank"],
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
        recipe, base_id = self.resolve(request)
        composition_id = recipe_id(recipe)
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
        composition = self.get(composition_id)
        if composition.status != READY:
            raise Conflict(
                f"composition {composition_id} is {composition.status}, not ready",
                errors=[composition.error] if composition.error else [],
                extra={"composition_status": composition.status, "progress": composition.progress},
            )
        path = self.root / composition_id
        if not self._complete(composition_id):
            raise StorageCorrupt(f"the files of composition {composition_id} are missing; request it again")
        self.store.touch(composition_id)
        return path

    def _complete(self, composition_id: str) -> bool:
        return (self.root / composition_id / "brickyard.json").is_file()

    def files(self, composition_id: str) -> list[tuple[str, int]]:
        """(relative path, size) of every file of a ready composition."""
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
        from composer import ComposeError, compose, read_base_model

        recipe: dict[str, Any] = dict(composition.recipe)
        target = self.root / composition.id
        heartbeat = _Heartbeat(self.store, composition.id, worker)
        try:
            base = self.catalog.get_base_model(recipe["base_model"]["name"])
            if read_base_model(Path(base.path)).fingerprint() != recipe["base_model"]["fingerprint"]:
                raise InvalidRecipe(
                    f"the files of base model {base.name!r} at {base.path} changed since it was registered",
                    errors=["register the changed model under a new name"],
                )
            if target.exists():
                shutil.rmtree(target)  # a left-over that was never marked ready
            result = compose(
                Path(base.path),
                self._brick_sources(recipe),
                target,
                method=recipe["method"],
                params=recipe["params"],
                output=recipe["output"],
                rank=recipe["rank"],
                recipe={"id": composition.id, **recipe},
                progress=heartbeat,
            )
        except ComposeError as exc:
            self.store.fail(composition.id, worker, str(exc), "invalid-recipe")
        except (InvalidRecipe, StorageCorrupt) as exc:
            self.store.fail(composition.id, worker, str(exc), exc.code)
        except OSError as exc:
            log.exception("composition %s failed on I/O", composition.id)
            self.store.fail(composition.id, worker, f"I/O error: {exc}", "io-error")
        except Exception as exc:
            log.exception("composition %s failed", composition.id)
            self.store.fail(composition.id, worker, f"internal error: {type(exc).__name__}: {exc}", "internal")
        else:
            self.store.finish(composition.id, worker, result.total_bytes, f"built in {result.seconds:.1f} s")
            self.evict_to_budget(keep=composition.id)
        return self.get(composition.id)

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
            if self.store.delete_ready(composition_id):
                shutil.rmtree(self.root / composition_id, ignore_errors=True)
                total -= size
                evicted.append(composition_id)
                log.info("evicted composition %s (%d bytes) to stay within the cache budget", composition_id, size)
        return evicted

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


def _walk(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


class _Heartbeat:
    """Progress callback: writes progress to the database at most twice a second."""

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
        self.store.heartbeat(self.composition_id, self.worker, min(fraction, 0.999), message)


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


__all__ += ["FAILED", "RUNNING", "worker_alive", "worker_name"]
