"""Loading the embedding model in the background when a server starts.

A search embeds its query in the server, so a server that loads the model on the first
search makes that search wait for the load (an ONNX session, ~1 s; on the very first run
on a machine an ONNX export, ~10 s: see `registry.search.onnx_export`). The warm-up loads
it, and runs one query through it, as soon as the server starts, in a thread, so the
server answers at once and a search arriving during the load waits for the same load.

What it means for the health routes (documented in the README):

* ``/healthz`` (liveness) never waits for it.
* ``/readyz`` is ready once the database answers, as before: every other route works
  during the load. ``/readyz?embedder=true`` also waits for the warm-up (503 while it
  runs), for a load balancer that should send searches only to warm replicas; a model that
  cannot load does not hold a replica unready forever: the searches answer their own 503.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from registry.service import Registry

__all__ = ["EmbedderWarmUp"]

log = logging.getLogger("brickyard.api")

WarmUpState = Literal["loading", "ready", "unavailable"]


class EmbedderWarmUp:
    """The background load of a registry's embedding models, and its state."""

    def __init__(self, registry: Registry) -> None:
        """Start loading (``start``) the query embedder of ``registry``, then its brick embedder."""
        self.registry = registry
        self.loaded = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._load, name="brickyard-embed-warm-up", daemon=True)

    def start(self) -> EmbedderWarmUp:
        """Start the load in a thread; returns self."""
        self._thread.start()
        return self

    @property
    def state(self) -> WarmUpState:
        """``loading``, ``ready`` (a query embeds without loading anything), or
        ``unavailable`` (the load failed; `error` says why)."""
        if not self.loaded.is_set():
            return "loading"
        return "ready" if self.error is None else "unavailable"

    def _load(self) -> None:
        try:
            # One query through the model, not just the load: the first run of an ONNX session
            # allocates its buffers, which the first search would otherwise pay.
            self.registry.embedder.embed(["warm up the embedding model"])
        except Exception as exc:  # reported again, as a problem, by the request that needs it
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("could not load the embedding model")
        finally:
            self.loaded.set()
        try:
            _ = self.registry.brick_embedder.dim  # starts the embedding child, after any export above
        except Exception:
            log.exception("could not start the embedding process")
