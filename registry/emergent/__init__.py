"""Emergent bricks in the registry: discovery jobs and neuron-set bricks (issue #22).

This room owns what the registry does with `composer.emergent`'s engine:

* `requests`: what a discovery request may hold (probe sets, method, parameters), validated
  the same way for the REST API, the CLI and the Python API.
* `discovery`: the job's work, free of databases: load the base with transformers, tokenize
  the probes with its tokenizer, collect statistics, select each function's neurons, verify
  them against random sets on held-out texts.
* `bricks`: `EmergentBricks`, the use cases: queue a discovery as a job of the composition
  workers (same queue, progress and recovery as a build), run it, and register one brick of
  kind ``emergent`` per function (neuron file in the blob store, provenance and verification
  table in the row, description embedded for search).

It talks to the rest through the catalog store, the blob store, the composition queue and an
embedding callable handed in by `registry.service.Registry`; it never reaches back into the
service.
"""

from registry.emergent.bricks import DISCOVERY_JOB, NEURONS_FILENAME, EmergentBricks
from registry.emergent.requests import DiscoveryRequest, ProbeSet

__all__ = ["DISCOVERY_JOB", "NEURONS_FILENAME", "DiscoveryRequest", "EmergentBricks", "ProbeSet"]
