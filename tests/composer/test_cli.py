"""The local CLI (``python -m composer`` / ``brickyard local``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from composer.cli import app, parse_brick, parse_param

runner = CliRunner()


def test_compose_from_paths_with_weights_and_params(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    out = tmp_path / "out"
    args = ["compose", "--base", str(toy_llama), "--brick", f"{llama_bricks['qv4']}:0.7", "--brick"]
    args += [str(llama_bricks["all6"]), "--method", "dare_ties", "--param", "density=0.4", "--param", "seed=9"]
    args += ["--param", "majority_sign_method=frequency", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "brickyard.json").read_text())["composer"]
    assert record["params"] == {"density": 0.4, "majority_sign_method": "frequency", "seed": 9}
    assert [(b["name"], b["weight"]) for b in record["bricks"]] == [("qv4", 0.7), ("all6", 1.0)]


def test_adapter_output_with_rank(tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]) -> None:
    out = tmp_path / "adapter"
    args = ["compose", "--base", str(toy_llama), "--brick", str(llama_bricks["all6"]), "--output", "adapter"]
    result = runner.invoke(app, [*args, "--rank", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "relative error" in result.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_errors_list_every_problem_and_exit_nonzero(
    tmp_path: Path, toy_llama: Path, llama_bricks: dict[str, Path]
) -> None:
    args = ["compose", "--base", str(toy_llama), "--brick", str(llama_bricks["qv4"]), "--method", "ties"]
    result = runner.invoke(app, [*args, "--param", "density=2", "--param", "bogus=1", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "density" in result.output and "bogus" in result.output
    assert not (tmp_path / "o").exists()


def test_methods_are_listed() -> None:
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        assert name in result.output


def test_brick_and_param_parsing(tmp_path: Path) -> None:
    brick = tmp_path / "my:brick"
    brick.mkdir()
    assert parse_brick(f"{brick}:-0.5").weight == -0.5
    assert parse_brick(str(brick)).config_path == brick / "adapter_config.json"  # colon in the name, no weight
    with pytest.raises(typer.BadParameter):
        parse_brick(str(tmp_path / "missing"))
    assert parse_param("density=0.3") == ("density", 0.3)
    assert parse_param("majority_sign_method=total") == ("majority_sign_method", "total")
    with pytest.raises(typer.BadParameter):
        parse_param("density")


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "composer", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "compose" in result.stdout
