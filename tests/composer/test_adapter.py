"""Unit tests of adapter_config.json parsing and adapter tensor grouping (no model, no I/O)."""

from __future__ import annotations

import pytest

from composer import InvalidAdapter, map_adapter_tensors, parse_lora_config

_PREFIX = "base_model.model.model.layers.0.self_attn"


def _config(**overrides: object) -> dict[str, object]:
    config: dict[str, object] = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    config.update(overrides)
    return config


def test_scaling_follows_rank_and_alpha_patterns_and_rslora() -> None:
    settings = parse_lora_config(
        _config(rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2})
    )
    assert settings.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert settings.scaling_for("model.layers.0.self_attn.v_proj") == 16 / 4
    assert settings.scaling_for("model.layers.0.self_attn.q_proj") == 16 / 8
    assert settings.scaling_for("model.layers.1.self_attn.q_proj") == 2 / 8
    rs = parse_lora_config(_config(use_rslora=True))
    assert rs.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(16 / 8**0.5)


def test_lora_alpha_defaults_to_r_and_targets_honour_exclusions() -> None:
    settings = parse_lora_config(
        {"peft_type": "LORA", "r": 4, "target_modules": "all-linear", "exclude_modules": ["lm_head"]}
    )
    assert settings.lora_alpha == 4
    assert settings.targets("model.layers.0.mlp.up_proj")
    assert not settings.targets("lm_head")
    suffix = parse_lora_config(_config())
    assert suffix.targets("model.layers.3.self_attn.q_proj")
    assert not suffix.targets("model.layers.3.self_attn.k_proj")
    assert not suffix.targets("model.layers.3.self_attn.xq_proj")  # a suffix match is per dotted name


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(InvalidAdapter) as caught:
        parse_lora_config(_config(r=0, lora_alpha=float("inf"), use_rslora="yes", bias="all"))
    problems = caught.value.problems
    assert any(p.startswith("r must be a positive integer") for p in problems)
    assert any(p.startswith("lora_alpha must be a positive finite number") for p in problems)
    assert any(p.startswith("use_rslora must be true or false") for p in problems)
    assert any(p.startswith("bias is 'all'") for p in problems)
    assert len(problems) == 4


@pytest.mark.parametrize("document", [[], "LORA", None, 3])
def test_a_config_that_is_not_an_object_is_refused(document: object) -> None:
    with pytest.raises(InvalidAdapter) as caught:
        parse_lora_config(document)
    assert caught.value.problems == ["the document is not a JSON object"]


def test_a_non_lora_config_is_one_line() -> None:
    with pytest.raises(InvalidAdapter) as caught:
        parse_lora_config({"peft_type": "IA3", "r": "nonsense"})
    assert len(caught.value.problems) == 1
    assert "'IA3'" in caught.value.problems[0]


def test_tensors_are_grouped_by_module_and_kind() -> None:
    names = [
        f"{_PREFIX}.q_proj.lora_A.weight",
        f"{_PREFIX}.q_proj.lora_B.weight",
        f"{_PREFIX}.q_proj.lora_magnitude_vector",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
        "base_model.model.score.weight",
        "base_model.model.score.bias",
        "base_model.model.lm_head.base_layer.weight",
    ]
    tensors = map_adapter_tensors(reversed(names))
    assert tensors.modules == {
        "model.embed_tokens": (names[3], names[4]),
        "model.layers.0.self_attn.q_proj": (names[0], names[1]),
    }
    assert list(tensors.modules) == sorted(tensors.modules)
    assert tensors.magnitudes == {"model.layers.0.self_attn.q_proj": names[2]}
    assert tensors.copies == {"score": names[5]}
    assert tensors.bias_copies == {"score": names[6]}
    assert tensors.base_layers == {"lm_head": names[7]}


def test_incomplete_or_unknown_tensors_are_all_named() -> None:
    names = [
        f"{_PREFIX}.q_proj.lora_A.weight",  # no B
        f"{_PREFIX}.k_proj.hada_w1_a",  # LoHa, not LoRA
        "base_model.model.head.bias",  # a bias without its weight
        f"{_PREFIX}.v_proj.lora_magnitude_vector",  # DoRA magnitude without factors
    ]
    with pytest.raises(InvalidAdapter) as caught:
        map_adapter_tensors(names)
    problems = caught.value.problems
    assert any("'model.layers.0.self_attn.q_proj' has no lora_B" in p for p in problems)
    assert any("hada_w1_a" in p and "is not a LoRA tensor" in p for p in problems)
    assert any("'head' has a saved bias but no saved weight" in p for p in problems)
    assert any("'model.layers.0.self_attn.v_proj' has a DoRA magnitude vector" in p for p in problems)


def test_an_empty_weights_file_is_refused() -> None:
    with pytest.raises(InvalidAdapter) as caught:
        map_adapter_tensors([])
    assert caught.value.problems == ["the weights file holds no LoRA tensors"]
