"""The zero-delta check: adapters that leave their base unchanged are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from composer import NEGLIGIBLE_DELTA, InvalidAdapter, measure_delta, parse_lora_config, refuse_negligible_delta
from composer.delta import delta_bound, max_abs_delta, rms


def _settings(adapter: Path):  # type: ignore[no-untyped-def]
    return parse_lora_config(json.loads((adapter / "adapter_config.json").read_text()))


def _peft_default_adapter(base: Path, out: Path) -> Path:
    """An adapter as PEFT saves it before any training: default init, lora_B = 0."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(out))
    return out


def _scaled_copy(adapter: Path, out: Path, factor: float) -> Path:
    """``adapter`` with every lora_B multiplied by ``factor``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    scaled = {k: (v * factor if "lora_B" in k else v).contiguous() for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(scaled, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    return out


def _peft_ratio(base: Path, adapter: Path, module: str) -> float:
    """max |delta| / RMS(W) of ``module`` computed by PEFT itself (its own delta weight)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    layer = model.base_model.model.get_submodule(module)
    delta = layer.get_delta_weight("default").double()
    weight = layer.base_layer.weight.double()
    return float(delta.abs().max() / weight.square().mean().sqrt())


def test_bound_is_above_the_exact_maximum_and_the_blocks_give_the_dense_maximum() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 70)).astype("f4"), rng.normal(size=(600, 4)).astype("f4")
    dense = float(np.abs(2.5 * (b.astype("f8") @ a.astype("f8"))).max())
    assert max_abs_delta(a, b, 2.5, block_rows=64) == pytest.approx(dense, rel=1e-5)
    assert delta_bound(a, b, 2.5) >= dense
    assert rms(np.full((3, 3), -2.0, dtype="f4"), block_rows=2) == pytest.approx(2.0)


def test_bf16_tensors_are_read_exactly_and_the_check_imports_no_torch(toy_llama_bf16: Path, bf16_brick: Path) -> None:
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from composer.delta import read_array
    from composer.header import read_header

    path = next(toy_llama_bf16.glob("*.safetensors"))
    header = read_header(path)
    info = next(i for i in header if i.dtype == "BF16" and len(i.shape) == 2)
    with open(path, "rb") as handle:
        ours = read_array(handle, header, info)
    assert torch.equal(torch.from_numpy(ours), load_file(str(path))[info.name].float())
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from composer import parse_lora_config, refuse_negligible_delta\n"
        f"adapter = Path({str(bf16_brick)!r})\n"
        "settings = parse_lora_config(json.loads((adapter / 'adapter_config.json').read_text()))\n"
        f"refuse_negligible_delta(adapter / 'adapter_model.safetensors', Path({str(toy_llama_bf16)!r}), settings)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_peft_default_init_is_refused_as_all_zero(toy_llama: Path, tmp_path: Path) -> None:
    adapter = _peft_default_adapter(toy_llama, tmp_path / "untrained")
    size = measure_delta(adapter / "adapter_model.safetensors", toy_llama, _settings(adapter))
    assert size.all_zero and size.ratio == 0.0 and size.modules == 4  # q and v in 2 layers
    with pytest.raises(InvalidAdapter) as caught:
        refuse_negligible_delta(adapter / "adapter_model.safetensors", toy_llama, _settings(adapter))
    assert "changes nothing" in caught.value.problems[0] and "exactly zero" in caught.value.problems[0]


def test_trained_adapter_passes_with_the_ratio_peft_computes(toy_llama: Path, llama_bricks: dict[str, Path]) -> None:
    adapter = llama_bricks["qv4"]
    size = refuse_negligible_delta(adapter / "adapter_model.safetensors", toy_llama, _settings(adapter))
    assert size.exact and not size.all_zero and size.module is not None
    assert size.ratio == pytest.approx(_peft_ratio(toy_llama, adapter, size.module), rel=1e-5)
    assert size.ratio >= NEGLIGIBLE_DELTA


def test_tiny_delta_is_refused_as_negligible_and_just_above_the_threshold_passes(
    toy_llama: Path, llama_bricks: dict[str, Path], tmp_path: Path
) -> None:
    source = llama_bricks["qv4"]
    from safetensors import safe_open

    settings = _settings(source)
    with safe_open(str(source / "adapter_model.safetensors"), framework="pt") as tensors:
        keys = list(tensors.keys())
    modules = {k.split("base_model.model.", 1)[1].rsplit(".lora_", 1)[0] for k in keys}
    # The largest ratio of the brick over all its modules, from PEFT.
    largest = max(_peft_ratio(toy_llama, source, module) for module in modules)
    below = _scaled_copy(source, tmp_path / "below", 0.5 * NEGLIGIBLE_DELTA / largest)
    with pytest.raises(InvalidAdapter) as caught:
        refuse_negligible_delta(below / "adapter_model.safetensors", toy_llama, settings)
    assert "negligible" in caught.value.problems[0]
    above = _scaled_copy(source, tmp_path / "above", 2.0 * NEGLIGIBLE_DELTA / largest)
    size = refuse_negligible_delta(above / "adapter_model.safetensors", toy_llama, settings)
    # The scan stops at the first module over the threshold, which need not be the largest.
    assert NEGLIGIBLE_DELTA <= size.ratio <= 2.0 * NEGLIGIBLE_DELTA * (1 + 1e-4)
