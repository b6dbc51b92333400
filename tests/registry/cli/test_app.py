"""The ``brickyard`` command line, on the local registry (both backends) and against a
server; and its start-up staying free of the heavy ML libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from registry.cli.app import app


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, settings: Any) -> Any:
    monkeypatch.setenv("BRICKYARD_HOME", str(settings.home))
    monkeypatch.setenv("BRICKYARD_DATABASE_URL", settings.database_url)
    monkeypatch.delenv("BRICKYARD_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping of table cells
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> Any:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def test_base_and_brick_commands_end_to_end(cli: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    out = cli("base", "add", str(llama_base), "--name", "tiny-llama", "--description", "tiny").output
    assert "registered base model tiny-llama" in out
    assert "tiny-llama" in cli("base", "list").output
    assert "LlamaForCausalLM" in cli("base", "show", "tiny-llama").output

    out = cli(
        "brick", "push", str(loras["r4"]), "--name", "sentiment", "--base", "tiny-llama",
        "--description", "classify review sentiment", "-e", "great phone", "-t", "english", "--metric", "acc=0.9",
    ).output  # fmt: skip
    assert "registered sentiment@1" in out
    cli("brick", "push", str(loras["r8"]), "-n", "sentiment", "-b", "tiny-llama", "-d", "v2")
    listing = cli("brick", "list").output
    assert "sentiment@2" in listing and "sentiment@1" not in listing
    assert "sentiment@1" in cli("brick", "list", "--all-versions").output
    shown = cli("brick", "show", "sentiment@1").output
    assert "classify review sentiment" in shown and "acc" in shown

    target = tmp_path / "pulled"
    cli("brick", "pull", "sentiment@1", "-o", str(target))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (target / name).read_bytes() == (loras["r4"] / name).read_bytes()

    cli("brick", "edit", "sentiment@1", "--tag", "Reviews")
    assert "reviews" in cli("brick", "show", "sentiment@1").output
    assert "deleted sentiment@1" in cli("brick", "rm", "sentiment@1", "--yes").output
    missing = cli("brick", "show", "sentiment@1", ok=False)
    assert missing.exit_code == 1
    assert "brick-not-found" in missing.output


def test_compose_plan_shows_the_bricks_and_weights_of_an_instruction_and_builds_nothing(
    cli: Any, registry: Any, llama_base: Path, loras: dict[str, Path]
) -> None:
    cli("base", "add", str(llama_base), "--name", "tiny-llama")
    bricks = {
        "reviews": ("r4", "Classify the sentiment of a product review."),
        "tweets": ("r8", "Classify the sentiment of a tweet."),
        "ro-en": ("rslora", "Translate Romanian emails to English."),
    }
    for name, (lora, description) in bricks.items():
        cli("brick", "push", str(loras[lora]), "-n", name, "-b", "tiny-llama", "-d", description)
    instruction = "classify the sentiment of reviews and tweets"
    out = cli("compose", "-b", "tiny-llama", "-o", "unused", "-i", instruction, "-k", "3", "--plan").output
    table = ([c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines())
    rows = {cells[0]: cells[3] for cells in table if cells}
    weights = {name: float(rows[name]) for name in ("reviews@1", "tweets@1")}
    assert sum(weights.values()) == pytest.approx(1.0, abs=2e-3) and min(weights.values()) > 0.2
    assert rows["ro-en@1"].startswith("dropped"), out
    assert registry.compositions.store.ready_by_age() == []


def test_errors_are_printed_with_every_problem(cli: Any, llama_base: Path, tmp_path: Path) -> None:
    cli("base", "add", str(llama_base), "--name", "tiny-llama")
    adapter = tmp_path / "bad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0, "use_dora": True}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x80\x02pickle")
    result = cli("brick", "push", str(adapter), "-n", "x", "-b", "tiny-llama", "-d", "d", ok=False)
    assert result.exit_code == 1
    assert "unsupported-media-type" in result.output
    (adapter / "adapter_model.safetensors").unlink()
    result = cli("brick", "push", str(adapter), "-n", "x", "-b", "tiny-llama", "-d", "d", ok=False)
    assert "missing adapter_model.safetensors" in result.output


def test_db_commands(cli: Any) -> None:
    assert "up to date" in cli("db", "current").output
    assert "database at revision" in cli("db", "upgrade").output


def test_remote_client_against_the_app(client: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    from registry.client import RemoteClient
    from registry.errors import BrickExists, BrickNotFound

    remote = RemoteClient("http://testserver", http=client)
    remote.add_base_model("tiny-llama", str(llama_base))
    brick = remote.register_brick(loras["pattern"], {"name": "p", "base_model": "tiny-llama", "description": "d"})
    assert brick.rank_pattern == {"v_proj": 8, r"layers\.1\.mlp\.down_proj": 2}
    with pytest.raises(BrickExists) as caught:
        remote.register_brick(loras["pattern"], {"name": "q", "base_model": "tiny-llama", "description": "d"})
    assert caught.value.extra["existing"]["name"] == "p"
    assert [b.name for b in remote.list_bricks().items] == ["p"]
    remote.download_brick("p", 1, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        loras["pattern"] / "adapter_model.safetensors"
    ).read_bytes()
    assert remote.update_brick("p", 1, tags=["x"]).tags == ["x"]
    remote.delete_brick("p", 1)
    with pytest.raises(BrickNotFound):
        remote.get_brick("p")


def test_cli_startup_imports_no_ml_libraries() -> None:
    code = (
        "import sys; import registry.cli.app, registry.client; "
        "heavy = {'torch', 'transformers', 'peft', 'sentence_transformers', 'fastapi', 'sqlalchemy'}; "
        "heavy &= set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_base_alias_and_rm_commands(cli: Any, llama_base: Path, loras: dict[str, Path]) -> None:
    cli("base", "add", str(llama_base), "--name", "tiny-llama")
    assert "aliases: org/tiny-llama" in cli("base", "alias", "add", "tiny-llama", "org/tiny-llama").output
    assert "aliases: (none)" in cli("base", "alias", "rm", "tiny-llama", "org/tiny-llama").output
    missing = cli("base", "alias", "rm", "tiny-llama", "org/tiny-llama", ok=False)
    assert missing.exit_code == 1 and "has no alias 'org/tiny-llama'" in missing.output
    cli("brick", "push", str(loras["r4"]), "-n", "sentiment", "-b", "tiny-llama", "-d", "d")
    in_use = cli("base", "rm", "tiny-llama", ok=False)
    assert in_use.exit_code == 1 and "base-model-in-use" in in_use.output and "brick sentiment@1" in in_use.output
    cli("brick", "rm", "sentiment@1", "--yes")
    assert "removed base model tiny-llama" in cli("base", "rm", "tiny-llama").output
    assert "tiny-llama" not in cli("base", "list").output


def test_compose_prints_the_truncation_error_of_an_adapter_output_and_warns_above_the_threshold(
    cli: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    cli("base", "add", str(llama_base), "--name", "tiny-llama")
    cli("brick", "push", str(loras["r4"]), "-n", "a", "-b", "tiny-llama", "-d", "d")
    cli("brick", "push", str(loras["r8"]), "-n", "b", "-b", "tiny-llama", "-d", "d")
    bricks = ("--brick", "a:0.5", "--brick", "b:0.5")
    exact = cli("compose", "-b", "tiny-llama", *bricks, "--output", "adapter", "-o", str(tmp_path / "exact")).output
    assert "adapter truncation: relative error max" in exact and "warning" not in exact
    cut = cli(
        "compose", "-b", "tiny-llama", *bricks, "--output", "adapter", "--rank", "1", "-o", str(tmp_path / "cut")
    ).output
    record = json.loads((tmp_path / "cut" / "brickyard.json").read_text())
    worst = record["composer"]["truncation"]["max_relative_error"]
    assert worst > 0.05
    assert f"relative error max {worst:.3g}" in cut and "warning:" in cut and "higher --rank" in cut
    full = cli("compose", "-b", "tiny-llama", *bricks, "-o", str(tmp_path / "full")).output
    assert "truncation" not in full


def test_compose_fit_reads_examples_from_jsonl(
    cli: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    cli("base", "add", str(llama_base), "--name", "tiny-llama")
    for name, path in (("a", loras["r4"]), ("b", loras["r8"])):
        cli("brick", "push", str(path), "-n", name, "-b", "tiny-llama", "-d", f"brick {name}")
    examples = tmp_path / "examples.jsonl"
    rows = [{"input": "good phone", "output": "positive"}, {"input": "bad phone", "output": "negative"}]
    examples.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "fitted"
    cli("compose", "-b", "tiny-llama", "--brick", "a", "--brick", "b", "--fit", str(examples), "--fit-steps", "3",
        "-o", str(out))  # fmt: skip
    fit = json.loads((out / "brickyard.json").read_text())["recipe"]["fit"]
    assert fit["examples"] == rows and fit["steps"] == 3 and len(fit["weights"]) == 2
    assert fit["final_loss"] < fit["initial_loss"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "output": "y"}\nnot json\n')
    failed = cli("compose", "-b", "tiny-llama", "--brick", "a", "--fit", str(bad), "-o", str(tmp_path / "x"), ok=False)
    assert failed.exit_code != 0 and "bad.jsonl:2" in failed.output
