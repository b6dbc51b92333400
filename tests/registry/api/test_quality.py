"""The quality check at registration over HTTP, on both backends: the worker's numbers equal
a direct transformers + PEFT evaluation, they show in the brick, the listing and search hits,
bad evals are 422, and the setting hides bricks that do not beat their base."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import brick_metadata, register_base, upload, wait_ready

EVALS = [
    {"input": "the battery lasts", "output": "positive"},
    {"input": "broke after a day", "output": "negative"},
    {"input": "fine", "output": "ok"},
]


def _wait_quality(client: Any, name: str, timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        brick = client.get(f"/v1/bricks/{name}").json()
        if brick["quality_status"] in ("done", "failed"):
            return brick
        time.sleep(0.2)
    raise AssertionError(f"quality of {name} not measured after {timeout_s} s")


def _direct(base_dir: Path, adapter: Path, prompt: str) -> dict[str, dict[str, float]]:
    """Loss (mean over answer tokens) and exact match of base and brick, by transformers + PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(adapter))
    model.eval()

    def score() -> dict[str, float]:
        total, count, hits = 0.0, 0, 0
        for pair in EVALS:
            prompt_ids = tokenizer(prompt.format(input=pair["input"]))["input_ids"]
            target = tokenizer(pair["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt_ids + target])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0]
            log_probs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1].double(), dim=-1)
            total -= float(log_probs[torch.arange(len(target)), torch.tensor(target)].sum())
            count += len(target)
            with torch.no_grad():
                generated = model.generate(
                    input_ids=torch.tensor([prompt_ids]),
                    max_new_tokens=len(target),
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.eos_token_id,
                )[0, len(prompt_ids) :].tolist()
            hits += generated == target
        return {"loss": total / count, "exact_match": hits / len(EVALS)}

    brick = score()
    with model.disable_adapter():
        base = score()
    return {"base": base, "brick": brick}


def test_quality_equals_a_direct_evaluation_and_is_shown(client: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    register_base(client, llama_base)
    meta = brick_metadata("sentiment", evals=EVALS, eval_prompt="review: {input} ->")
    registered = upload(client, loras["r4"], metadata=meta)
    assert registered.status_code == 201, registered.text
    assert registered.json()["quality_status"] == "queued"
    brick = _wait_quality(client, "sentiment")
    assert brick["quality_status"] == "done", brick
    quality = brick["quality"]
    direct = _direct(llama_base, loras["r4"], "review: {input} ->")
    for side in ("base", "brick"):
        assert quality[side]["loss"] == pytest.approx(direct[side]["loss"], rel=1e-4), side
        assert quality[side]["exact_match"] == direct[side]["exact_match"], side
    beats = direct["brick"]["loss"] < direct["base"]["loss"] and (
        direct["brick"]["exact_match"] >= direct["base"]["exact_match"]
    )
    assert quality["beats_base"] is beats and quality["pairs"] == len(EVALS)

    listed = client.get("/v1/bricks").json()["items"]
    assert listed[0]["quality"] == quality
    hits = client.post("/v1/search", json={"query": "sentiment of a review"}).json()["hits"]
    assert hits[0]["brick"]["quality"] == quality
    # Without evals there is no check.
    other = upload(client, loras["r8"], metadata=brick_metadata("other")).json()
    assert other["quality_status"] is None and other["quality"] is None


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"evals": []}, "metadata.evals"),
        ({"evals": EVALS * 22}, "metadata.evals"),
        ({"evals": [{"input": "x" * 2001, "output": "y"}]}, "metadata.evals.0.input"),
        ({"evals": [{"input": "x"}]}, "metadata.evals.0.output"),
        ({"evals": [{"input": "x", "output": "y", "z": 1}]}, "metadata.evals.0.z"),
        ({"evals": EVALS, "eval_prompt": "no field"}, "metadata.eval_prompt"),
    ],
    ids=["empty", "too-many", "too-long", "no-output", "extra-key", "prompt"],
)
def test_bad_evals_are_422(
    client: Any, llama_base: Path, loras: dict[str, Path], extra: dict[str, Any], needle: str
) -> None:
    register_base(client, llama_base)
    response = upload(client, loras["r4"], metadata=brick_metadata("sentiment", **extra))
    assert response.status_code == 422, response.text
    problem = response.json()
    assert any(needle in line for line in problem["errors"]), problem
    assert client.get("/v1/bricks").json()["items"] == []


def test_setting_hides_bricks_not_beating_their_base(
    client: Any, registry: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    from sqlalchemy import select

    from registry.builds.quality import QualityJobs
    from registry.db.models import BrickRow

    register_base(client, llama_base)
    for name, path in (("sentiment", loras["r4"]), ("sentiment-two", loras["r8"])):
        meta = brick_metadata(name, description="classify the sentiment of a product review")
        assert upload(client, path, metadata=meta).status_code == 201
    request = {"base_model": "tiny-llama", "instruction": "classify the sentiment of a review", "k": 2}
    before = client.post("/v1/compositions", json=request).json()
    assert {b["name"] for b in before["recipe"]["bricks"]} == {"sentiment", "sentiment-two"}
    # Record a measured quality that does not beat the base (as a worker would).
    with registry.store.db.session() as session:
        brick_id = session.scalar(select(BrickRow.id).where(BrickRow.name == "sentiment-two"))
    worse = {"pairs": 1, "base": {"loss": 1.0, "exact_match": 0.0}, "brick": {"loss": 2.0, "exact_match": 0.0}}
    QualityJobs(registry.store.db, registry.blobs)._finish(brick_id, "done", {**worse, "beats_base": False})
    same = client.post("/v1/compositions", json=request).json()
    assert same["id"] == before["id"]  # the setting is off by default
    registry.settings.compose.hide_bricks_not_beating_base = True
    after = client.post("/v1/compositions", json=request).json()
    assert [b["name"] for b in after["recipe"]["bricks"]] == ["sentiment"]
    for body in (before, after):
        wait_ready(client, body["id"])
