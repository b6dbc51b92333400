"""Full merges: the output model equals PEFT's exact merge (or the definition), keeps the
base's dtype and sharding, and loads with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from composer import compose, get_method
from composer.header import read_header
from composer.methods import ops
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

TOLERANCE = 1e-5  # relative error of the merged delta, float32


def _assert_deltas(out: Path, base: Path, expected: dict[str, torch.Tensor], tolerance: float = TOLERANCE) -> None:
    """Every tensor of ``out`` equals the base plus ``expected[module]`` (relative to the
    delta), and tensors without a delta are bit-identical to the base."""
    merged, original = load_dir(out), load_dir(base)
    assert merged.keys() == original.keys()
    touched = {f"{module}.weight" for module in expected}
    for name, tensor in merged.items():
        assert tensor.dtype == original[name].dtype and tensor.shape == original[name].shape, name
        if name in touched:
            delta = expected[name.removesuffix(".weight")]
            error = relative_error(tensor.double() - original[name].double(), delta)
            assert error < tolerance, (name, error)
        else:
            assert torch.equal(tensor, original[name]), name


def _combined(bricks: list[tuple[Path, float]], *, fan_in_fan_out: bool = False) -> dict[str, torch.Tensor]:
    """``sum_i w_i * s_i * B_i @ A_i`` per module, from the raw files (float64)."""
    total: dict[str, torch.Tensor] = {}
    for path, weight in bricks:
        for module, delta in reference_deltas(path, fan_in_fan_out=fan_in_fan_out).items():
            total[module] = total.get(module, torch.zeros_like(delta)) + weight * delta
    return total


def test_linear_equals_peft_cat_for_mixed_ranks_patterns_and_targets(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    chosen = [(llama_bricks["qv4"], 0.7), (llama_bricks["mixed2"], -0.4), (llama_bricks["all6"], 1.3)]
    out = tmp_path / "out"
    compose(toy_llama, [source(p, w) for p, w in chosen], out)
    oracle = peft_merged(toy_llama, [p for p, _ in chosen], [w for _, w in chosen], "cat")
    merged, original = load_dir(out), load_dir(toy_llama)
    touched = 0
    for name, tensor in merged.items():
        expected = oracle[name]
        if torch.equal(expected, original[name]):
            assert torch.equal(tensor, original[name]), name
            continue
        touched += 1
        assert relative_error(tensor - original[name], expected - original[name]) < TOLERANCE, name
    assert touched == 14  # all seven projections of both layers
    _assert_deltas(out, toy_llama, _combined(chosen))


def test_rslora_delta_is_alpha_over_sqrt_r_times_b_a(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    # PEFT's cat path rescales rsLoRA adapters wrongly, so the definition is the oracle here.
    chosen = [(llama_bricks["rs8"], 0.8), (llama_bricks["qv4"], 0.5)]
    compose(toy_llama, [source(p, w) for p, w in chosen], tmp_path / "out")
    expected = _combined(chosen)
    q = expected["model.layers.0.self_attn.k_proj"]
    a = load_file(str(llama_bricks["rs8"] / "adapter_model.safetensors"))
    key = f"{PREFIX}model.layers.0.self_attn.k_proj"
    by_hand = 0.8 * (4 / 8**0.5) * (a[f"{key}.lora_B.weight"].double() @ a[f"{key}.lora_A.weight"].double())
    torch.testing.assert_close(q, by_hand)  # the reference really uses alpha / sqrt(r)
    _assert_deltas(tmp_path / "out", toy_llama, expected)


def test_conv1d_modules_get_the_transposed_delta(tmp_path: Path, toy_gpt2: Path, gpt2_bricks: dict[str, Path]) -> None:
    chosen = [(gpt2_bricks["attn4"], 1.0), (gpt2_bricks["mlp2"], -0.6)]
    out = tmp_path / "out"
    compose(toy_gpt2, [source(p, w) for p, w in chosen], out)
    _assert_deltas(out, toy_gpt2, _combined(chosen, fan_in_fan_out=True))
    oracle = peft_merged(toy_gpt2, [p for p, _ in chosen], [w for _, w in chosen], "cat")
    merged = load_dir(out)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, oracle[name], rtol=1e-5, atol=1e-6)


def test_output_keeps_sharding_and_loads_with_transformers(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    recipe = {"bricks": [{"name": "qv4", "version": 3, "sha256": "ab" * 32}], "base": "tiny"}
    result = compose(toy_llama, [source(llama_bricks["qv4"], 1.0, name="qv4@3")], out, recipe=recipe)
    base_files = sorted(p.name for p in toy_llama.iterdir())
    assert sorted(f.name for f in result.files) == sorted([*base_files, "README.md", "brickyard.json"])
    assert {f.name: f.size for f in result.files} == {p.name: p.stat().st_size for p in out.iterdir()}
    for shard in toy_llama.glob("*.safetensors"):
        # Same names, dtypes, shapes and offsets: the header bytes are identical.
        ours, theirs = read_header(out / shard.name), read_header(shard)
        assert ours == theirs
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == json.loads((toy_llama / "model.safetensors.index.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (toy_llama / "tokenizer.json").read_bytes()
    record = json.loads((out / "brickyard.json").read_text())
    assert record["recipe"] == recipe
    assert record["composer"]["method"] == "linear" and record["composer"]["output"] == "full"
    assert record["composer"]["bricks"][0]["name"] == "qv4@3" and record["composer"]["bricks"][0]["weight"] == 1.0
    assert len(record["composer"]["base"]["fingerprint"]) == 64
    assert "qv4@3" in (out / "README.md").read_text()
    # One brick at weight 1 is that brick: the merged model behaves like base + adapter.
    with quiet():
        merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        adapter_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(toy_llama, dtype=torch.float32), llama_bricks["qv4"]
        )
    torch.testing.assert_close(logits(merged_model), logits(adapter_model), rtol=1e-4, atol=1e-4)


def test_bfloat16_base_stays_bfloat16_and_adds_in_float32(
    tmp_path: Path, toy_llama_bf16: Path, bf16_brick: Path
) -> None:
    out = tmp_path / "out"
    compose(toy_llama_bf16, [source(bf16_brick, 0.9)], out)
    merged, original = load_dir(out), load_dir(toy_llama_bf16)
    assert not (out / "model.safetensors.index.json").exists()
    deltas = _combined([(bf16_brick, 0.9)])
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        module = name.removesuffix(".weight")
        if module in deltas:
            expected = (original[name].double() + deltas[module]).to(torch.bfloat16)
            # Identical up to the rounding of the float32 sum, at most one bfloat16 step.
            torch.testing.assert_close(tensor.float(), expected.float(), rtol=2**-7, atol=0)
            assert float((tensor.float() != expected.float()).float().mean()) < 0.01
        else:
            assert torch.equal(tensor, original[name])


def test_opposite_weights_on_the_same_brick_give_back_the_base(
    tmp_path: Path, toy_llama_bf16: Path, bf16_brick: Path
) -> None:
    out = tmp_path / "out"
    compose(toy_llama_bf16, [source(bf16_brick, 1.0), source(bf16_brick, -1.0)], out, method="dare_ties")
    merged, original = load_dir(out), load_dir(toy_llama_bf16)
    for name, tensor in merged.items():
        assert torch.equal(tensor, original[name]), name


@pytest.mark.parametrize(
    ("method", "params", "peft_type"),
    [
        ("ties", {"density": 0.4, "majority_sign_method": "total"}, "ties_svd"),
        ("ties", {"density": 0.7, "majority_sign_method": "frequency"}, "ties_svd"),
        ("magnitude_prune", {"density": 0.3}, "magnitude_prune_svd"),
    ],
)
def test_sparsifying_methods_equal_peft_svd_variants_at_full_rank(
    tmp_path: Path,
    toy_llama: Path,
    llama_bricks: dict[str, Path],
    method: str,
    params: dict[str, object],
    peft_type: str,
) -> None:
    chosen = [(llama_bricks["qv4"], 0.9), (llama_bricks["all6"], -0.5), (llama_bricks["mixed2"], 0.6)]
    out = tmp_path / "out"
    compose(toy_llama, [source(p, w) for p, w in chosen], out, method=method, params=params)
    kwargs = {k: v for k, v in params.items()}
    # An SVD of full rank (32 = the largest min(out, in)) reconstructs PEFT's merged delta exactly.
    oracle = peft_merged(
        toy_llama,
        [p for p, _ in chosen],
        [w for _, w in chosen],
        peft_type,
        svd_rank=32,
        svd_full_matrices=False,
        **kwargs,
    )
    merged, original = load_dir(out), load_dir(toy_llama)
    for name, tensor in merged.items():
        expected_delta = oracle[name] - original[name]
        if not expected_delta.any():
            assert torch.equal(tensor, original[name]), name
            continue
        assert relative_error(tensor - original[name], expected_delta) < 1e-4, name


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_the_definition_and_is_reproducible(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path], method: str
) -> None:
    from peft.utils import merge_utils

    chosen = [(llama_bricks["qv4"], 0.9), (llama_bricks["all6"], -0.5)]
    params = {"density": 0.6, "seed": 5}
    compose(toy_llama, [source(p, w) for p, w in chosen], tmp_path / "a", method=method, params=params)
    compose(toy_llama, [source(p, w) for p, w in chosen], tmp_path / "b", method=method, params=params)
    compose(toy_llama, [source(p, w) for p, w in chosen], tmp_path / "c", method=method, params={**params, "seed": 6})
    first, again, other = load_dir(tmp_path / "a"), load_dir(tmp_path / "b"), load_dir(tmp_path / "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    # Reference: PEFT's DARE functions on the raw deltas, each brick's mask drawn from the
    # global generator seeded as the recipe specifies (seed, module, digest of the factors).
    import hashlib

    raw = [load_file(str(p / "adapter_model.safetensors")) for p, _ in chosen]
    deltas = [reference_deltas(p) for p, _ in chosen]
    original = load_dir(toy_llama)
    for module in set(deltas[0]) | set(deltas[1]):
        present = [i for i in range(2) if module in deltas[i]]
        dropped = []
        for i in present:
            key = f"{PREFIX}{module}"
            digest = hashlib.sha256()
            digest.update(raw[i][f"{key}.lora_A.weight"].numpy().tobytes())
            digest.update(raw[i][f"{key}.lora_B.weight"].numpy().tobytes())
            torch.manual_seed(ops.mask_seed(5, module, digest.hexdigest()))
            dropped.append(merge_utils.random_pruning(deltas[i][module].float(), 0.6, rescale=True))
        weights = torch.tensor([chosen[i][1] for i in present])
        if method == "dare_linear":
            expected = merge_utils.task_arithmetic(dropped, weights)
        else:
            stacked = torch.stack(dropped)
            mask = merge_utils.calculate_majority_sign_mask(stacked, "total")
            expected = merge_utils.disjoint_merge(stacked * weights.reshape(-1, 1, 1), mask)
        name = f"{module}.weight"
        assert relative_error(first[name] - original[name], expected) < 1e-5, name


def test_every_method_composes_gpt2(tmp_path: Path, toy_gpt2: Path, gpt2_bricks: dict[str, Path]) -> None:
    for index, name in enumerate(["ties", "dare_linear", "magnitude_prune"]):
        method = get_method(name)
        out = tmp_path / f"out{index}"
        compose(toy_gpt2, [source(gpt2_bricks["attn4"], 1.0)], out, method=name, params={"density": 1.0})
        # density 1 keeps everything: one brick at weight 1 is that brick, for every method.
        _assert_deltas(out, toy_gpt2, _combined([(gpt2_bricks["attn4"], 1.0)], fan_in_fan_out=True))
        assert method.name == name
