"""``brickyard emergent find`` and ``show`` on the local registry (both backends)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from registry.cli.app import app


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, settings: Any) -> Any:
    monkeypatch.setenv("BRICKYARD_HOME", str(settings.home))
    monkeypatch.setenv("BRICKYARD_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("BRICKYARD_EMBEDDING__ISOLATION", "thread")
    monkeypatch.delenv("BRICKYARD_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "250")
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> Any:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def test_find_registers_bricks_and_show_prints_the_verification_table(
    cli: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    cli("base", "add", str(llama_base), "--name", "tiny-llama")
    digits = tmp_path / "digits.txt"
    digits.write_text("\n".join(f"{i} {i * 7} {i * 13} {i * 31}" for i in range(8)) + "\n\n")
    words = tmp_path / "words.json"
    words.write_text(json.dumps({"description": "English words.", "texts": [f"a {w} walked home" for w in "abcdefgh"]}))
    out = cli(
        "emergent", "find", "--base", "tiny-llama", "--probe", f"digits={digits}", "--probe", f"words={words}",
        "--describe", "digits=Numbers written with digits.", "--method", "average_precision",
        "-p", "top_fraction=0.05",
    ).output  # fmt: skip
    assert "registered digits@1, words@1" in out

    shown = cli("emergent", "show", "digits@1").output
    assert "Numbers written with digits." in shown
    assert "average_precision" in shown and "6 neurons" in shown  # 5% of 2 x 64
    for row in ("digits", "words", "random:digits", "random:words", "(base loss)"):
        assert row in shown
    assert "relative loss increase" in shown

    cli("brick", "push", str(loras["r4"]), "-n", "sentiment", "-b", "tiny-llama", "-d", "sentiment")
    refused = cli("emergent", "show", "sentiment", ok=False)
    assert refused.exit_code == 1 and "is a lora brick" in refused.output

    bad = cli("emergent", "find", "--base", "tiny-llama", "--probe", f"digits={digits}", ok=False)
    assert bad.exit_code == 1 and "at least 2" in bad.output
