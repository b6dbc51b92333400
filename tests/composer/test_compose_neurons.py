"""Neuron operations in compositions (`composer.neurons`): ablate/scale of the composed model
checked against a transformers model with those ``down_proj`` columns zeroed by hand, restrict
against the brick's masked dense delta (full and adapter output), and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from composer import InvalidParams, NeuronFile, NeuronOp, compose, plan_composition, save_neuron_set
from tests.composer.helpers import PREFIX, load_dir, logits, reference_deltas, source

WIDTH = 64  # intermediate size of the toy Llama


@pytest.fixture(scope="module")
def neurons(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, torch.Tensor]]:
    """A neuron file: a few neurons in each of the toy Llama's two layers."""
    sets = {0: torch.tensor([1, 5, 17, 40]), 1: torch.tensor([0, 63, 9])}
    path = tmp_path_factory.mktemp("neurons") / "neurons.safetensors"
    save_neuron_set(path, NeuronFile(neurons=sets, function="code", method="lape"))
    return path, sets


def _down(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_proj"


def test_ablate_equals_zeroing_down_proj_columns_in_a_transformers_model(
    toy_llama: Path, llama_bricks: dict[str, Path], neurons: tuple[Path, dict[int, torch.Tensor]], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    path, sets = neurons
    brick = source(llama_bricks["mixed2"])  # targets down_proj too: the ablation follows the merge
    compose(toy_llama, [brick], tmp_path / "plain")
    compose(toy_llama, [brick], tmp_path / "ablated", neurons=[NeuronOp("code@1", "ablate", path)])

    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    with torch.no_grad():
        for layer, index in sets.items():
            expected.get_submodule(_down(layer)).weight[:, index] = 0.0
    actual = AutoModelForCausalLM.from_pretrained(tmp_path / "ablated", dtype=torch.float32)
    torch.testing.assert_close(logits(actual), logits(expected), rtol=0, atol=0)

    plain, ablated = load_dir(tmp_path / "plain"), load_dir(tmp_path / "ablated")
    changed = {k for k in plain if not torch.equal(plain[k], ablated[k])}
    assert changed == {f"{_down(layer)}.weight" for layer in sets}
    untouched = torch.ones(WIDTH, dtype=torch.bool)
    untouched[sets[0]] = False
    assert torch.equal(ablated[f"{_down(0)}.weight"][:, untouched], plain[f"{_down(0)}.weight"][:, untouched])


def test_scale_multiplies_the_columns_of_an_untargeted_down_proj(
    toy_llama: Path, llama_bricks: dict[str, Path], neurons: tuple[Path, dict[int, torch.Tensor]], tmp_path: Path
) -> None:
    path, sets = neurons
    brick = source(llama_bricks["qv4"])  # no FFN module: down_proj is rewritten by the scale alone
    compose(toy_llama, [brick], tmp_path / "scaled", neurons=[NeuronOp("code@1", "scale", path, factor=2.5)])
    base, scaled = load_dir(toy_llama), load_dir(tmp_path / "scaled")
    for layer, index in sets.items():
        expected = base[f"{_down(layer)}.weight"].clone()
        expected[:, index] *= 2.5
        torch.testing.assert_close(scaled[f"{_down(layer)}.weight"], expected, rtol=1e-6, atol=0)


def test_restrict_equals_the_masked_dense_delta_in_full_and_adapter_output(
    toy_llama: Path, llama_bricks: dict[str, Path], neurons: tuple[Path, dict[int, torch.Tensor]], tmp_path: Path
) -> None:
    path, sets = neurons
    adapter = llama_bricks["all6"]
    restrict = [NeuronOp("code@1", "restrict", path, target=0)]
    deltas = reference_deltas(adapter)

    def masked(module: str) -> torch.Tensor:
        delta = deltas[module]
        parts = module.split(".")
        layer, leaf = int(parts[2]), parts[-1]
        keep = torch.zeros(WIDTH, dtype=torch.bool)
        keep[sets[layer]] = True
        if leaf in ("gate_proj", "up_proj"):
            return delta * keep[:, None]
        if leaf == "down_proj":
            return delta * keep[None, :]
        return torch.zeros_like(delta)  # attention: no neuron there

    compose(toy_llama, [source(adapter)], tmp_path / "full", neurons=restrict)
    base, full = load_dir(toy_llama), load_dir(tmp_path / "full")
    for module in deltas:
        got = full[f"{module}.weight"].double() - base[f"{module}.weight"].double()
        torch.testing.assert_close(got, masked(module), rtol=0, atol=1e-5)

    compose(toy_llama, [source(adapter)], tmp_path / "adapter", output="adapter", neurons=restrict)
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    original = load_file(str(adapter / "adapter_model.safetensors"))
    for module in deltas:
        a = tensors[f"{PREFIX}{module}.lora_A.weight"].double()
        b = tensors[f"{PREFIX}{module}.lora_B.weight"].double()
        assert a.shape == original[f"{PREFIX}{module}.lora_A.weight"].shape  # still a LoRA of the brick's rank
        torch.testing.assert_close(b @ a, masked(module), rtol=0, atol=1e-6)  # adapter output has scaling 1


def test_bad_neuron_operations_are_refused_before_any_weight_is_read(
    toy_llama: Path, llama_bricks: dict[str, Path], neurons: tuple[Path, dict[int, torch.Tensor]], tmp_path: Path
) -> None:
    path, _ = neurons
    wide = tmp_path / "wide.safetensors"
    save_neuron_set(wide, NeuronFile(neurons={0: torch.tensor([WIDTH])}, function="x", method="lape"))
    deep = tmp_path / "deep.safetensors"
    save_neuron_set(deep, NeuronFile(neurons={7: torch.tensor([1])}, function="x", method="lape"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a neuron file")
    bricks = [source(llama_bricks["qv4"])]
    with pytest.raises(InvalidParams) as refused:
        plan_composition(
            toy_llama,
            bricks,
            output="adapter",
            neurons=[
                NeuronOp("a@1", "ablate", path),
                NeuronOp("w@1", "restrict", wide),
                NeuronOp("d@1", "restrict", deep),
                NeuronOp("g@1", "restrict", garbage),
                NeuronOp("t@1", "restrict", path, target=3),
                NeuronOp("s@1", "scale", path),
                NeuronOp("x@1", "explode", path),
            ],
        )
    text = "\n".join(refused.value.problems)
    assert "needs output 'full'" in text  # ablate on an adapter
    assert "layer 0 has 64 neurons" in text
    assert "no FFN output projection in layer 7" in text
    assert "'g@1'" in text
    assert "target brick 3" in text
    assert len(refused.value.problems) == 7


def test_ablate_on_gpt2_zeroes_rows_of_the_conv1d_c_proj(
    toy_gpt2: Path, gpt2_bricks: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    path = tmp_path / "gpt2-neurons.safetensors"
    sets = {0: torch.tensor([2, 11, 30]), 1: torch.tensor([7])}
    save_neuron_set(path, NeuronFile(neurons=sets, function="f", method="lape"))
    brick = source(gpt2_bricks["mlp2"])  # targets c_fc: the neurons' inputs change too
    compose(toy_gpt2, [brick], tmp_path / "plain")
    compose(toy_gpt2, [brick], tmp_path / "ablated", neurons=[NeuronOp("f@1", "ablate", path)])
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    with torch.no_grad():
        for layer, index in sets.items():
            expected.transformer.h[layer].mlp.c_proj.weight[index, :] = 0.0  # Conv1D: in x out
    actual = AutoModelForCausalLM.from_pretrained(tmp_path / "ablated", dtype=torch.float32)
    torch.testing.assert_close(logits(actual), logits(expected), rtol=0, atol=0)
    assert not torch.equal(logits(actual), logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")))
