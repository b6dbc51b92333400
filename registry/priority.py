"""Background priority for Brickyard's helper processes (composition builds, embedding of
brick texts): they get the CPU that request threads leave.

Under ``SCHED_IDLE`` the kernel runs a task only when nothing else wants the core, so a
search that wakes up takes the CPU at once (profiled with ``bench/load.py``: with the brick
embedder at niceness 19 alone, search p95 under the mixed load was 96-148 ms; under
``SCHED_IDLE``, 77-134 ms). Idle tasks still get a sliver of a saturated CPU, so their work
finishes, slowly. Where the policy is unavailable, plain niceness is the fallback.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["lower_to_background"]


def lower_to_background(niceness: int, *, all_threads: bool = False) -> None:
    """Move the calling thread, and the threads it starts later, to background priority:
    ``niceness`` plus ``SCHED_IDLE`` where the platform has it. With ``all_threads``, every
    thread the process already has too (Linux keeps priorities per thread)."""
    tasks = [0]
    if all_threads and Path("/proc/self/task").is_dir():
        tasks = [int(task.name) for task in Path("/proc/self/task").iterdir()]
    for task in tasks:
        with contextlib.suppress(OSError):  # not permitted here, or gone: keep what we have
            current = os.getpriority(os.PRIO_PROCESS, task)
            os.setpriority(os.PRIO_PROCESS, task, max(current, niceness))
        if hasattr(os, "SCHED_IDLE"):
            with contextlib.suppress(OSError):
                os.sched_setscheduler(task, os.SCHED_IDLE, os.sched_param(0))
