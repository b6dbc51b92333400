"""Search is fresh after writes made by another process: a long-lived registry (as a server
holds it) answers searches while `brickyard brick push / edit / rm` run against the same home
and database through the local CLI in a subprocess, on both backends."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import random_adapter


def _cli(settings: Any, *args: str) -> str:
    """Run the local CLI (no --url: it opens the database itself) in a new process."""
    env = {
        **os.environ,
        "BRICKYARD_HOME": str(settings.home),
        "BRICKYARD_DATABASE_URL": settings.database_url,
        "BRICKYARD_EMBEDDING__ISOLATION": "thread",
    }
    env.pop("BRICKYARD_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "registry", *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _adapter(tmp_path: Path, seed: int) -> Path:
    config, weights = random_adapter(seed)
    path = tmp_path / f"adapter-{seed}"
    path.mkdir()
    (path / "adapter_config.json").write_bytes(config)
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def _top(registry: Any, query: str, **options: Any) -> tuple[str, str]:
    hits = registry.search({"query": query, "k": 1, **options}).hits
    assert hits, f"no hit for {query!r}"
    return hits[0].brick.ref, hits[0].text


@pytest.mark.slow
def test_searches_see_pushes_edits_and_deletions_made_by_another_process(
    registry: Any, settings: Any, llama_base: Path, tmp_path: Path
) -> None:
    registry.add_base_model({"name": "tiny-llama", "path": str(llama_base)})
    sentiment = "Classify the sentiment of a product review as positive or negative."
    config, weights = random_adapter(1)
    meta = {"name": "sentiment", "base_model": "tiny-llama", "description": sentiment, "examples": ["I love it!"]}
    registry.register_brick(meta, config, io.BytesIO(weights))
    # The server process has searched (and so loaded its index and cached its hits) before
    # anything else happens.
    assert _top(registry, "is this review positive or negative")[0] == "sentiment@1"

    # 1. A brick pushed by another process is found.
    sql = "Write a SQL query that answers a question about a database table."
    _cli(settings, "brick", "push", str(_adapter(tmp_path, 2)), "-n", "sql", "-b", "tiny-llama", "-d", sql,
         "-e", "How many employees earn more than 50000?")  # fmt: skip
    assert _top(registry, "write a SQL query for my question about a table") == ("sql@1", sql)

    # 2. An edited description is what matches, and the old one no longer does.
    weather = "Forecast tomorrow's weather from today's barometric pressure readings."
    _cli(settings, "brick", "edit", "sql@1", "-d", weather, "-e", "pressure 1012 hPa, falling fast")
    assert _top(registry, "predict the weather from barometer readings") == ("sql@1", weather)
    assert _top(registry, "write a SQL query for my question about a table")[1] != sql

    # 3. A new version pushed elsewhere replaces the old one in searches of latest versions.
    _cli(settings, "brick", "push", str(_adapter(tmp_path, 3)), "-n", "sql", "-b", "tiny-llama", "-d", weather)
    assert _top(registry, "predict the weather from barometer readings")[0] == "sql@2"

    # 4. Tags edited elsewhere filter at once.
    _cli(settings, "brick", "edit", "sentiment@1", "-t", "reviews")
    assert _top(registry, "predict the weather from barometer readings", tags=["reviews"])[0] == "sentiment@1"

    # 5. Deleted elsewhere: never returned again; the previous version is the latest again.
    _cli(settings, "brick", "rm", "-y", "sql@2")
    hits = registry.search({"query": "predict the weather from barometer readings", "k": 5}).hits
    assert hits[0].brick.ref == "sql@1"
    assert "sql@2" not in {h.brick.ref for h in hits}
    _cli(settings, "brick", "rm", "-y", "sql@1")
    hits = registry.search({"query": "predict the weather from barometer readings", "k": 5}).hits
    assert [h.brick.ref for h in hits] == ["sentiment@1"]
