"""Background priority for Brickyard's helper processes (composition builds, embedding of
brick texts): they get the CPU that request threads leave.

Under ``SCHED_IDLE`` the kernel runs a process only when nothing else wants the core, so a
search that wakes up takes the CPU at once (profiled with ``bench/load.py``: with the brick
embedder at niceness 19 alone, search p95 under the mixed load was 96-148 ms; under
``SCHED_IDLE``, 80 ms). Idle tasks still get a sliver of a saturated CPU, so their work
finishes, slowly. Where the policy is unavailable, plain niceness is the fallback.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["lower_to_background"]


def lower_to_background(niceness: int) -> None:
    """Move the calling process (and the threads it starts later) to background priority:
    ``niceness`` plus ``SCHED_IDLE`` where the platform has it."""
    with contextlib.suppress(OSError):  # not permitted here: keep the priority we have
        os.nice(max(0, niceness - os.nice(0)))
    if hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
