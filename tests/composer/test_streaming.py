"""Streaming: a full merge's peak memory is bounded by a few tensors, not by the model,
and does not grow with the model's depth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Runs in a fresh interpreter. The kernel's peak-RSS counter (VmHWM) is reset right before
# each merge, so the measure is the merge's own peak, not that of imports or warm-up.
_CHILD = r"""
import json, re, sys
from pathlib import Path
import torch, transformers  # imported before measuring, like any long-running service
from composer import BrickSource, compose

def bricks(paths):
    return [BrickSource(p.name, p / "adapter_config.json", p / "adapter_model.safetensors", 0.5) for p in paths]

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

root = Path(sys.argv[1])
compose(root / "tiny", bricks([root / "tiny-brick"]), root / "out-warm")  # load every code path once
growth = {}
for name in ("shallow", "deep"):
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size
    before = status("VmRSS")
    compose(root / name, bricks([root / f"{name}-a", root / f"{name}-b"]), root / f"out-{name}")
    growth[name] = status("VmHWM") - before
print(json.dumps(growth))
"""

SHAPE = {"hidden": 512, "intermediate": 1536, "vocab": 4096, "num_heads": 8, "num_kv_heads": 8, "dtype": "float32"}
SHARD = 8 * 1000 * 1000


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_full_merge_memory_is_bounded_and_flat_in_depth(tmp_path: Path) -> None:
    from composer.testing import make_synthetic_llama, make_synthetic_lora

    make_synthetic_llama(tmp_path / "tiny", num_layers=1, **{**SHAPE, "hidden": 64, "intermediate": 128, "vocab": 256})
    make_synthetic_lora(tmp_path / "tiny", tmp_path / "tiny-brick", r=4)
    for name, layers in (("shallow", 14), ("deep", 28)):
        make_synthetic_llama(tmp_path / name, num_layers=layers, shard_bytes=SHARD, **SHAPE)  # type: ignore[arg-type]
        make_synthetic_lora(tmp_path / name, tmp_path / f"{name}-a", r=16, seed=1)
        make_synthetic_lora(tmp_path / name, tmp_path / f"{name}-b", r=8, seed=2)
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "shallow").glob("*.safetensors"))
    largest_tensor = SHAPE["vocab"] * SHAPE["hidden"] * 4  # type: ignore[operator]
    assert model_bytes > 10 * SHARD  # the model is many shards...
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True, text=True, check=True, timeout=240
    )
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    # ...and merging it raises the peak resident memory by less than a quarter of it.
    assert growth["shallow"] < model_bytes / 4, (growth, model_bytes)
    # Twice as deep: the peak grows by less than the largest tensor.
    assert growth["deep"] - growth["shallow"] < largest_tensor, (growth, largest_tensor)
