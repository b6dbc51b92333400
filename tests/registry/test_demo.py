"""``brickyard demo`` runs end to end: the first thing a new user does."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from registry.demo import run_demo


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    assert run_demo(tmp_path / "demo", console) == 0
    output = console.export_text()
    for step in ("register the base model", "POST /v1/bricks -> sentiment@1", "POST /v1/search", "generated:"):
        assert step in output, step
    assert "admin API token" in output
    composed = list((tmp_path / "demo" / "composed").iterdir())
    assert len(composed) == 1 and (composed[0] / "model.safetensors.index.json").exists()
