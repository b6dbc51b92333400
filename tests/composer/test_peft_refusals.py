"""DoRA bricks composed together, and every PEFT adapter the composer refuses, with the
message saying what the adapter is, why it cannot be merged and what to do (one line per
adapter, not one per module)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from composer import IncompatibleBricks, InvalidAdapter, compose, plan_composition
from composer.adapter import parse_lora_config
from composer.basemodel import find_linear_modules, find_mergeable_modules, read_base_model
from tests.composer.helpers import PREFIX, quiet, source
from tests.composer.zoo import ARCHS, load_model, make_adapter, make_base, peft_reference

EMBED = f"{PREFIX}model.embed_tokens"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(ARCHS["llama"], tmp_path_factory.mktemp("refusals") / "llama")


@pytest.fixture(scope="module")
def doras(llama: Path) -> list[Path]:
    root = llama.parent
    return [
        make_adapter(llama, root / "dora-a", seed=1, r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
        make_adapter(llama, root / "dora-b", seed=2, r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj"]),
    ]


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=(torch.arange(0, 32).reshape(2, 16) * 5) % 128).logits


def test_one_dora_brick_gives_peft_merge_and_unload(llama: Path, doras: list[Path], tmp_path: Path) -> None:
    from peft import PeftModel

    with quiet():
        expected = PeftModel.from_pretrained(load_model(llama), doras[0]).merge_and_unload().state_dict()
    merged = load_file(str(compose(llama, [source(doras[0])], tmp_path / "out").out_dir / "model.safetensors"))
    changed = 0
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], atol=2e-6, rtol=1e-5)
        changed += not torch.equal(tensor, load_file(str(llama / "model.safetensors"))[name])
    assert changed == 14  # the 14 projections of 2 layers, nothing else


def test_several_dora_bricks_sum_their_deltas(llama: Path, doras: list[Path], tmp_path: Path) -> None:
    weights = (0.6, -0.4)
    expected = _logits(peft_reference(llama, doras, weights))
    bricks = [source(p, w) for p, w in zip(doras, weights, strict=True)]
    out = compose(llama, bricks, tmp_path / "out", method="linear")
    torch.testing.assert_close(_logits(load_model(out.out_dir)), expected, atol=2e-4, rtol=1e-4)


def test_dora_adapter_output_without_rank_is_refused_naming_the_reason(llama: Path, doras: list[Path]) -> None:
    with pytest.raises(IncompatibleBricks) as caught:
        plan_composition(llama, [source(doras[0]), source(doras[1])], output="adapter")
    problems = caught.value.problems
    assert len(problems) == 2  # one line per brick
    assert all("uses DoRA" in p and "not low-rank" in p and "rank=k" in p for p in problems)


def test_dora_adapter_output_is_truncated_with_its_error_reported(
    llama: Path, doras: list[Path], tmp_path: Path
) -> None:
    result = compose(llama, [source(doras[0])], tmp_path / "out", output="adapter", rank=2)
    assert result.truncation is not None
    assert 0.01 < result.truncation.max_relative_error < 1.0
    record = json.loads((result.out_dir / "brickyard.json").read_text())
    assert record["composer"]["truncation"]["max_relative_error"] == result.truncation.max_relative_error


def test_a_differing_base_layer_weight_is_named(llama: Path, tmp_path: Path) -> None:
    brick = make_adapter(llama, tmp_path / "emb", seed=3, r=2, target_modules=["embed_tokens"])
    tensors = load_file(str(brick / "adapter_model.safetensors"))
    assert f"{EMBED}.base_layer.weight" in tensors  # PEFT's save_embedding_layers
    compose(llama, [source(brick)], tmp_path / "fine")  # the base's own weight: accepted
    tensors[f"{EMBED}.base_layer.weight"][3, 5] += 1.0
    save_file(tensors, str(brick / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleBricks) as caught:
        compose(llama, [source(brick)], tmp_path / "out")
    assert "base_layer.weight" in str(caught.value) and "differs from the base model" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_resized_vocabulary_is_refused_saying_so(llama: Path, tmp_path: Path) -> None:
    brick = make_adapter(llama, tmp_path / "mts", seed=4, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    tensors = load_file(str(brick / "adapter_model.safetensors"))
    head = tensors[f"{PREFIX}lm_head.weight"]
    tensors[f"{PREFIX}lm_head.weight"] = torch.cat([head, head[:2]])
    save_file(tensors, str(brick / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleBricks) as caught:
        plan_composition(llama, [source(brick)])
    (problem,) = caught.value.problems
    assert "lm_head" in problem and "vocabulary was resized" in problem and "130 rows, the base 128" in problem


def test_a_saved_copy_of_a_tied_head_is_refused(tmp_path: Path) -> None:
    gpt2 = make_base(ARCHS["gpt2"], tmp_path / "gpt2")
    brick = tmp_path / "head"
    brick.mkdir()
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 2,
        "target_modules": ["c_attn"],
        "modules_to_save": ["lm_head"],
    }
    (brick / "adapter_config.json").write_text(json.dumps(config))
    save_file({f"{PREFIX}lm_head.weight": torch.zeros(128, 64)}, str(brick / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleBricks) as caught:
        plan_composition(gpt2, [source(brick)])
    (problem,) = caught.value.problems
    assert "tied to the embeddings" in problem and "tie_word_embeddings=false" in problem


def test_missing_dora_magnitudes_are_one_line(llama: Path, doras: list[Path], tmp_path: Path) -> None:
    brick = tmp_path / "no-magnitudes"
    shutil.copytree(doras[0], brick)
    tensors = load_file(str(brick / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, str(brick / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleBricks) as caught:
        plan_composition(llama, [source(brick)])
    (problem,) = caught.value.problems
    assert "no lora_magnitude_vector for 14 of its modules" in problem


@pytest.mark.parametrize(
    ("changes", "what", "advice"),
    [
        ({"peft_type": "LOHA"}, "a LoHa adapter", "merge_and_unload"),
        ({"peft_type": "LOKR"}, "a LoKr adapter", "merge_and_unload"),
        ({"peft_type": "IA3"}, "rescales activations", "merge_and_unload"),
        ({"peft_type": "ADALORA"}, "AdaLoRA", "retrain it as a LoRA"),
        ({"peft_type": "PROMPT_TUNING"}, "virtual tokens", "use it unmerged with PEFT"),
        ({"peft_type": "PREFIX_TUNING"}, "adds learned keys and values", "use it unmerged with PEFT"),
        ({"peft_type": "VERA"}, "not 'LORA'", "merge_and_unload"),
        ({"bias": "all"}, "trains the base model's biases", "retrain with bias='none'"),
        ({"bias": "lora_only"}, "trains the base model's biases", "retrain with bias='none'"),
        ({"lora_bias": True}, "trained bias", "retrain with lora_bias=False"),
        (
            {"target_parameters": ["experts.gate_up_proj"], "use_dora": True},
            "cannot be combined with use_dora",
            "PEFT refuses both",
        ),
        ({"trainable_token_indices": [1, 2]}, "single embedding rows", "modules_to_save"),
        ({"alora_invocation_tokens": [5]}, "per token", "unmerged"),
    ],
)
def test_each_refused_adapter_gets_one_line_saying_what_why_and_what_to_do(
    changes: dict[str, Any], what: str, advice: str
) -> None:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"} | changes
    with pytest.raises(InvalidAdapter) as caught:
        parse_lora_config(config)
    (problem,) = caught.value.problems
    assert what in problem and advice in problem, problem


def test_dora_and_modules_to_save_configs_are_accepted() -> None:
    settings = parse_lora_config(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True, "modules_to_save": ["lm_head"]}
    )
    assert settings.use_dora and settings.modules_to_save == ("lm_head",)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bloom"])
def test_checkpoints_without_the_base_model_prefix_are_found(arch: str, tmp_path: Path) -> None:
    base = make_base(ARCHS[arch], tmp_path / arch)
    layout = read_base_model(base)
    assert not any(name.startswith(("transformer.", "model.")) for name in layout.weight_map)
    linear = find_linear_modules(layout)
    assert len(linear) >= 8  # 2 layers x at least 4 projections
    for name, module in find_mergeable_modules(layout).items():
        assert module.weight_name in layout.weight_map and module.weight_name != f"{name}.weight"


def test_a_saved_copy_holding_nan_is_named(llama: Path, tmp_path: Path) -> None:
    from composer import NonFiniteResult

    brick = make_adapter(llama, tmp_path / "mts", seed=5, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    tensors = load_file(str(brick / "adapter_model.safetensors"))
    tensors[f"{PREFIX}lm_head.weight"][0, 0] = float("nan")
    save_file(tensors, str(brick / "adapter_model.safetensors"))
    with pytest.raises(NonFiniteResult) as caught:
        compose(llama, [source(brick, name="nan@1")], tmp_path / "out")
    assert "'nan@1'" in str(caught.value) and "its saved copy hold NaN or Inf" in str(caught.value)


def test_lm_head_lora_with_its_saved_base_layer_composes(llama: Path, tmp_path: Path) -> None:
    brick = make_adapter(llama, tmp_path / "head", seed=6, r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    assert f"{PREFIX}lm_head.base_layer.weight" in load_file(str(brick / "adapter_model.safetensors"))
    expected = _logits(peft_reference(llama, [brick], [0.5]))
    out = compose(llama, [source(brick, 0.5)], tmp_path / "out")
    torch.testing.assert_close(_logits(load_model(out.out_dir)), expected, atol=2e-4, rtol=1e-4)


def test_dora_on_the_embedding_gives_peft_merge(llama: Path, tmp_path: Path) -> None:
    config = {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["embed_tokens", "v_proj"]}
    brick = make_adapter(llama, tmp_path / "emb-dora", seed=7, **config)
    expected = _logits(peft_reference(llama, [brick], [0.8]))
    out = compose(llama, [source(brick, 0.8)], tmp_path / "out")
    torch.testing.assert_close(_logits(load_model(out.out_dir)), expected, atol=2e-4, rtol=1e-4)
