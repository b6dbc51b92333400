"""Few-shot fitting of composition weights over HTTP, on both backends: the build fits, the
fitted weights are those of a direct `composer.fit_weights` run, the recipe (examples and
their sha256 included) hashes stably, and bad fit requests are 422."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import brick_metadata, register_base, upload, wait_ready

EXAMPLES = [
    {"input": "the battery lasts", "output": "positive"},
    {"input": "broke after a day", "output": "negative"},
    {"input": "works as described", "output": "positive"},
]


@pytest.fixture
def fittable(client: Any, llama_base: Path, loras: dict[str, Path]) -> Any:
    register_base(client, llama_base)
    for name, path in (("sentiment", loras["r4"]), ("translate", loras["r8"])):
        assert upload(client, path, metadata=brick_metadata(name)).status_code == 201
    return client


def _request(**fit: Any) -> dict[str, Any]:
    return {
        "base_model": "tiny-llama",
        "bricks": [{"name": "sentiment"}, {"name": "translate"}],
        "fit": {"examples": EXAMPLES, "steps": 6, **fit},
    }


def test_fitted_weights_are_built_and_equal_a_direct_fit(
    fittable: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    from composer import fit_weights

    response = fittable.post("/v1/compositions", json=_request())
    assert response.status_code == 202, response.text
    body = response.json()
    recipe = body["recipe"]
    # Before the build the recipe holds the start: uniform weights, and the examples with their hash.
    assert [b["weight"] for b in recipe["bricks"]] == [0.5, 0.5]
    canonical = json.dumps(EXAMPLES, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert recipe["fit"]["examples_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert recipe["fit"]["examples"] == EXAMPLES
    done = wait_ready(fittable, body["id"], timeout_s=300)
    assert done["status"] == "ready", done
    assert done["message"].startswith("fitted weights sentiment@1=")

    record = json.loads(fittable.get(f"/v1/compositions/{body['id']}/files/brickyard.json").content)
    built = record["recipe"]
    assert built["id"] == body["id"]
    direct = fit_weights(
        llama_base,
        [loras["r4"], loras["r8"]],
        [(e["input"], e["output"]) for e in EXAMPLES],
        steps=6,
        l1=0.05,
        lr=0.1,
        init=[0.5, 0.5],
        seed=0,
    )
    assert built["fit"]["weights"] == pytest.approx(list(direct.weights), abs=1e-6)
    assert [b["weight"] for b in built["bricks"]] == pytest.approx(list(direct.weights), abs=1e-6)
    assert built["fit"]["initial_loss"] == pytest.approx(direct.initial_loss, rel=1e-6)
    # Fitting improves the loss over the uniform start.
    assert built["fit"]["final_loss"] < built["fit"]["initial_loss"]
    assert built["fit"]["examples_sha256"] == direct.examples_hash


def test_the_recipe_of_a_fit_hashes_stably(fittable: Any) -> None:
    first = fittable.post("/v1/compositions", json=_request()).json()
    reordered = {"fit": {"steps": 6, "examples": [dict(reversed(e.items())) for e in EXAMPLES]}}
    again = fittable.post("/v1/compositions", json={**_request(), **reordered}).json()
    assert again["id"] == first["id"]
    assert (
        hashlib.sha256(json.dumps(first["recipe"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        == first["id"]
    )
    other_examples = fittable.post("/v1/compositions", json=_request(examples=EXAMPLES[:2])).json()
    other_steps = fittable.post("/v1/compositions", json=_request(steps=7)).json()
    other_seed = fittable.post("/v1/compositions", json=_request(seed=1)).json()
    plain = fittable.post(
        "/v1/compositions",
        json={
            "base_model": "tiny-llama",
            "bricks": [{"name": "sentiment", "weight": 0.5}, {"name": "translate", "weight": 0.5}],
        },
    ).json()
    assert len({first["id"], other_examples["id"], other_steps["id"], other_seed["id"], plain["id"]}) == 5
    for body in (first, other_examples, other_steps, other_seed, plain):
        wait_ready(fittable, body["id"], timeout_s=300)


@pytest.mark.parametrize(
    ("fit", "extra", "needle"),
    [
        ({"examples": []}, {}, "fit.examples"),
        ({"examples": EXAMPLES * 22}, {}, "fit.examples"),
        ({"examples": [{"input": "x" * 2001, "output": "y"}]}, {}, "fit.examples.0.input"),
        ({"examples": [{"input": "x", "output": ""}]}, {}, "fit.examples.0.output"),
        ({"examples": [{"input": "x"}]}, {}, "fit.examples.0.output"),
        ({"examples": EXAMPLES, "steps": 0}, {}, "fit.steps"),
        ({"examples": EXAMPLES, "prompt": "no field here"}, {}, "fit.prompt"),
        ({"examples": EXAMPLES, "prompt": "{input} {other}"}, {}, "fit.prompt"),
        ({"examples": EXAMPLES}, {"method": "ties"}, "use method 'linear'"),
        ({"examples": EXAMPLES}, {"bricks": [{"name": "sentiment", "weight": 1.0}]}, "give no weights"),
    ],
    ids=[
        "empty",
        "too-many",
        "too-long",
        "empty-output",
        "no-output",
        "zero-steps",
        "prompt",
        "prompt-field",
        "ties",
        "weights",
    ],
)
def test_bad_fit_requests_are_422(fittable: Any, fit: dict[str, Any], extra: dict[str, Any], needle: str) -> None:
    body = {"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}], "fit": fit, **extra}
    response = fittable.post("/v1/compositions", json=body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert any(needle in line for line in [problem["detail"], *problem.get("errors", [])]), problem
