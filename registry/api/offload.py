"""Blocking work that a client can make slow (reading a base model's files from a path it
names: a hung network mount, a huge directory) runs off the event loop's shared thread pool
and under a deadline.

Starlette runs ``def`` routes on one shared pool of 40 threads; 45 registrations stuck in
the file system took every thread and ``/healthz``, searches and listings stopped answering.
`run_blocking` uses its own small limiter, so at most that many threads can be stuck, and
answers `ServiceUnavailable` when the deadline passes (the thread finishes on its own; a
thread cannot be killed, only no longer waited for).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from registry.errors import ServiceUnavailable

__all__ = ["BlockingLane", "run_blocking"]

T = TypeVar("T")


class BlockingLane:
    """A bounded lane of worker threads for one kind of blocking work (one per app)."""

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self.threads = threads
        self._limiters: dict[int, anyio.CapacityLimiter] = {}

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The lane's limiter in the running event loop (tests run one app in several)."""
        import asyncio

        loop = id(asyncio.get_running_loop())
        if loop not in self._limiters:
            self._limiters = {loop: anyio.CapacityLimiter(self.threads)}
        return self._limiters[loop]


async def run_blocking(lane: BlockingLane, deadline_s: float, function: Callable[[], T]) -> T:
    """``function()`` on a thread of ``lane``, waited for at most ``deadline_s`` seconds
    (queueing for a free thread included).

    Raises:
        ServiceUnavailable: the deadline passed (or every thread of the lane is stuck).
    """
    with anyio.move_on_after(deadline_s):
        # abandon_on_cancel: the request answers at the deadline; the thread runs to its end.
        return await anyio.to_thread.run_sync(function, limiter=lane.limiter, abandon_on_cancel=True)
    raise ServiceUnavailable(
        f"{lane.name} took longer than {deadline_s:g} s; the server's file system may be slow or stuck",
        extra={"deadline_s": deadline_s},
    )
