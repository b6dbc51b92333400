"""Workers that build queued compositions.

`WorkerPool` runs N threads that claim queued compositions from the database. With
``isolation="process"`` (the default) each thread hands its builds to its own long-lived
child process, ``python -m registry.builds.jobs serve``, started at idle priority (``SCHED_IDLE``,
so that searches keep their latency while a model is merged) and killed with the server (``PR_SET_PDEATHSIG``).
The child imports torch and the composer once and builds one composition per line it
reads on stdin, reporting progress through the database; if it dies, the build is marked
failed and the next build starts a new child. With ``isolation="thread"`` the build runs
in the worker thread itself (tests, small deployments).

``brickyard worker`` runs a pool in the foreground, so builds can be moved off the API
machine: every process shares the queue in the database.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from registry.builds.compositions import Compositions, worker_alive, worker_name
from registry.builds.quality import QualityJobs
from registry.errors import BrickyardError
from registry.priority import lower_to_background

if TYPE_CHECKING:
    from registry.settings import Settings

__all__ = ["WorkerPool", "main"]

log = logging.getLogger("brickyard.jobs")

_POLL_S = 0.5
_NICENESS = 10


class WorkerPool:
    """Threads that claim and build queued compositions."""

    def __init__(
        self,
        compositions: Compositions,
        settings: Settings,
        *,
        on_build: Callable[[str, float, str, str], None] | None = None,
    ) -> None:
        """``on_build(composition id, seconds, status, detail)`` is called after each build
        (metrics, ``brickyard worker``'s console)."""
        self.compositions = compositions
        self.settings = settings
        self.on_build = on_build
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._children: dict[int, _Child] = {}
        self.quality = QualityJobs(compositions.catalog.db, compositions.blobs)

    def start(self) -> None:
        """Fail builds interrupted by a previous process, then start the workers."""
        recovered = self.compositions.recover(worker_alive)
        if recovered:
            log.warning("marked %d interrupted builds failed: %s", len(recovered), ", ".join(recovered))
        if self.quality.recover():
            log.warning("queued interrupted quality checks again")
        for index in range(self.settings.compose.workers):
            thread = threading.Thread(target=self._run, args=(index,), name=f"brickyard-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """A composition was queued: look now instead of at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; terminate running child builds (they are marked failed on restart)."""
        self._stop.set()
        self._wake.set()
        for child in list(self._children.values()):
            child.terminate()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, index: int) -> None:
        worker = worker_name(index)
        while not self._stop.is_set():
            try:
                composition = self.compositions.store.claim_next(worker)
            except Exception:
                log.exception("claiming a composition failed")
                composition = None
            if composition is None and self._check_quality(index):
                continue
            if composition is None:
                self._wake.wait(_POLL_S)
                self._wake.clear()
                continue
            log.info("building composition %s (%s, %s)", composition.id, composition.method, composition.output)
            started = time.monotonic()
            if self.settings.compose.isolation == "thread":
                self.compositions.build_claimed(composition, worker)
            else:
                self._build_in_child(composition.id, worker, index)
            self._report(composition.id, time.monotonic() - started)

    def _report(self, composition_id: str, seconds: float) -> None:
        """One line per build in the log (and on `brickyard worker`'s console), and the metrics hook."""
        try:
            done = self.compositions.store.get(composition_id)
            status = done.status if done is not None else "deleted"
            detail = (done.error or done.message) if done is not None else ""
        except BrickyardError:  # the database is away: reporting must not stop the worker
            status, detail = "unknown", ""
        log.info("composition %s %s in %.1f s: %s", composition_id, status, seconds, detail[:200])
        if self.on_build is not None:
            self.on_build(composition_id, seconds, status, detail)

    def _check_quality(self, index: int) -> bool:
        """Run one queued quality check, if any (builds go first); whether there was one."""
        try:
            job = self.quality.claim_next()
        except Exception:
            log.exception("claiming a quality check failed")
            return False
        if job is None:
            return False
        log.info("measuring the quality of brick %s on %d pairs", job.ref, len(job.pairs))
        if self.settings.compose.isolation == "thread":
            self.quality.run(job)
        else:
            child = self._children.get(index)
            if child is None or not child.alive:
                child = _Child(self.settings, index)
                self._children[index] = child
            failure = child.run(f"quality {job.brick_id}", f"done quality {job.brick_id}")
            if failure is not None:
                self.quality.fail(job.brick_id, failure)
        return True

    def _build_in_child(self, composition_id: str, worker: str, index: int) -> None:
        child = self._children.get(index)
        if child is None or not child.alive:
            child = _Child(self.settings, index)
            self._children[index] = child
        failure = child.build(composition_id, worker, self.compositions.report_eviction)
        if failure is not None:
            self.compositions.store.fail(composition_id, worker, failure, "build-crashed")


class _Child:
    """A long-lived build process: one composition id per line in, ``done <id>`` out."""

    def __init__(self, settings: Settings, index: int) -> None:
        logs = settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"build-worker-{index}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "registry.builds.jobs", "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            preexec_fn=_child_setup,
        )
        assert self.process.stdin is not None
        # Settings go through stdin, not the environment: the database URL may hold a password.
        self.process.stdin.write(settings.model_dump_json().encode() + b"\n")
        self.process.stdin.flush()

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def build(
        self, composition_id: str, worker: str, on_eviction: Callable[[str, int], None] | None = None
    ) -> str | None:
        """Build one composition; None on success, else why the child failed.
        ``on_eviction(id, bytes)`` hears of the compositions the build evicted."""
        return self.run(f"{composition_id} {worker}", f"done {composition_id}", on_eviction)

    def run(self, command: str, done: str, on_eviction: Callable[[str, int], None] | None = None) -> str | None:
        """Send one command line; None when the child answers ``done``, else why it failed.
        ``evicted <id> <bytes>`` lines before it go to ``on_eviction``."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(f"{command}\n".encode())
            self.process.stdin.flush()
            line = self.process.stdout.readline()
            while line.startswith(b"evicted "):
                _, evicted, size = line.decode().split()
                if on_eviction is not None:
                    on_eviction(evicted, int(size))
                line = self.process.stdout.readline()
        except (BrokenPipeError, OSError, ValueError):
            line = b""
        if line.strip() == done.encode():
            return None
        code = self.process.wait()
        self._log.close()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        reason = f"the build process exited with code {code}"
        if code < 0:
            reason = f"the build process was killed by signal {-code}"
        return "; ".join([reason, *tail])

    def terminate(self) -> None:
        """Stop the process."""
        if self.alive:
            self.process.terminate()


def _child_setup() -> None:
    # Builds run on CPU time nobody else wants: under SCHED_IDLE the kernel schedules the
    # build process only when no request thread is runnable, so searches keep their latency
    # while a model is merged (profiled: with nice 10 alone, builds took ~half the samples of
    # a loaded server). Fall back to plain niceness where the policy is not available.
    lower_to_background(_NICENESS)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m registry.builds.jobs serve``. Reads the settings (JSON) as
    the first line of stdin, then ``<composition id> <worker>`` lines; builds each and
    answers ``done <composition id>`` (outcomes are recorded in the database), after an
    ``evicted <id> <bytes>`` line per composition the build evicted."""
    args = argv if argv is not None else sys.argv[1:]
    if args != ["serve"]:
        print(
            "usage: python -m registry.builds.jobs serve   (settings JSON, then '<id> <worker>' lines, on stdin)",
            file=sys.stderr,
        )
        return 2
    from registry.service import Registry
    from registry.settings import Settings

    first = sys.stdin.readline()
    settings = Settings.model_validate(json.loads(first)) if first.strip() else Settings()
    registry = Registry.open(settings)
    import torch  # noqa: F401 - pay the imports once, before the first build
    import transformers  # noqa: F401

    def report_eviction(composition_id: str, size: int) -> None:  # the parent counts it (/metrics)
        sys.stdout.write(f"evicted {composition_id} {size}\n")
        sys.stdout.flush()

    registry.compositions.eviction_listeners.append(report_eviction)
    try:
        quality = QualityJobs(registry.compositions.catalog.db, registry.compositions.blobs)
        for line in sys.stdin:
            first, second = line.split()
            if first == "quality":
                job = quality.job(int(second))
                if job is not None:
                    quality.run(job)
                sys.stdout.write(f"done quality {second}\n")
                sys.stdout.flush()
                continue
            composition_id, worker = first, second
            composition = registry.compositions.get(composition_id)
            registry.compositions.build_claimed(composition, worker)
            sys.stdout.write(f"done {composition_id}\n")
            sys.stdout.flush()
    finally:
        registry.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
