"""From a parsed ``model`` to a `Target`: the base model, the adapter, and what was used.

``auto`` searches the query among the base's bricks (``min_score``, ``k``, optional candidate
list), weighs the hits by the compositions' documented rule (`instruction_weights`), and asks
`Compositions` for a linear ``adapter`` recipe: exact concatenation when the summed rank fits
``serve.max_lora_rank``, truncated to it otherwise. The recipe is hashed and cached like any
composition; a new one is built by the worker pool while the request waits.

Routing a message is search + a recipe lookup. Resolving a recipe reads every brick row,
checks the base's files against the model roots, hashes the recipe and reads the
composition's rows (about 60% of a cached ``auto`` request, profiled), yet its answer only
depends on the base's fingerprint, the (immutable) brick versions, the weights and the
options. So the router remembers, per such plan, the composition that serves it (`_Plans`): a
repeated plan costs a file check, and is verified again through the compositions at most
every ``_PLAN_RECHECK_S`` (which also keeps its LRU-eviction clock fresh).

A ``<brick>@<version>`` is remembered the same way (`_Bricks`): the version and its base are
read again only when the catalog's brick generation moved (every brick register, metadata
change and delete raises it, in any process), so a repeated request costs one counter read
instead of two rows and a directory check.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import domain
from registry.builds.instruction_weights import instruction_weights
from registry.errors import (
    BaseModelNotFound,
    BrickNotFound,
    CompositionNotFound,
    InvalidInput,
    InvalidRecipe,
    ServiceUnavailable,
)
from registry.inputs import SearchRequest
from registry.serve.modelref import ModelRef, parse_model
from registry.serve.protocol import RoutingOptions
from registry.storage.composition_store import FAILED, READY

if TYPE_CHECKING:
    from registry.service import Registry

__all__ = ["Adapter", "Router", "Target"]

_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_MARKER = "brickyard.json"  # written last into a built composition's directory
# A cached plan is re-verified through the compositions (rows, files, LRU touch) this often;
# eviction ranks by that touch, so a composition in use is never older than this there.
_PLAN_RECHECK_S = 30.0
_PLAN_ENTRIES = 1024


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter an engine loads: ``key`` names it (``name@version`` or a composition id,
    what vLLM's resolver accepts), ``path`` is a local PEFT directory."""

    key: str
    path: Path


@dataclass(frozen=True)
class Target:
    """What a request is generated with, and the record of it returned to the client."""

    base: domain.BaseModel
    adapter: Adapter | None
    used: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    """A resolved ``auto`` plan: the ready composition serving it."""

    composition_id: str
    path: Path
    bricks: tuple[tuple[str, int, float], ...]  # (name, version, weight), as in the recipe
    checked_at: float
    local: bool  # its files are in ``path`` (else published to the blob store)


class _Plans:
    """A bounded LRU of plans, shared by the request threads."""

    def __init__(self, entries: int = _PLAN_ENTRIES) -> None:
        self._entries: OrderedDict[str, _Plan] = OrderedDict()
        self._limit = entries
        self._lock = threading.Lock()

    def get(self, key: str) -> _Plan | None:
        """The plan of ``key`` if it was verified less than ``_PLAN_RECHECK_S`` ago and its
        directory is still there (eviction removes it)."""
        with self._lock:
            plan = self._entries.get(key)
            if plan is None:
                return None
            if time.monotonic() - plan.checked_at > _PLAN_RECHECK_S or (
                plan.local and not (plan.path / _MARKER).is_file()
            ):
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return plan

    def put(self, key: str, plan: _Plan) -> None:
        """Remember a verified plan."""
        with self._lock:
            self._entries[key] = plan
            self._entries.move_to_end(key)
            while len(self._entries) > self._limit:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every plan (a brick was deleted)."""
        with self._lock:
            self._entries.clear()


class _Bricks:
    """``(name, version)`` -> (brick, base model), valid at one brick generation."""

    def __init__(self, entries: int = _PLAN_ENTRIES) -> None:
        self._entries: dict[tuple[str, int], tuple[domain.Brick, domain.BaseModel]] = {}
        self._generation = -1
        self._limit = entries
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int], generation: int) -> tuple[domain.Brick, domain.BaseModel] | None:
        """The entry of ``key`` if it was read at ``generation``."""
        with self._lock:
            if generation != self._generation:
                return None
            return self._entries.get(key)

    def put(self, key: tuple[str, int], value: tuple[domain.Brick, domain.BaseModel], generation: int) -> None:
        """Remember ``value``, read after ``generation`` was: a newer generation drops the rest."""
        with self._lock:
            if generation != self._generation or len(self._entries) >= self._limit:
                self._entries.clear()
                self._generation = generation
            self._entries[key] = value

    def clear(self) -> None:
        """Forget every brick (a brick was deleted)."""
        with self._lock:
            self._entries.clear()
            self._generation = -1


class Router:
    """Resolves ``model`` strings against the registry.

    Args:
        registry: the catalog, search and compositions.
        wake_builds: called after a new composition is queued (the server's worker pool);
            None: no pool runs (the CLI without a server), so the waiting request builds it.
    """

    def __init__(self, registry: Registry, wake_builds: Callable[[], None] | None = None) -> None:
        self.registry = registry
        self.settings = registry.settings.serve
        self.wake_builds = wake_builds
        self._links = registry.settings.serve_dir / "bricks"
        self._plans = _Plans()
        self._bricks = _Bricks()

    def forget(self) -> None:
        """Drop the cached plans and bricks (after a deletion: the next request re-verifies)."""
        self._plans.clear()
        self._bricks.clear()

    def route(self, model: str, query: str | None, options: RoutingOptions) -> Target:
        """The target of a request.

        Raises:
            InvalidInput: bad ``model`` grammar or options. BaseModelNotFound / BrickNotFound /
            CompositionNotFound: unknown (or deleted) names. InvalidRecipe: a composition that is
            not an adapter, or a recipe the composer refuses. ServiceUnavailable: a build that
            did not finish in ``serve.compose_timeout_s``.
        """
        ref = parse_model(model)
        if ref.kind == "auto":
            return self._auto(ref, model, query, options)
        if ref.kind == "composition":
            return self._composition(model)
        if ref.kind == "name":
            try:
                base = self.registry.get_base_model(model)
            except BaseModelNotFound:
                pass
            else:
                return Target(base, None, {"model": model, "base_model": base.name, "bricks": [], "recipe_id": None})
        return self._brick(ref, model)

    # -- one kind each ---------------------------------------------------------------------

    def _brick(self, ref: ModelRef, model: str) -> Target:
        assert ref.name is not None
        # Only a pinned version is remembered: a plain name may become a base model's (base
        # registrations do not move the brick generation).
        key = (ref.name, ref.version) if ref.version is not None else None
        generation = self.registry.brick_generation() if key is not None else -1
        found = self._bricks.get(key, generation) if key is not None else None
        if found is not None:
            brick, base = found
        else:
            try:
                brick = self.registry.get_brick(ref.name, ref.version)
            except BrickNotFound:
                raise BrickNotFound(
                    f"no model {model!r}: not a base model, brick or composition",
                    errors=["model: see GET /v1/models"],
                ) from None
            base = self.registry.get_base_model(brick.base_model)
            if key is not None:
                self._bricks.put(key, (brick, base), generation)
        used = {
            "model": model,
            "base_model": base.name,
            "bricks": [{"name": brick.name, "version": brick.version, "weight": 1.0, "score": None}],
            "recipe_id": None,
        }
        return Target(base, Adapter(brick.ref, self._brick_dir(brick)), used)

    def _composition(self, composition_id: str) -> Target:
        composition = self.registry.compositions.get(composition_id)
        if composition.output != "adapter":
            raise InvalidRecipe(
                f"composition {composition_id} is a full model, not an adapter; serve compositions built "
                "with output 'adapter'",
                errors=["model: request the composition with output 'adapter'"],
            )
        return self._ready(composition, model=composition_id, scores=None)

    def _auto(self, ref: ModelRef, model: str, query: str | None, options: RoutingOptions) -> Target:
        base = self._auto_base(ref.name)
        used: dict[str, Any] = {"model": model, "base_model": base.name, "bricks": [], "recipe_id": None}
        if query is None:
            return Target(base, None, {**used, "note": "no user message to route on: the base model answered"})
        min_score = self.settings.min_score if options.min_score is None else options.min_score
        wanted = self._candidates(options.bricks)
        search = SearchRequest(
            query=query, base_model=base.name, k=100 if wanted else options.k, min_score=min_score, kind="lora"
        )
        hits = [h for h in self.registry.search(search).hits if _allowed(h.brick, wanted)][: options.k]
        if not hits:
            note = f"no brick of {base.name!r} scored above {min_score:g}: the base model answered"
            return Target(base, None, {**used, "note": note})
        # The compositions' documented rule (registry.builds.instruction_weights): a temperature on the
        # similarities; bricks far behind the best one are dropped.
        weighted = [
            (h, w) for h, w in zip(hits, instruction_weights([h.similarity for h in hits]), strict=True) if w > 0
        ]
        hits, weights = [h for h, _ in weighted], [w for _, w in weighted]
        summed = sum(_max_rank(h.brick) for h in hits)
        rank = self.settings.max_lora_rank if summed > self.settings.max_lora_rank else None
        request: dict[str, Any] = {
            "base_model": base.name,
            "bricks": [
                {"name": h.brick.name, "version": h.brick.version, "weight": w}
                for h, w in zip(hits, weights, strict=True)
            ],
            "method": options.method,
            "output": "adapter",
        }
        if rank is not None:
            request["rank"] = rank
        scores = {h.brick.ref: h.score for h in hits}
        # The recipe is a function of the base's identity, the brick versions (immutable), the
        # weights and the options: that is the plan's key.
        key = json.dumps([base.name, base.fingerprint, base.path, request], sort_keys=True)
        plan = self._plans.get(key)
        if plan is None:
            composition, ready = self.registry.compositions.request(request, actor="serve")
            if not ready:
                self._build(composition.id)
            composition = self._wait_ready(composition)
            path = self.registry.compositions.directory(composition.id)
            recipe: dict[str, Any] = dict(composition.recipe)
            recipe_bricks = tuple((b["name"], int(b["version"]), b["weight"]) for b in recipe["bricks"])
            plan = _Plan(composition.id, path, recipe_bricks, time.monotonic(), (path / _MARKER).is_file())
            self._plans.put(key, plan)
        target = self._target(base, plan.composition_id, plan.path, plan.bricks, model=model, scores=scores)
        if rank is not None:
            target.used["truncated_rank"] = rank
        return target

    # -- helpers ----------------------------------------------------------------------------

    def _build(self, composition_id: str) -> None:
        if self.wake_builds is not None:
            self.wake_builds()
            return
        from registry.builds.compositions import worker_name

        worker = f"{worker_name(0)}:serve"
        claimed = self.registry.compositions.store.claim(composition_id, worker)
        if claimed is not None:  # else another process builds it: wait for it below
            self.registry.compositions.build_claimed(claimed, worker)

    def _auto_base(self, name: str | None) -> domain.BaseModel:
        if name is not None:
            return self.registry.get_base_model(name)
        bases = self.registry.list_base_models()
        if len(bases) != 1:
            raise InvalidInput(
                f"model 'auto' needs a base model: {len(bases)} are registered",
                errors=["model: use auto:<base>, one of " + ", ".join(b.name for b in bases)],
            )
        return bases[0]

    def _candidates(self, names: list[str] | None) -> set[str] | None:
        if not names:
            return None
        for name in names:  # unknown names are an error, not an empty candidate list
            ref = parse_model(name)
            if ref.kind not in ("name", "brick") or ref.name is None:
                raise InvalidInput(f"brickyard.bricks: {name!r} is not a brick reference")
            self.registry.get_brick(ref.name, ref.version)
        return set(names)

    def _ready(self, composition: domain.Composition, *, model: str, scores: dict[str, float] | None) -> Target:
        """Wait for a composition to be built; the target serving it."""
        composition = self._wait_ready(composition)
        recipe: dict[str, Any] = dict(composition.recipe)
        base = self.registry.get_base_model(recipe["base_model"]["name"])
        bricks = tuple((b["name"], int(b["version"]), b["weight"]) for b in recipe["bricks"])
        path = self.registry.compositions.directory(composition.id)
        return self._target(base, composition.id, path, bricks, model=model, scores=scores)

    @staticmethod
    def _target(
        base: domain.BaseModel,
        composition_id: str,
        path: Path,
        bricks: tuple[tuple[str, int, float], ...],
        *,
        model: str,
        scores: dict[str, float] | None,
    ) -> Target:
        used = {
            "model": model,
            "base_model": base.name,
            "bricks": [
                {
                    "name": name,
                    "version": version,
                    "weight": weight,
                    "score": None if scores is None else scores.get(f"{name}@{version}"),
                }
                for name, version, weight in bricks
            ],
            "recipe_id": composition_id,
        }
        return Target(base, Adapter(composition_id, path), used)

    def _wait_ready(self, composition: domain.Composition) -> domain.Composition:
        """The composition once built (polling its row)."""
        store = self.registry.compositions.store
        deadline = time.monotonic() + self.settings.compose_timeout_s
        while composition.status != READY:
            if composition.status == FAILED:
                raise InvalidRecipe(
                    f"composition {composition.id} failed: {composition.error}", errors=[composition.error or ""]
                )
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"composition {composition.id} is still being built; try again")
            time.sleep(0.05)
            found = store.get(composition.id)
            if found is None:
                raise CompositionNotFound(f"composition {composition.id} vanished while being built")
            composition = found
        return composition

    def _brick_dir(self, brick: domain.Brick) -> Path:
        """A PEFT directory for a brick: links to its blobs (written once, atomically)."""
        directory = self._links / f"{brick.ref}-{brick.sha256[:16]}"
        if (directory / _WEIGHTS).exists():
            return directory
        staging = directory.with_name(f".{directory.name}.{os.getpid()}.{time.monotonic_ns()}")
        staging.mkdir(parents=True)
        for filename in (_CONFIG, _WEIGHTS):
            file = self.registry.brick_file(brick.name, brick.version, filename)  # checked against its sha256
            (staging / filename).symlink_to(self.registry.blobs.local_path(file.sha256).resolve())
        try:
            staging.rename(directory)
        except OSError:  # another request made it first
            for child in staging.iterdir():
                child.unlink()
            staging.rmdir()
        return directory


def _allowed(brick: domain.Brick, wanted: set[str] | None) -> bool:
    return wanted is None or brick.name in wanted or brick.ref in wanted


def _max_rank(brick: domain.Brick) -> int:
    return max([brick.rank, *brick.rank_pattern.values()])
