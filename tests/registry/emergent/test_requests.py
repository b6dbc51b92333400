"""The pure parts of discovery: the held-out split, probe hashes and request validation."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from registry.emergent import DiscoveryRequest
from registry.emergent.discovery import probe_hash, split_held_out


@pytest.mark.parametrize(("count", "fraction", "held"), [(2, 0.01, 1), (2, 0.99, 1), (10, 0.3, 3), (7, 0.5, 4)])
def test_split_holds_out_the_fraction_with_at_least_one_text_each_side(count: int, fraction: float, held: int) -> None:
    texts = [f"t{i}" for i in range(count)]
    fit, out = split_held_out(texts, fraction, seed=3)
    assert len(out) == held and len(fit) == count - held
    assert sorted(fit + out) == sorted(texts)
    assert split_held_out(texts, fraction, seed=3) == (fit, out)  # seeded


def test_different_seeds_split_differently() -> None:
    texts = [f"t{i}" for i in range(40)]
    assert split_held_out(texts, 0.5, seed=0)[1] != split_held_out(texts, 0.5, seed=1)[1]


def test_probe_hash_is_the_sha256_of_the_texts_as_compact_json() -> None:
    assert probe_hash(["a", "b"]) == hashlib.sha256(b'["a","b"]').hexdigest()
    assert probe_hash(["a", "b"]) != probe_hash(["b", "a"])


def _probe(name: str, texts: list[str] | None = None) -> dict[str, object]:
    return {"name": name, "description": f"{name} texts", "texts": texts or ["one", "two"]}


def test_request_defaults() -> None:
    request = DiscoveryRequest.model_validate({"probes": [_probe("a"), _probe("b")]})
    assert (request.method, request.params, request.held_out, request.seed) == ("lape", {}, 0.2, 0)


@pytest.mark.parametrize(
    "body",
    [
        {"probes": [_probe("a")]},
        {"probes": [_probe("a"), _probe("a")]},
        {"probes": [_probe("a"), _probe("b", ["only one"])]},
        {"probes": [_probe("a"), _probe("b", ["  ", "x"])]},
        {"probes": [_probe("a"), _probe("bad name!")]},
        {"probes": [_probe("a"), _probe("b")], "held_out": 0.0},
        {"probes": [_probe("a"), _probe("b")], "extra": 1},
        {"probes": [_probe("a"), _probe("b", ["nul\x00", "x"])]},
    ],
)
def test_bad_requests_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DiscoveryRequest.model_validate(body)
