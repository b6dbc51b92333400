"""``brickyard demo`` runs end to end: the first thing a new user does."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from registry.demo import run_demo


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    # Step 8 (the trained test bed) is the next test: together they took more than the
    # 300 s budget of one test on the loaded 2-core machine.
    assert run_demo(tmp_path / "demo", console, skills=False) == 0
    output = console.export_text()
    for step in ("register the base model", "POST /v1/bricks -> sentiment@1", "POST /v1/search", "generated:"):
        assert step in output, step
    assert "admin API token" in output
    composed = list((tmp_path / "demo" / "composed").iterdir())
    assert len(composed) == 1 and (composed[0] / "model.safetensors.index.json").exists()


@pytest.mark.timeout(900)  # builds the small test bed when no earlier test did (2-3 min alone, more under load)
def test_composed_models_of_the_test_bed_do_their_tasks(tmp_path: Path) -> None:
    """The skills part alone, against an in-process server: every composed model beats the base
    on its task's held-out set, by the amount the test bed documents for its bricks."""
    from fastapi.testclient import TestClient

    from composer.testbed import BASE_MAX_ACCURACY, BRICK_MIN_ACCURACY
    from registry.api.app import create_app
    from registry.client import RemoteClient
    from registry.demo_skills import show_skills
    from registry.settings import ComposeSettings, Settings

    settings = Settings(home=tmp_path / "home", compose=ComposeSettings(isolation="thread"), auth={"enabled": False})
    console = Console(record=True, width=200)
    with TestClient(create_app(settings)) as http, RemoteClient("http://testserver", http=http) as client:
        scores = show_skills(client, tmp_path, console)
    assert set(scores) == {"sentiment", "maximum", "parity"}
    for task, (base, composed) in scores.items():
        assert base <= BASE_MAX_ACCURACY, task
        assert composed >= BRICK_MIN_ACCURACY["small"], (task, composed)
