"""Adapter output: one PEFT LoRA adapter, exact by concatenation or truncated optimally,
loadable with ``PeftModel.from_pretrained`` and consistent with the full merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from composer import InvalidParams, compose
from tests.composer.helpers import (
    PREFIX,
    load_dir,
    logits,
    peft_merged,
    quiet,
    reference_deltas,
    relative_error,
    source,
)


def _peft_model(base: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with quiet():
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)


def _full_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with quiet():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _adapter_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """``B @ A`` per module of an adapter output (its scaling is 1 by construction)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    return reference_deltas(adapter)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_exact_adapter_behaves_like_the_full_merge(
    tmp_path: Path,
    family: str,
    toy_llama: Path,
    toy_gpt2: Path,
    llama_bricks: dict[str, Path],
    gpt2_bricks: dict[str, Path],
) -> None:
    if family == "llama":
        base = toy_llama
        chosen = [(llama_bricks["qv4"], 0.7), (llama_bricks["mixed2"], -0.4), (llama_bricks["rs8"], 1.1)]
    else:
        base = toy_gpt2
        chosen = [(gpt2_bricks["attn4"], 0.8), (gpt2_bricks["mlp2"], 0.5)]
    bricks = [source(p, w) for p, w in chosen]
    result = compose(base, bricks, tmp_path / "adapter", output="adapter")
    compose(base, bricks, tmp_path / "full")
    assert result.truncation is not None and result.truncation.max_relative_error == 0.0
    assert {f.name for f in result.files} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "brickyard.json",
    }
    torch.testing.assert_close(
        logits(_peft_model(base, tmp_path / "adapter")), logits(_full_model(tmp_path / "full")), rtol=1e-4, atol=1e-4
    )


def test_exact_adapter_ranks_are_the_sums_of_the_bricks_ranks(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    chosen = [llama_bricks["qv4"], llama_bricks["mixed2"], llama_bricks["all6"]]
    compose(toy_llama, [source(p) for p in chosen], tmp_path / "adapter", output="adapter")
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    rank = {
        k.removeprefix(PREFIX).removesuffix(".lora_A.weight"): v.shape[0]
        for k, v in tensors.items()
        if k.endswith("lora_A.weight")
    }
    # q: qv4 has q at rank 8, mixed2 rank 2, all6 rank 6; gate of layer 1: all6's pattern gives 3.
    assert rank["model.layers.0.self_attn.q_proj"] == 16
    assert rank["model.layers.0.self_attn.v_proj"] == 4 + 6
    assert rank["model.layers.1.mlp.gate_proj"] == 3
    assert rank["model.layers.0.mlp.down_proj"] == 2 + 6
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # PEFT resolves every module's rank from the config exactly as stored.
    model = _peft_model(toy_llama, tmp_path / "adapter")
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            short = name.removeprefix("base_model.model.")
            assert module.lora_A["default"].weight.shape[0] == rank[short], short
            assert module.scaling["default"] == 1.0


def test_truncated_linear_adapter_is_optimal_and_reports_its_error(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    chosen = [(llama_bricks["qv4"], 0.7), (llama_bricks["mixed2"], -0.4), (llama_bricks["all6"], 1.3)]
    result = compose(toy_llama, [source(p, w) for p, w in chosen], tmp_path / "adapter", output="adapter", rank=5)
    assert result.truncation is not None and result.rank == 5
    exact: dict[str, torch.Tensor] = {}
    for path, weight in chosen:
        for module, delta in reference_deltas(path).items():
            exact[module] = exact.get(module, torch.zeros_like(delta)) + weight * delta
    approx = _adapter_deltas(tmp_path / "adapter")
    assert approx.keys() == exact.keys()
    record = json.loads((tmp_path / "adapter" / "brickyard.json").read_text())["composer"]
    for module, delta in exact.items():
        singular = torch.linalg.svdvals(delta)
        optimal = float(torch.linalg.vector_norm(singular[5:]) / torch.linalg.vector_norm(singular))
        measured = relative_error(approx[module], delta)
        reported = result.truncation.per_module[module]
        assert measured == pytest.approx(optimal, rel=1e-4, abs=1e-6), module
        assert reported == pytest.approx(measured, rel=1e-4, abs=1e-6), module
        assert record["truncation"]["per_module"][module] == reported
    assert result.truncation.max_relative_error == max(result.truncation.per_module.values()) > 0.05


def test_truncated_adapter_is_no_worse_than_peft_svd(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    chosen = [(llama_bricks["qv4"], 1.0), (llama_bricks["all6"], 0.5)]
    compose(toy_llama, [source(p, w) for p, w in chosen], tmp_path / "adapter", output="adapter", rank=4)
    ours = _adapter_deltas(tmp_path / "adapter")
    theirs = peft_merged(toy_llama, [p for p, _ in chosen], [w for _, w in chosen], "svd", svd_rank=4)
    original = load_dir(toy_llama)
    exact: dict[str, torch.Tensor] = {}
    for path, weight in chosen:
        for module, delta in reference_deltas(path).items():
            exact[module] = exact.get(module, torch.zeros_like(delta)) + weight * delta
    for module, delta in exact.items():
        peft_delta = theirs[f"{module}.weight"].double() - original[f"{module}.weight"].double()
        assert relative_error(ours[module], delta) <= relative_error(peft_delta, delta) * (1 + 1e-4) + 1e-6, module


@pytest.mark.parametrize(
    ("method", "params"), [("ties", {"density": 0.5}), ("dare_linear", {"density": 0.7, "seed": 1})]
)
def test_sparsifying_adapter_is_the_svd_of_the_merged_delta(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path], method: str, params: dict[str, object]
) -> None:
    chosen = [source(llama_bricks["qv4"], 0.9), source(llama_bricks["all6"], -0.5)]
    compose(toy_llama, chosen, tmp_path / "full", method=method, params=params)
    full = compose(toy_llama, chosen, tmp_path / "exact", method=method, params=params, output="adapter", rank=32)
    low = compose(toy_llama, chosen, tmp_path / "low", method=method, params=params, output="adapter", rank=3)
    assert full.truncation is not None and full.truncation.max_relative_error < 1e-5
    merged, original = load_dir(tmp_path / "full"), load_dir(toy_llama)
    exact_adapter, low_adapter = _adapter_deltas(tmp_path / "exact"), _adapter_deltas(tmp_path / "low")
    assert low.truncation is not None
    for module, delta in exact_adapter.items():
        merged_delta = merged[f"{module}.weight"].double() - original[f"{module}.weight"].double()
        assert relative_error(delta, merged_delta) < 1e-5, module
        singular = torch.linalg.svdvals(merged_delta)
        optimal = float(torch.linalg.vector_norm(singular[3:]) / torch.linalg.vector_norm(singular))
        assert relative_error(low_adapter[module], merged_delta) == pytest.approx(optimal, rel=1e-3)
        assert low.truncation.per_module[module] == pytest.approx(optimal, rel=1e-3)


def test_sparsifying_adapter_needs_a_rank(tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]) -> None:
    with pytest.raises(InvalidParams, match="rank is required"):
        compose(toy_llama, [source(llama_bricks["qv4"])], tmp_path / "x", method="ties", output="adapter")
    assert not (tmp_path / "x").exists()


def test_outputs_name_the_base_model_so_peft_can_load_them(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    from peft import AutoPeftModelForCausalLM

    brick_dir = tmp_path / "unnamed"
    brick_dir.mkdir()
    config = json.loads((llama_bricks["qv4"] / "adapter_config.json").read_text())
    config.update(base_model_name_or_path=None, task_type="CAUSAL_LM")
    (brick_dir / "adapter_config.json").write_text(json.dumps(config))
    (brick_dir / "adapter_model.safetensors").write_bytes(
        (llama_bricks["qv4"] / "adapter_model.safetensors").read_bytes()
    )
    # No brick names its base: the output names the base directory, and PEFT loads it from there.
    plain = compose(toy_llama, [source(brick_dir)], tmp_path / "plain", output="adapter").out_dir
    assert json.loads((plain / "adapter_config.json").read_text())["base_model_name_or_path"] == str(toy_llama)
    assert f"base_model: {json.dumps(str(toy_llama))}" in (plain / "README.md").read_text()
    with quiet():
        loaded = AutoPeftModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    torch.testing.assert_close(logits(loaded), logits(_peft_model(toy_llama, plain)))

    named = compose(
        toy_llama,
        [source(brick_dir)],
        tmp_path / "named",
        output="adapter",
        base_name_or_path="org/tiny-llama",
        card_base_model="tiny-llama",
    ).out_dir
    assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"
    assert 'base_model: "tiny-llama"' in (named / "README.md").read_text()
