"""Workers that build queued compositions.

`WorkerPool` runs N threads that claim queued compositions from the database. With
``isolation="process"`` (the default) each build runs in a child process,
``python -m registry.jobs build <id> <worker>``, started niced (so that searches keep
their latency while a model is merged) and killed with the server (``PR_SET_PDEATHSIG``);
the child reports progress through the database. With ``isolation="thread"`` the build
runs in the worker thread itself (tests, small deployments).

``brickyard worker`` runs a pool in the foreground, so builds can be moved off the API
machine: every process shares the queue in the database.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

from registry.compositions import Compositions, worker_alive, worker_name

if TYPE_CHECKING:
    from registry.settings import Settings

__all__ = ["WorkerPool", "main"]

log = logging.getLogger("brickyard.jobs")

_POLL_S = 0.5
_NICENESS = 10


class WorkerPool:
    """Threads that claim and build queued compositions."""

    def __init__(self, compositions: Compositions, settings: Settings) -> None:
        self.compositions = compositions
        self.settings = settings
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        """Fail builds interrupted by a previous process, then start the workers."""
        recovered = self.compositions.recover(worker_alive)
        if recovered:
            log.warning("marked %d interrupted builds failed: %s", len(recovered), ", ".join(recovered))
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
            if composition is None:
                self._wake.wait(_POLL_S)
                self._wake.clear()
                continue
            log.info("building composition %s (%s, %s)", composition.id, composition.method, composition.output)
            if self.settings.compose.isolation == "thread":
                self.compositions.build_claimed(composition, worker)
            else:
                self._build_in_child(composition.id, worker, index)

    def _build_in_child(self, composition_id: str, worker: str, index: int) -> None:
        # Settings go through stdin, not the environment: the database URL may hold a password.
        child = subprocess.Popen(
            [sys.executable, "-m", "registry.jobs", "build", composition_id, worker],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_child_setup,
        )
        self._children[index] = child
        try:
            _, stderr = child.communicate(self.settings.model_dump_json().encode())
        finally:
            self._children.pop(index, None)
        if child.returncode != 0:
            tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
            reason = f"the build process exited with code {child.returncode}"
            if child.returncode < 0:
                reason = f"the build process was killed by signal {-child.returncode}"
            self.compositions.store.fail(composition_id, worker, "; ".join([reason, *tail]), "build-crashed")


def _child_setup() -> None:
    os.nice(_NICENESS)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m registry.jobs build <composition id> <worker>``, with
    the settings as JSON on standard input (empty: from the environment)."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 3 or args[0] != "build":
        print("usage: python -m registry.jobs build <composition-id> <worker>", file=sys.stderr)
        return 2
    from registry.service import Registry
    from registry.settings import Settings

    raw = sys.stdin.read()
    settings = Settings.model_validate(json.loads(raw)) if raw.strip() else Settings()
    registry = Registry.open(settings)
    try:
        composition = registry.compositions.get(args[1])
        registry.compositions.build_claimed(composition, args[2])
    finally:
        registry.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
