"""The quality check of a brick: base vs brick on the eval pairs given at registration.

A brick registered with ``metadata.evals`` is queued (``quality_status = "queued"``); the
composition workers take such jobs when no composition is waiting (`QualityJobs.claim_next`),
score the base and the brick on the pairs (`composer.score_brick`: answer loss and exact
match) and store the result on the brick (``quality``)::

    {"pairs": 12, "base": {"loss": 2.31, "exact_match": 0.0},
     "brick": {"loss": 0.12, "exact_match": 0.92}, "beats_base": true}

``beats_base``: lower loss and no lower exact match. With the setting
``compose.hide_bricks_not_beating_base``, bricks measured not to beat their base are left
out of instruction-based compositions (bricks without evals are not judged).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from registry.db.models import BaseModelRow, BrickRow, utcnow
from registry.db.queue import claim_oldest
from registry.search.index_rows import bump_generation

if TYPE_CHECKING:
    from registry.db.session import Database
    from registry.storage.blobs import BlobStore

__all__ = ["QUEUED", "QualityJob", "QualityJobs", "quality_document"]

log = logging.getLogger("brickyard.quality")

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


@dataclass(frozen=True)
class QualityJob:
    """A claimed quality check: which brick, its files, its base and its pairs."""

    brick_id: int
    ref: str
    base_path: Path
    config_sha256: str
    sha256: str
    pairs: tuple[tuple[str, str], ...]
    prompt: str


def quality_document(result: Any) -> dict[str, Any]:
    """The stored ``quality`` of a `composer.BrickQuality`."""
    return {
        "pairs": result.pairs,
        "base": {"loss": result.base.loss, "exact_match": result.base.exact_match},
        "brick": {"loss": result.brick.loss, "exact_match": result.brick.exact_match},
        "beats_base": result.beats_base,
    }


class QualityJobs:
    """Queue and run quality checks (on the catalog's database and blob store)."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        """``db`` holds the bricks, ``blobs`` their files."""
        self.db = db
        self.blobs = blobs

    def claim_next(self) -> QualityJob | None:
        """Take the oldest queued check (None when there is none)."""
        return claim_oldest(self.db, BrickRow.id, BrickRow.quality_status == QUEUED, BrickRow.id, _start)

    def job(self, brick_id: int) -> QualityJob | None:
        """The check of a brick claimed elsewhere (a build process is handed its id)."""
        with self.db.session() as session:
            return _job(session, brick_id)

    def run(self, job: QualityJob) -> dict[str, Any] | None:
        """Measure and store one claimed check; the stored quality (None when it failed)."""
        from composer import ComposeError, score_brick

        try:
            with tempfile.TemporaryDirectory(prefix="brickyard-quality-") as scratch:
                # The composer reads a PEFT adapter directory; the blobs are content-addressed files.
                os.symlink(self.blobs.local_path(job.config_sha256), Path(scratch) / "adapter_config.json")
                os.symlink(self.blobs.local_path(job.sha256), Path(scratch) / "adapter_model.safetensors")
                result = score_brick(job.base_path, Path(scratch), job.pairs, prompt_template=job.prompt)
        except (ComposeError, OSError, ValueError) as exc:
            log.warning("quality check of %s failed: %s", job.ref, exc)
            self._finish(job.brick_id, FAILED, {"error": str(exc)[:500]})
            return None
        document = quality_document(result)
        self._finish(job.brick_id, DONE, document)
        log.info("quality of %s: %s", job.ref, document)
        return document

    def fail(self, brick_id: int, reason: str) -> None:
        """Record a check that could not run (its process died)."""
        self._finish(brick_id, FAILED, {"error": reason[:500]})

    def recover(self) -> int:
        """Queue again the checks a stopped worker left running; how many."""
        with self.db.session(write=True) as session:
            result = session.execute(
                update(BrickRow).where(BrickRow.quality_status == RUNNING).values(quality_status=QUEUED)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def _finish(self, brick_id: int, status: str, quality: dict[str, Any]) -> None:
        with self.db.session(write=True) as session:
            # A new updated_at and index generation: search's brick cache must not keep the old state.
            session.execute(
                update(BrickRow)
                .where(BrickRow.id == brick_id)
                .values(quality_status=status, quality=quality, updated_at=utcnow())
            )
            bump_generation(session)


def _start(session: Any, brick_id: int) -> QualityJob | None:
    """Mark a queued check running (None if another worker took it) and return its job."""
    claimed = session.execute(
        update(BrickRow)
        .where(BrickRow.id == brick_id, BrickRow.quality_status == QUEUED)
        .values(quality_status=RUNNING)
    )
    if int(claimed.rowcount) != 1:
        return None
    return _job(session, brick_id)


def _job(session: Any, brick_id: int) -> QualityJob | None:
    row = session.get(BrickRow, brick_id)
    if row is None:
        return None
    base_path = session.scalar(select(BaseModelRow.path).where(BaseModelRow.id == row.base_model_id))
    return QualityJob(
        brick_id=brick_id,
        ref=f"{row.name}@{row.version}",
        base_path=Path(str(base_path)),
        config_sha256=row.config_sha256,
        sha256=row.sha256,
        pairs=tuple((e["input"], e["output"]) for e in row.evals or ()),
        prompt=row.eval_prompt or "{input}",
    )
