"""Atomic publishing, failure modes and progress reporting."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from composer import NonFiniteResult, compose
from tests.composer.helpers import PREFIX, source


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _poisoned(tmp_path: Path, brick: Path, module: str, value: float, factor: str = "lora_B") -> Path:
    target = tmp_path / f"poisoned-{factor}"
    shutil.copytree(brick, target)
    weights = target / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors[f"{PREFIX}{module}.{factor}.weight"][0, 0] = value
    save_file(tensors, str(weights))
    return target


def test_existing_output_is_refused_and_left_alone(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        compose(toy_llama, [source(llama_bricks["qv4"])], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("output", "rank", "method"),
    [
        ("full", None, "linear"),
        ("adapter", None, "linear"),
        ("adapter", 3, "linear"),
        ("full", None, "ties"),
        ("adapter", 3, "ties"),
    ],
)
def test_nan_in_a_brick_names_brick_and_module_and_publishes_nothing(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path], output: str, rank: int | None, method: str
) -> None:
    module = "model.layers.1.self_attn.v_proj"
    bad = _poisoned(tmp_path, llama_bricks["qv4"], module, float("nan"))
    parent = tmp_path / "results"
    parent.mkdir()
    bricks = [source(llama_bricks["all6"], name="good@1"), source(bad, 0.5, name="poisoned@2")]
    with pytest.raises(NonFiniteResult) as caught:
        compose(toy_llama, bricks, parent / "out", output=output, rank=rank, method=method)  # type: ignore[arg-type]
    assert module in caught.value.message
    assert any("poisoned@2" in p and "lora_B" in p for p in caught.value.problems)
    assert not any("good@1" in p for p in caught.value.problems)
    assert list(parent.iterdir()) == []


def test_overflow_of_the_base_dtype_is_caught(tmp_path: Path, toy_llama_bf16: Path, bf16_brick: Path) -> None:
    module = "model.layers.0.mlp.up_proj"
    huge = _poisoned(tmp_path, bf16_brick, module, 1e30, factor="lora_A")
    huge = _poisoned_again(huge, module, 1e30)
    with pytest.raises(NonFiniteResult) as caught:
        compose(toy_llama_bf16, [source(huge, name="huge@1")], tmp_path / "out")
    assert module in caught.value.message and "huge@1" in str(caught.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def _poisoned_again(brick: Path, module: str, value: float) -> Path:
    weights = brick / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors[f"{PREFIX}{module}.lora_B.weight"][:, 0] = value
    save_file(tensors, str(weights))
    return brick


@pytest.mark.parametrize("output", ["full", "adapter"])
def test_progress_is_monotone_and_ends_at_one(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path], output: str
) -> None:
    seen: list[tuple[float, str]] = []
    compose(
        toy_llama,
        [source(llama_bricks["all6"]), source(llama_bricks["qv4"])],
        tmp_path / "out",
        output=output,  # type: ignore[arg-type]
        progress=lambda fraction, message: seen.append((fraction, message)),
    )
    fractions = [f for f, _ in seen]
    assert len(seen) >= 4
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions.count(1.0) == 1
    assert any("model.layers" in message for _, message in seen)


def test_a_crash_midway_leaves_no_output_and_no_staging(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    def explode(fraction: float, message: str) -> None:
        if fraction > 0.3:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        compose(toy_llama, [source(llama_bricks["all6"])], tmp_path / "out", progress=explode)
    assert list(tmp_path.iterdir()) == []


def test_too_little_disk_space_fails_before_writing(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OSError) as caught:
        compose(toy_llama, [source(llama_bricks["qv4"])], tmp_path / "out")
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_output_shards_have_the_base_header_bytes(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    # The header (with its metadata) is copied verbatim: same names, dtypes, shapes, offsets.
    out = tmp_path / "out"
    compose(toy_llama, [source(llama_bricks["qv4"])], out)
    for shard in toy_llama.glob("*.safetensors"):
        produced = (out / shard.name).read_bytes()
        original = shard.read_bytes()
        assert len(produced) == len(original)
        header_end = 8 + int.from_bytes(original[:8], "little")
        assert produced[:header_end] == original[:header_end]


def test_torch_thread_setting_is_restored(tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]) -> None:
    import torch

    before = torch.get_num_threads()
    compose(toy_llama, [source(llama_bricks["qv4"])], tmp_path / "full")
    compose(toy_llama, [source(llama_bricks["qv4"])], tmp_path / "adapter", output="adapter", rank=2)
    bad = _poisoned(tmp_path, llama_bricks["qv4"], "model.layers.0.self_attn.q_proj", float("inf"))
    with pytest.raises(NonFiniteResult):
        compose(toy_llama, [source(bad)], tmp_path / "failed")
    assert torch.get_num_threads() == before
