"""Exporting the embedding model to ONNX: once, atomically, and only what it can reproduce."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from registry.errors import ServiceUnavailable
from registry.search.onnx_export import ensure_exported
from registry.settings import EmbeddingSettings

MODEL = EmbeddingSettings().resolved_model_path()


def _linked_copy(tmp_path: Path) -> Path:
    """A copy of the packaged model whose big weight file is a symlink."""
    copy = tmp_path / "model"
    shutil.copytree(MODEL, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    for weights in MODEL.glob("*.safetensors"):
        (copy / weights.name).symlink_to(weights)
    return copy


def test_an_export_is_reused_and_leaves_no_staging(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "minilm"
    first = ensure_exported(MODEL, target)
    assert first.dim == 384
    assert first.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert first.graph.stat().st_size > 10_000_000
    stamp = first.graph.stat().st_mtime_ns
    again = ensure_exported(MODEL, target)
    assert again == first
    assert again.graph.stat().st_mtime_ns == stamp  # not exported a second time
    assert sorted(p.name for p in target.parent.iterdir()) == ["minilm"]


def test_a_damaged_export_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "minilm"
    target.mkdir(parents=True)
    (target / "model.onnx").write_bytes(b"half written")  # no meta.json: never finished
    exported = ensure_exported(MODEL, target)
    assert exported.graph.stat().st_size > 10_000_000
    assert json.loads((target / "meta.json").read_text())["dim"] == 384
    assert sorted(p.name for p in target.parent.iterdir()) == ["minilm"]


def test_a_model_it_cannot_reproduce_is_refused_with_the_way_out(tmp_path: Path) -> None:
    model = _linked_copy(tmp_path)
    pooling = model / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    config.pop("pooling_mode", None)
    pooling.write_text(json.dumps(config))
    target = tmp_path / "cache" / "cls-model"
    with pytest.raises(ServiceUnavailable, match="BRICKYARD_EMBEDDING__RUNTIME=torch"):
        ensure_exported(model, target)
    assert os.listdir(target.parent) == []


def test_an_unwritable_cache_is_a_503_naming_the_setting(tmp_path: Path) -> None:
    """The default cache is in the user's home, which may be read-only (a container user):
    the refusal says where it tried and how to choose another place, before any export."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache's parent should be")
    with pytest.raises(ServiceUnavailable, match="BRICKYARD_EMBEDDING__CACHE_DIR") as refused:
        ensure_exported(MODEL, blocker / "embeddings" / "minilm")
    assert str(blocker / "embeddings") in refused.value.detail
