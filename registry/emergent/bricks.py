"""`EmergentBricks`: queue a discovery, run it on a composition worker, register its bricks.

A discovery is a row of the composition queue whose recipe carries ``"job": "emergent-discovery"``
(the request resolved: base model and fingerprint, the probe sets' blob, method with every
parameter, split and seed). Its id is the recipe's hash, like a composition's, so the same
request is run once; workers claim it like a build, progress and heartbeats go to the same
row, and a build process that dies is recovered the same way. The probe texts live in the blob
store (one JSON blob), not in the queue row.

Each function's neuron set becomes a brick of kind ``emergent`` named after its probe set:
the neuron file (`composer.save_neuron_set`, safetensors) is its one blob, used as both
``sha256`` and ``config_sha256`` so fsck and garbage collection treat it like adapter bytes;
method, parameters, probe hashes, statistics sizes and the verification table are the row's
``emergent`` JSON.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import domain
from registry.builds.compositions import canonical_json, recipe_id
from registry.composer_errors import composer_errors
from registry.emergent.discovery import FunctionProbe, discover, probe_hash
from registry.emergent.requests import DiscoveryRequest
from registry.errors import BrickExists, BrickNotFound, InvalidInput, InvalidRecipe, StorageCorrupt
from registry.inputs import parse_json_model
from registry.storage.composition_store import READY

if TYPE_CHECKING:
    from registry.builds.compositions import Compositions
    from registry.search.index_rows import EmbeddedTexts
    from registry.storage.blobs import BlobStore
    from registry.storage.store import Store

__all__ = ["DISCOVERY_JOB", "NEURONS_FILENAME", "EmergentBricks"]

log = logging.getLogger("brickyard.emergent")

DISCOVERY_JOB = "emergent-discovery"
NEURONS_FILENAME = "neurons.safetensors"
_JOB_SCHEMA = 1
_EXAMPLES_KEPT = 8  # probe texts kept as the brick's examples (searchable, shown)
_MAX_PROBE_BYTES = 16 << 20


class _Stopped(Exception):
    """The worker lost the job (recovered as interrupted, or claimed by another): stop quietly."""


class EmergentBricks:
    """Discovery jobs and the emergent bricks they register."""

    def __init__(
        self,
        catalog: Store,
        blobs: BlobStore,
        compositions: Compositions,
        *,
        embed: Callable[[str, tuple[str, ...]], EmbeddedTexts],
    ) -> None:
        """``catalog`` holds base models and bricks, ``blobs`` the probe sets and neuron files,
        ``compositions`` is the job queue (this object registers itself as the runner of
        discovery jobs), ``embed`` embeds a brick's description and examples for search."""
        self.catalog = catalog
        self.blobs = blobs
        self.compositions = compositions
        self.embed = embed
        compositions.runners[DISCOVERY_JOB] = self.run_claimed

    # -- requests ------------------------------------------------------------------------

    def request_discovery(
        self, base_model: str, request: DiscoveryRequest | Mapping[str, Any], *, actor: str | None = None
    ) -> tuple[domain.Composition, bool]:
        """Validate a discovery request completely and queue it (once per request).

        Returns:
            (the job, whether it already ran and its bricks are registered).

        Raises:
            InvalidInput: malformed probes, or a probe name taken by a LoRA brick.
            BaseModelNotFound: unknown base model.
            InvalidRecipe: unknown selection method or invalid parameters.
        """
        if not isinstance(request, DiscoveryRequest):
            request = parse_json_model(DiscoveryRequest, dict(request), what="discovery")
        base = self.catalog.get_base_model(base_model)
        base_id = self.catalog.base_model_id(base.name)
        from composer import SELECTION_METHODS

        chosen = SELECTION_METHODS.get(request.method)
        if chosen is None:
            raise InvalidRecipe(
                f"unknown selection method {request.method!r}",
                errors=[f"method: known methods are {', '.join(SELECTION_METHODS)}"],
            )
        with composer_errors(into=InvalidRecipe, field="params"):
            params = chosen.validate(request.params).model_dump(mode="json")
        taken = [p.name for p in request.probes if self._lora_named(p.name)]
        if taken:
            raise InvalidInput(
                "probe names must not be names of LoRA bricks",
                errors=[f"probes: {name!r} is a LoRA brick; give the function another name" for name in taken],
            )
        probes = [{"name": p.name, "description": p.description, "texts": p.texts} for p in request.probes]
        data = canonical_json(probes)
        if len(data) > _MAX_PROBE_BYTES:
            raise InvalidInput("probe sets are too large", errors=[f"probes: at most {_MAX_PROBE_BYTES} bytes of JSON"])
        staged = self.blobs.stage_bytes(data)
        self.blobs.commit(staged)
        recipe = {
            "schema": _JOB_SCHEMA,
            "job": DISCOVERY_JOB,
            "base_model": {"name": base.name, "fingerprint": base.fingerprint},
            "probes_sha256": staged.sha256,
            "functions": [p.name for p in request.probes],
            "method": chosen.name,
            "params": params,
            "held_out": request.held_out,
            "max_tokens": request.max_tokens,
            "seed": request.seed,
        }
        job_id = recipe_id(recipe)
        store = self.compositions.store
        while True:
            job, _ = store.create(
                job_id,
                recipe,
                base_model_id=base_id,
                output="emergent",
                method=f"emergent:{chosen.name}",
                actor=actor,
                blobs_present=lambda: self.blobs.exists(staged.sha256),
            )
            if job.status != READY or self._result_path(job_id).is_file():
                break
            store.delete_ready(job_id)  # the result record vanished: run it again
        return job, job.status == READY

    def job_blobs(self) -> dict[str, str]:
        """sha256 -> ``discovery <job id>`` of every discovery's probe sets: `brickyard fsck`
        keeps them (a queued or retried job reads them; a done one records what it ran on)."""
        from sqlalchemy import select

        from registry.db.models import CompositionRow

        with self.compositions.store.db.session() as session:
            rows = session.execute(
                select(CompositionRow.id, CompositionRow.recipe).where(CompositionRow.method.like("emergent:%"))
            ).all()
        return {
            str(row.recipe["probes_sha256"]): f"discovery {row.id[:16]}"
            for row in rows
            if isinstance(row.recipe, dict) and row.recipe.get("job") == DISCOVERY_JOB
        }

    def _lora_named(self, name: str) -> bool:
        try:
            return self.catalog.get_brick(name).kind != "emergent"
        except BrickNotFound:
            return False

    def _result_path(self, job_id: str) -> Path:
        return self.compositions.root / job_id / "brickyard.json"

    # -- the job -------------------------------------------------------------------------

    def run_claimed(self, job: domain.Composition, worker: str) -> domain.Composition:
        """Run a discovery this worker has claimed and record the outcome on the job row
        (only an interruption, KeyboardInterrupt or SystemExit, propagates)."""
        from composer import ComposeError, read_base_model

        recipe: dict[str, Any] = dict(job.recipe)
        store = self.compositions.store
        last = [0.0]

        def progress(fraction: float, message: str) -> None:
            now = time.monotonic()
            if now - last[0] < 0.5:
                return
            last[0] = now
            if not store.heartbeat(job.id, worker, min(fraction, 0.999), message):
                raise _Stopped

        try:
            base = self.catalog.get_base_model(recipe["base_model"]["name"])
            if read_base_model(Path(base.path)).fingerprint() != recipe["base_model"]["fingerprint"]:
                raise InvalidRecipe(f"the files of base model {base.name!r} changed since it was registered")
            probes = self._probes(recipe["probes_sha256"])
            found = discover(
                Path(base.path),
                [FunctionProbe(p["name"], tuple(p["texts"])) for p in probes],
                method=recipe["method"],
                params=recipe["params"],
                held_out=recipe["held_out"],
                max_tokens=recipe["max_tokens"],
                seed=recipe["seed"],
                progress=progress,
            )
            store.heartbeat(job.id, worker, 0.96, "registering the bricks")
            hashes = {p["name"]: probe_hash(p["texts"]) for p in probes}
            bricks = [self._register(base.name, probe, found, recipe, job, hashes) for probe in probes]
            size = self._write_result(job.id, recipe, bricks, found.verification)
        except _Stopped:
            log.warning("discovery %s stopped: its worker no longer owns it", job.id)
        except ComposeError as exc:
            store.fail(job.id, worker, str(exc), "invalid-recipe")
        except (InvalidRecipe, StorageCorrupt) as exc:
            store.fail(job.id, worker, str(exc), exc.code)
        except OSError as exc:
            log.exception("discovery %s failed on I/O", job.id)
            store.fail(job.id, worker, f"I/O error: {exc}", "io-error")
        except Exception as exc:
            log.exception("discovery %s failed", job.id)
            store.fail(job.id, worker, f"internal error: {type(exc).__name__}: {exc}", "internal")
        else:
            names = ", ".join(b.ref for b in bricks)
            store.finish(job.id, worker, size, f"registered {names}")
        return self.compositions.get(job.id)

    def _probes(self, sha256: str) -> list[dict[str, Any]]:
        try:
            path = self.blobs.local_path(sha256)
        except FileNotFoundError:
            raise StorageCorrupt("the probe sets of this discovery are missing; request it again") from None
        return list(json.loads(path.read_bytes()))

    def _register(
        self,
        base_model: str,
        probe: Mapping[str, Any],
        found: Any,
        recipe: Mapping[str, Any],
        job: domain.Composition,
        hashes: dict[str, str],
    ) -> domain.Brick:
        from composer import NeuronFile, save_neuron_set

        name = probe["name"]
        neurons = found.neuron_sets[name]
        with tempfile.TemporaryDirectory(prefix="brickyard-neurons-") as tmp:
            path = save_neuron_set(
                Path(tmp) / NEURONS_FILENAME,
                NeuronFile(
                    neurons=neurons,
                    function=name,
                    method=recipe["method"],
                    params=dict(recipe["params"]),
                    probe_hashes=hashes,
                ),
            )
            with path.open("rb") as handle:
                staged = self.blobs.stage(handle, max_bytes=1 << 30, what=NEURONS_FILENAME)
        existing = self.catalog.find_brick_by_sha256(staged.sha256, staged.sha256)
        if existing is not None:  # a retried job registered it before failing
            self.blobs.discard(staged)
            return existing
        per_layer = {str(layer): int(index.numel()) for layer, index in sorted(neurons.items())}
        total = sum(per_layer.values())
        relative = found.verification["relative_increase"]
        own = relative[name][name]
        others = [v for f, v in relative[name].items() if f != name]
        metrics = {"neurons": float(total), "own_loss_increase": float(own)}
        if others:
            metrics["other_loss_increase"] = float(sum(others) / len(others))
        metrics["random_own_loss_increase"] = float(relative[f"random:{name}"][name])
        emergent = {
            "function": name,
            "method": recipe["method"],
            "params": dict(recipe["params"]),
            "probe_hashes": hashes,
            "functions": list(recipe["functions"]),
            "held_out": recipe["held_out"],
            "seed": recipe["seed"],
            "statistics": found.statistics,
            "neurons": total,
            "neurons_per_layer": per_layer,
            "verification": found.verification,
            "job": job.id,
        }
        examples = tuple(t[:4000] for t in probe["texts"][:_EXAMPLES_KEPT])
        draft = domain.BrickDraft(
            name=name,
            base_model=base_model,
            description=probe["description"],
            examples=examples,
            tags=("emergent",),
            sha256=staged.sha256,
            config_sha256=staged.sha256,
            size_bytes=staged.size,
            config_size_bytes=staged.size,
            rank=0,
            lora_alpha=0.0,
            use_rslora=False,
            target_modules=(),
            modules=(),
            rank_pattern={},
            alpha_pattern={},
            license=None,
            metrics={k: v for k, v in metrics.items() if v == v and abs(v) != float("inf")},
            kind="emergent",
            emergent=emergent,
        )
        try:
            embedded = self.embed(draft.description, draft.examples)
        except BaseException:
            self.blobs.discard(staged)
            raise
        self.blobs.commit(staged)  # bytes first, row second (see registry.service)
        try:
            brick = self.catalog.add_brick(draft, embedded=embedded, actor=job.requested_by)
        except BrickExists:
            found_brick = self.catalog.find_brick_by_sha256(staged.sha256, staged.sha256)
            if found_brick is None:
                raise
            return found_brick
        log.info("registered emergent brick %s (%d neurons)", brick.ref, total)
        return brick

    def _write_result(
        self, job_id: str, recipe: Mapping[str, Any], bricks: list[domain.Brick], verification: Mapping[str, Any]
    ) -> int:
        target = self.compositions.root / job_id
        if target.exists():
            shutil.rmtree(target)
        staging = self.compositions.root / f".{job_id}.composing-discovery"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        record = {
            "recipe": {"id": job_id, **recipe},
            "bricks": [{"name": b.name, "version": b.version, "sha256": b.sha256} for b in bricks],
            "verification": verification,
        }
        (staging / "brickyard.json").write_text(json.dumps(record, indent=2, sort_keys=True))
        staging.rename(target)
        return (target / "brickyard.json").stat().st_size
