"""Fail before you compute: every incompatibility is found from configs and headers alone,
collected, and raised once, naming brick and module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from composer import (
    IncompatibleBricks,
    InvalidAdapter,
    InvalidBaseModel,
    InvalidParams,
    UnknownMethod,
    plan_composition,
)
from tests.composer.helpers import source

P = "base_model.model.model.layers"


def _write_brick(path: Path, config: dict[str, object], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none"}
    (path / "adapter_config.json").write_text(json.dumps(base | config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_a_compatible_plan_lists_modules_in_storage_order(toy_llama: Path, llama_bricks: dict[str, Path]) -> None:
    plan = plan_composition(
        toy_llama, [source(llama_bricks["qv4"], 0.5), source(llama_bricks["mixed2"], 2.0)], method="ties"
    )
    assert plan.method.name == "ties" and plan.params.density == 0.5  # type: ignore[attr-defined]
    # qv4 targets q and v, mixed2 targets q, o, up, down: 5 distinct modules per layer, 2 layers.
    assert len(plan.modules) == 10
    q0 = plan.modules["model.layers.0.self_attn.q_proj"]
    assert [(c.brick, c.rank, c.scaling, c.weight) for c in q0.contributions] == [(0, 8, 1.0, 0.5), (1, 2, 8.0, 2.0)]
    v0 = plan.modules["model.layers.0.self_attn.v_proj"]
    assert [(c.brick, c.rank, c.scaling) for c in v0.contributions] == [(0, 4, 0.5)]  # alpha_pattern v: 2
    order = [(list(plan.base.shards).index(m.shard), m.tensor.start) for m in plan.modules.values()]
    assert order == sorted(order)


def test_every_incompatibility_is_reported_at_once(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    def pair(
        module: str, rank: int, out: int, width: int, dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        return {
            f"{module}.lora_A.weight": torch.zeros(rank, width, dtype=dtype),
            f"{module}.lora_B.weight": torch.zeros(out, rank, dtype=dtype),
        }

    bad = _write_brick(
        tmp_path / "bad",
        {"target_modules": ["q_proj", "k_proj", "up_proj", "input_layernorm"]},
        pair(f"{P}.0.self_attn.q_proj", 4, 32, 32)  # fine
        | pair(f"{P}.0.self_attn.v_proj", 4, 16, 32)  # not in target_modules
        | pair(f"{P}.0.self_attn.k_proj", 3, 16, 32)  # rank 3, config says 4
        | pair(f"{P}.7.self_attn.q_proj", 4, 32, 32)  # no layer 7
        | pair(f"{P}.0.input_layernorm", 4, 32, 32)  # not a linear layer
        | pair(f"{P}.1.mlp.up_proj", 4, 64, 32, torch.int32),  # integer factors
    )
    shapes = _write_brick(
        tmp_path / "shapes", {"target_modules": ["o_proj"]}, pair(f"{P}.1.self_attn.o_proj", 4, 32, 64)
    )
    bricks = [source(llama_bricks["qv4"]), source(bad, name="bad@1"), source(shapes, name="shapes@2")]
    with pytest.raises(IncompatibleBricks) as caught:
        plan_composition(toy_llama, bricks)
    problems = caught.value.problems
    assert len(problems) == 6, problems
    expected = [
        ("bad@1", "layers.0.self_attn.v_proj", "target_modules"),
        ("bad@1", "layers.0.self_attn.k_proj", "rank 4"),
        ("bad@1", "layers.7.self_attn.q_proj", "no such module"),
        ("bad@1", "layers.0.input_layernorm", "not a linear layer"),
        ("bad@1", "layers.1.mlp.up_proj", "I32"),
        ("shapes@2", "layers.1.self_attn.o_proj", "expected lora_A [4, 32]"),
    ]
    for brick, module, why in expected:
        assert any(f"brick {brick!r}" in p and module in p and why in p for p in problems), (brick, module, problems)


def test_tied_output_embedding_cannot_take_a_delta(tmp_path: Path, toy_gpt2: Path) -> None:
    brick = _write_brick(
        tmp_path / "head",
        {"target_modules": ["lm_head"]},
        {
            "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(384, 4),
        },
    )
    with pytest.raises(IncompatibleBricks, match="tied"):
        plan_composition(toy_gpt2, [source(brick)])


def test_unreadable_bricks_are_invalid_adapters(tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]) -> None:
    loha = tmp_path / "loha"
    shutil.copytree(llama_bricks["qv4"], loha)
    config = json.loads((loha / "adapter_config.json").read_text())
    (loha / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "LOHA"}))
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapter) as caught:
        plan_composition(toy_llama, [source(loha, name="loha@1"), source(missing, name="missing@1")])
    problems = caught.value.problems
    assert any("loha@1" in p and "LOHA" in p for p in problems)
    assert any("missing@1" in p and "not valid JSON" in p for p in problems)
    assert any("missing@1" in p and "does not exist" in p for p in problems)


def test_request_problems_are_collected_before_the_base_is_read(tmp_path: Path, llama_bricks: dict[str, Path]) -> None:
    nowhere = tmp_path / "no-base"
    with pytest.raises(InvalidParams) as caught:
        plan_composition(
            nowhere,
            [source(llama_bricks["qv4"], float("nan"))],
            method="ties",
            params={"density": 3},
            output="adapter",
            recipe={"bad": object()},
        )
    problems = caught.value.problems
    assert any(p.startswith("density:") for p in problems)
    assert any("rank is required" in p for p in problems)
    assert any("weight must be a finite number" in p for p in problems)
    assert any("recipe is not serializable" in p for p in problems)
    with pytest.raises(InvalidParams) as caught:
        plan_composition(nowhere, [], output="gguf", rank=0)
    assert len(caught.value.problems) == 3  # no bricks, bad output kind, bad rank
    with pytest.raises(InvalidParams, match="adapter output only"):
        plan_composition(nowhere, [source(llama_bricks["qv4"])], output="full", rank=8)
    with pytest.raises(UnknownMethod):
        plan_composition(nowhere, [source(llama_bricks["qv4"])], method="frankenmerge")
    with pytest.raises(InvalidBaseModel):
        plan_composition(nowhere, [source(llama_bricks["qv4"])])


def test_planning_reads_no_tensor_data(tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]) -> None:
    # Same header, garbage data: planning (headers only) succeeds.
    brick = tmp_path / "garbage"
    shutil.copytree(llama_bricks["qv4"], brick)
    weights = brick / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    raw[data_start:] = b"\xff" * (len(raw) - data_start)
    weights.write_bytes(bytes(raw))
    plan = plan_composition(toy_llama, [source(brick)])
    assert len(plan.modules) == 4


def test_stored_pattern_invalid_in_peft_form_is_an_invalid_adapter_not_a_crash() -> None:
    import pytest

    from composer import InvalidAdapter, LoraSettings

    # A settings object made without parse_lora_config (a brick stored before the check).
    settings = LoraSettings(r=4, lora_alpha=8.0, alpha_pattern={r"(q)(_)\2": 2.0})
    with pytest.raises(InvalidAdapter, match="invalid module pattern"):
        settings.alpha_for("model.layers.0.self_attn.q_proj")


def test_pattern_budget_bounds_the_total_matching_time() -> None:
    import time

    import pytest

    from composer import InvalidAdapter, LoraSettings, pattern_budget

    settings = LoraSettings(r=4, lora_alpha=8.0, rank_pattern={rf"(\w|\w)*\d\d{i}X": 2 for i in range(400)})
    modules = [f"model.layers.{layer}.self_attn.q_proj" for layer in range(40)]
    started = time.monotonic()
    for module in modules:  # the whole matching, unbounded, on this machine now
        settings.rank_for(module)
    unbounded = time.monotonic() - started
    started = time.monotonic()
    with pytest.raises(InvalidAdapter, match="too long"), pattern_budget(unbounded / 4):
        for module in modules:
            settings.rank_for(module)
    assert time.monotonic() - started < 2 * unbounded  # stopped early (a quarter, plus noise)
