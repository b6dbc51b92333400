"""Every kind of adapter PEFT writes for a language model, on eight architectures: two
bricks composed linearly (0.7 / 0.3) in full and adapter output give the logits of PEFT's
own merge of each brick, summed as deltas (`zoo.peft_reference`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from composer import compose
from tests.composer.helpers import quiet, source
from tests.composer.zoo import ARCHS, Arch, load_adapter_model, load_model, make_adapter, make_base, peft_reference

WEIGHTS = (0.7, 0.3)
KINDS = ("lora", "dora", "saved", "embedding")


def _ids() -> torch.Tensor:
    return (torch.arange(0, 48).reshape(2, 24) * 7) % 128


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _bricks(arch: Arch, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """LoraConfig arguments of the two bricks of ``kind``."""
    if kind == "lora":
        return (
            {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": [arch.attention, arch.mlp]},
        )
    if kind == "dora":
        # A DoRA brick and a plain one on overlapping modules: they compose in delta space.
        return (
            {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": "all-linear"},
            {"r": 2, "lora_alpha": 2, "target_modules": [arch.attention]},
        )
    if kind == "saved":
        # A tied head is not stored, so tied architectures save an MLP layer instead.
        saved = [arch.mlp] + ([arch.embedding, arch.head] if arch.head else [])
        return (
            {"r": 4, "lora_alpha": 8, "target_modules": [arch.attention], "modules_to_save": saved},
            {"r": 2, "lora_alpha": 4, "target_modules": [arch.attention, arch.mlp]},
        )
    return (
        {"r": 4, "lora_alpha": 8, "target_modules": [arch.embedding, arch.attention]},
        {"r": 2, "lora_alpha": 6, "target_modules": [arch.embedding]},
    )


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peft-zoo")


_BASES: dict[str, Path] = {}


def _base(zoo: Path, arch: Arch) -> Path:
    if arch.name not in _BASES:
        _BASES[arch.name] = make_base(arch, zoo / arch.name)
    return _BASES[arch.name]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_two_bricks_compose_like_peft(zoo: Path, arch_name: str, kind: str) -> None:
    arch = ARCHS[arch_name]
    base = _base(zoo, arch)
    configs = _bricks(arch, kind)
    adapters = [
        make_adapter(base, zoo / f"{arch.name}-{kind}-{i}", seed=100 + i, **config) for i, config in enumerate(configs)
    ]
    expected = _logits(peft_reference(base, adapters, WEIGHTS))
    assert not torch.allclose(expected, _logits(load_model(base)), atol=1e-3)  # the bricks change the model

    bricks = [source(path, weight) for path, weight in zip(adapters, WEIGHTS, strict=True)]
    full = compose(base, bricks, zoo / f"{arch.name}-{kind}-full")
    torch.testing.assert_close(_logits(load_model(full.out_dir)), expected, atol=2e-4, rtol=1e-4)

    # DoRA deltas are full-rank: at a rank no smaller than any module's the SVD is exact.
    rank = 128 if kind == "dora" else None
    adapter = compose(base, bricks, zoo / f"{arch.name}-{kind}-adapter", output="adapter", rank=rank)
    assert adapter.truncation is not None and adapter.truncation.max_relative_error < 1e-5
    with_adapter = load_adapter_model(base, adapter.out_dir)
    if kind == "embedding" and arch.head is None:
        # PEFT's unmerged embedding LoRA does not reach a head tied to the embeddings, its
        # merge does (as ours): compare the merged adapter, which is what the bricks define.
        with quiet():
            with_adapter = with_adapter.merge_and_unload()
    torch.testing.assert_close(_logits(with_adapter), expected, atol=5e-4 if rank else 2e-4, rtol=1e-4)
