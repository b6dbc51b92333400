"""Mixture-of-experts bases: adapters trained when Mixtral's experts and router were
``nn.Linear`` modules (``block_sparse_moe.experts.N.w1/w2/w3``, ``block_sparse_moe.gate``)
merge into the checkpoint's own 2-D tensors of those names, although transformers 5 builds
fused 3-D expert tensors from them; and the merged checkpoint loads like the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from composer import compose
from tests.composer.helpers import PREFIX, quiet, source
from tests.composer.zoo import MOE_ARCHS, load_adapter_model, load_model, make_adapter, make_base, peft_reference


def _mixtral(path: Path) -> Path:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with quiet():
        transformers.MixtralForCausalLM(config).save_pretrained(path)
    return path


def _legacy_adapter(base: Path, out: Path, seed: int, r: int, alpha: float) -> dict[str, torch.Tensor]:
    """A LoRA on every expert's w1/w2/w3, the router and q_proj, as PEFT saved them for
    the nn.Linear Mixtral; returns the expected delta per checkpoint tensor."""
    stored = load_file(str(base / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name, weight in stored.items():
        if not any(part in name for part in (".w1.", ".w2.", ".w3.", "block_sparse_moe.gate.", "q_proj.")):
            continue
        module = name.removesuffix(".weight")
        a = torch.randn(r, weight.shape[1], generator=generator) * 0.1
        b = torch.randn(weight.shape[0], r, generator=generator) * 0.1
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
        deltas[name] = (alpha / r) * b.double() @ a.double()
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["w1", "w2", "w3", "gate", "q_proj"],
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return deltas


def test_legacy_expert_adapters_land_on_the_checkpoints_own_tensors(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = _mixtral(tmp_path / "mixtral")
    stored = load_file(str(base / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in stored  # the checkpoint's names
    first = _legacy_adapter(base, tmp_path / "a", seed=1, r=4, alpha=8)
    second = _legacy_adapter(base, tmp_path / "b", seed=2, r=2, alpha=2)
    out = compose(base, [source(tmp_path / "a", 0.7), source(tmp_path / "b", 0.3)], tmp_path / "out")
    merged = load_file(str(out.out_dir / "model.safetensors"))
    assert merged.keys() == stored.keys()
    for name, weight in stored.items():
        expected = weight.double() + 0.7 * first.get(name, 0.0) + 0.3 * second.get(name, 0.0)
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-6, rtol=1e-6)
    assert len(first) == 2 * (4 * 3 + 2)  # every expert's w1/w2/w3, the router and q_proj, 2 layers

    # transformers still reads the merged checkpoint into its fused experts.
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(out.out_dir, dtype=torch.float32)
    fused = model.model.layers[1].mlp.experts.down_proj[2]
    torch.testing.assert_close(fused, merged["model.layers.1.block_sparse_moe.experts.2.w2.weight"])


# -- target_parameters: LoRA on the fused 3-D expert tensors and the router (PEFT's ParamWrapper)


def _qwen3_moe(path: Path) -> Path:
    return make_base(MOE_ARCHS["qwen3_moe"], path)


_FUSED_BASES = {"qwen3_moe": _qwen3_moe, "mixtral": _mixtral}
# PEFT 0.21's "all-linear" on a transformers 5 MoE: attention modules plus target_parameters
# gate_up_proj (rank and alpha doubled by rank_pattern/alpha_pattern), down_proj and the router.
_FUSED_BRICKS = (
    {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    {
        "r": 2,
        "lora_alpha": 6,
        "use_rslora": True,
        "target_modules": ["v_proj"],
        "target_parameters": ["experts.down_proj"],
    },
)


def _ids() -> torch.Tensor:
    return (torch.arange(0, 48).reshape(2, 24) * 7) % 128


def _logits(model: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits  # type: ignore[operator]


@pytest.fixture(scope="module", params=list(_FUSED_BASES))
def fused(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A base with fused experts and two PEFT target_parameters adapters on it."""
    root = tmp_path_factory.mktemp(f"fused-{request.param}")
    base = _FUSED_BASES[request.param](root / "base")
    adapters = [make_adapter(base, root / f"brick{i}", seed=50 + i, **c) for i, c in enumerate(_FUSED_BRICKS)]
    return base, adapters


def test_all_linear_on_fused_experts_writes_target_parameters(fused: tuple[Path, list[Path]]) -> None:
    _, adapters = fused
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["down_proj", "gate.weight", "gate_up_proj"]
    stored = load_file(str(adapters[0] / "adapter_model.safetensors"))
    # gate_up_proj (the module's first parameter) is the inner wrapper: rank 8 x 4 experts.
    assert stored[f"{PREFIX}model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (32, 64)
    assert stored[f"{PREFIX}model.layers.0.mlp.experts.lora_A.weight"].shape[0] == 16


def test_fused_expert_bricks_compose_like_peft_in_full_output(fused: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, adapters = fused
    expected_model = peft_reference(base, adapters, (0.7, 0.3))
    expected = _logits(expected_model)
    assert not torch.allclose(expected, _logits(load_model(base)), atol=1e-3)  # the bricks change the model
    out = compose(base, [source(adapters[0], 0.7), source(adapters[1], 0.3)], tmp_path / "full")
    merged = load_model(out.out_dir)
    torch.testing.assert_close(_logits(merged), expected, atol=1e-4, rtol=1e-4)
    # The checkpoint keeps its own per-expert names; transformers reads them into the fused
    # tensors that PEFT's merge changed.
    assert load_file(str(out.out_dir / "model.safetensors")).keys() == load_file(str(base / "model.safetensors")).keys()
    original = load_model(base).model.layers[1].mlp
    for part in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
        assert not torch.allclose(merged.model.layers[1].mlp.get_parameter(part), original.get_parameter(part))
    reference = expected_model.state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, reference[name], atol=1e-5, rtol=1e-5)


def test_fused_expert_bricks_compose_into_one_adapter_peft_loads(
    fused: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, adapters = fused
    expected = _logits(peft_reference(base, adapters, (0.7, 0.3)))
    out = compose(base, [source(adapters[0], 0.7), source(adapters[1], 0.3)], tmp_path / "adapter", output="adapter")
    config = json.loads((out.out_dir / "adapter_config.json").read_text())
    assert any(name.endswith("experts.gate_up_proj") for name in config["target_parameters"])
    assert out.truncation is not None and out.truncation.max_relative_error == 0.0
    torch.testing.assert_close(_logits(load_adapter_model(base, out.out_dir)), expected, atol=1e-4, rtol=1e-4)


def test_one_fused_brick_at_weight_one_is_peft_merge_and_unload(fused: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, adapters = fused
    out = compose(base, [source(adapters[0], 1.0)], tmp_path / "one")
    expected = _logits(peft_reference(base, adapters[:1], (1.0,)))
    torch.testing.assert_close(_logits(load_model(out.out_dir)), expected, atol=1e-4, rtol=1e-4)


def test_fused_expert_bricks_refuse_an_adapter_output_they_cannot_be_exact_in(
    fused: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    from composer import IncompatibleBricks

    base, adapters = fused
    bricks = [source(adapters[0], 0.7, name="moe@1"), source(adapters[1], 0.3, name="moe@2")]
    for kwargs in ({"rank": 4}, {"method": "ties", "rank": 4}):
        with pytest.raises(IncompatibleBricks) as caught:
            compose(base, bricks, tmp_path / "out", output="adapter", **kwargs)  # type: ignore[arg-type]
        assert len(caught.value.problems) == 2
        assert "'moe@1' adapts raw parameters (target_parameters" in caught.value.problems[0]
        assert "compose output='full'" in caught.value.problems[0]
    assert not (tmp_path / "out").exists()
    # A truncated full merge needs no rank: the same bricks compose with TIES in full.
    compose(base, bricks, tmp_path / "ties", method="ties")


def test_target_parameters_that_select_nothing_or_lack_factors_are_named(
    fused: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    from composer import IncompatibleBricks, plan_composition

    base, adapters = fused
    config = json.loads((adapters[1] / "adapter_config.json").read_text())
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "adapter_config.json").write_text(json.dumps(config | {"target_parameters": ["experts.no_such"]}))
    tensors = load_file(str(adapters[1] / "adapter_model.safetensors"))
    save_file(tensors, str(nothing / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleBricks) as caught:
        plan_composition(base, [source(nothing)])
    assert any("select no parameter of the base model" in p for p in caught.value.problems), caught.value.problems

    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if "experts" not in k}, str(missing / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleBricks) as caught:
        plan_composition(base, [source(missing)])
    (problem,) = caught.value.problems
    assert "selects 2 parameters whose factors the weights do not hold" in problem
    assert "(first: 'model.layers.0.mlp.experts.down_proj', which PEFT saves as 'model.layers.0.mlp.experts" in problem


def test_a_checkpoint_storing_fused_expert_tensors_is_refused_saying_so(tmp_path: Path) -> None:
    from composer import IncompatibleBricks, plan_composition

    base = _qwen3_moe(tmp_path / "base")
    stored = load_file(str(base / "model.safetensors"))
    fused: dict[str, torch.Tensor] = {}
    for name, value in stored.items():
        if ".experts." not in name:
            fused[name] = value
    for layer in range(2):
        experts = f"model.layers.{layer}.mlp.experts"
        fused[f"{experts}.gate_up_proj"] = torch.stack(
            [
                torch.cat([stored[f"{experts}.{e}.gate_proj.weight"], stored[f"{experts}.{e}.up_proj.weight"]])
                for e in range(4)
            ]
        )
        fused[f"{experts}.down_proj"] = torch.stack([stored[f"{experts}.{e}.down_proj.weight"] for e in range(4)])
    save_file(fused, str(base / "model.safetensors"), {"format": "pt"})
    brick = make_adapter(base, tmp_path / "brick", seed=3, r=2, target_parameters=["experts.down_proj"])
    with pytest.raises(IncompatibleBricks) as caught:
        plan_composition(base, [source(brick)])
    (problem,) = caught.value.problems  # one line for both layers
    assert "selects 2 parameters (first: 'model.layers.0.mlp.experts.down_proj')" in problem
    assert "stores the fused 3-D tensor itself" in problem
