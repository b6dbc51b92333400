"""What a discovery request may hold. Shared by the REST API, the CLI and the Python API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from registry.inputs import Description, Name, Printable

__all__ = ["MAX_PROBE_TEXTS", "DiscoveryRequest", "ProbeSet"]

MAX_PROBE_TEXTS = 2000
"""Texts per function: statistics are bounded, but the job's run time is not."""

ProbeText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=8000), Printable]


class ProbeSet(BaseModel):
    """The texts of one function: the emergent brick found for it takes its name and description."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name = Field(description="name of the emergent brick registered for this function")
    description: Description = Field(description="what the function is, in plain words (embedded for search)")
    texts: list[ProbeText] = Field(
        min_length=2, max_length=MAX_PROBE_TEXTS, description="texts exercising the function (some are held out)"
    )


class DiscoveryRequest(BaseModel):
    """Find the neurons of each function in a base model's feed-forward layers."""

    model_config = ConfigDict(extra="forbid", strict=True)

    probes: list[ProbeSet] = Field(min_length=2, max_length=32, description="one probe set per function (at least 2)")
    method: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        "lape", description="selection method: lape | average_precision"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="the selection method's parameters")
    held_out: float = Field(
        0.2, gt=0.0, lt=1.0, allow_inf_nan=False, description="fraction of each function's texts kept for verification"
    )
    max_tokens: int = Field(256, ge=8, le=4096, description="texts are truncated to this many tokens")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the held-out split and the random sets")

    @model_validator(mode="after")
    def _distinct_names(self) -> DiscoveryRequest:
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise ValueError("probe set names must be distinct (each becomes a brick)")
        return self
