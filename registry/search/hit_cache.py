"""Bricks shown by searches, kept in memory across writes and re-validated cheaply.

A search answers with a few bricks (``k``); building them from rows costs more than the
rest of the ranking once the index scan has evicted the CPU caches. A cached brick is
reused without a query while the index generation has not moved (no write since it was
checked); after a write it is re-validated by its ``updated_at`` in one small query
(every change to a brick version sets it; a deleted version has no row), so a registration
elsewhere does not throw away the bricks that popular queries keep returning.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from registry import domain
from registry.storage.store import Store

__all__ = ["BrickCache"]


class BrickCache:
    """Bricks by row id, valid against the index generation or the row's ``updated_at``."""

    def __init__(self, store: Store, *, size: int = 10_000) -> None:
        self.store = store
        self.size = size
        # id -> (brick, generation at which it was last known current); least recent first.
        self._entries: OrderedDict[int, tuple[domain.Brick, int]] = OrderedDict()
        self._newest = -1  # the generation of the latest lookup
        self._lock = threading.Lock()

    def get(self, ids: Sequence[int], generation: int) -> dict[int, domain.Brick]:
        """The bricks with row ids ``ids`` as of ``generation`` (-1: unknown, read them);
        ids of deleted bricks are left out."""
        if generation < 0:
            return self.store.get_bricks_by_ids(list(ids))
        found: dict[int, domain.Brick] = {}
        stale: dict[int, domain.Brick] = {}
        with self._lock:
            if generation < self._newest:
                # The counter went back: the database was replaced under this process.
                self._entries.clear()
            self._newest = generation
            for i in ids:
                entry = self._entries.get(i)
                if entry is None:
                    continue
                self._entries.move_to_end(i)
                (found if entry[1] == generation else stale)[i] = entry[0]
        current = self.store.brick_stamps(list(stale)) if stale else {}
        confirmed = {i: brick for i, brick in stale.items() if current.get(i) == brick.updated_at}
        found.update(confirmed)
        deleted = {i for i in stale if i not in current}
        missing = [i for i in ids if i not in found and i not in deleted]
        fetched = self.store.get_bricks_by_ids(missing) if missing else {}
        found.update(fetched)
        with self._lock:
            for i in deleted:
                self._entries.pop(i, None)
            for i, brick in (confirmed | fetched).items():
                self._entries[i] = (brick, generation)
                self._entries.move_to_end(i)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return found
