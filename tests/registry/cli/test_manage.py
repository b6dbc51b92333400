"""The scriptable command line (issue #21) through typer's runner, on both backends: JSON
output, plain lines in pipes, tables at a real 80-column width, brick aliases, managed and
named compositions, recipe files, and tokens against a server (``--url``, ``--token``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from registry.cli.app import app

LONG_NAME = "translate-emails-ro-en"
LONG_DESCRIPTION = "Translate customer emails from Romanian to English, keeping the tone, names and formatting intact"


def _flat(text: str) -> str:
    """Text of a message however typer's error box wrapped it."""
    return " ".join(text.replace("│", " ").split())


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, settings: Any) -> Any:
    monkeypatch.setenv("BRICKYARD_HOME", str(settings.home))
    monkeypatch.setenv("BRICKYARD_DATABASE_URL", settings.database_url)
    monkeypatch.delenv("BRICKYARD_URL", raising=False)
    monkeypatch.delenv("BRICKYARD_TOKEN", raising=False)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> Any:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


@pytest.fixture
def catalog(cli: Any, llama_base: Path, loras: dict[str, Path]) -> Any:
    cli("base", "add", str(llama_base), "--name", "tiny-llama")
    cli("brick", "push", str(loras["r4"]), "-n", "sentiment", "-b", "tiny-llama", "-d", "review sentiment", "-t", "a")
    cli(
        "brick", "push", str(loras["r8"]), "-n", "sentiment", "-b", "tiny-llama", "-d", "review sentiment v2", "-t", "a"
    )
    cli(
        "brick", "push", str(loras["pattern"]), "-n", LONG_NAME, "-b", "tiny-llama", "-d", LONG_DESCRIPTION,
        "-t", "a", "-t", "b",
    )  # fmt: skip
    return cli


def test_listing_in_a_pipe_is_one_clean_line_per_brick(catalog: Any) -> None:
    result = catalog("brick", "list")
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["sentiment@2", f"{LONG_NAME}@1"]
    assert not any(c in result.stdout for c in "│┃━…")
    assert lines[1].split("\t")[-1] == LONG_DESCRIPTION  # the full text, not cut

    both = catalog("brick", "list", "--tag", "a", "--tag", "b").stdout.splitlines()
    assert [line.split("\t")[0] for line in both] == [f"{LONG_NAME}@1"]

    limited = catalog("brick", "list", "--limit", "1")
    assert len(limited.stdout.splitlines()) == 1
    assert "showing the first 1 bricks" in limited.stderr


def test_json_output_has_the_api_fields(catalog: Any) -> None:
    listed = json.loads(catalog("brick", "list", "--json").stdout)
    assert [(b["name"], b["version"]) for b in listed] == [("sentiment", 2), (LONG_NAME, 1)]
    assert listed[1]["description"] == LONG_DESCRIPTION and listed[1]["tags"] == ["a", "b"]
    shown = json.loads(catalog("brick", "show", "sentiment@1", "--json").stdout)
    assert shown["version"] == 1 and shown["description"] == "review sentiment"
    bases = json.loads(catalog("base", "list", "--json").stdout)
    assert bases[0]["name"] == "tiny-llama"
    assert json.loads(catalog("base", "show", "tiny-llama", "--json").stdout)["linear_modules"]
    names = {m["name"] for m in json.loads(catalog("methods", "--json").stdout)}
    assert {"linear", "ties"} <= names


def test_tables_at_80_columns_keep_the_name_and_cut_the_description(
    catalog: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # render as on a terminal, COLUMNS=80 wide
    out = catalog("brick", "list").stdout
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    row = next(line for line in lines if LONG_NAME in line)
    assert f"{LONG_NAME}@1" in row  # the column to copy is whole
    assert "…" in row and LONG_DESCRIPTION not in out  # the description is truncated instead
    assert len([line for line in lines if line.strip()]) == 3  # header and two rows: no wrapping


def test_brick_aliases_work_wherever_a_version_does(catalog: Any, tmp_path: Path) -> None:
    assert "sentiment@production -> sentiment@1" in catalog("brick", "alias", "set", "sentiment@1", "production").stdout
    assert json.loads(catalog("brick", "show", "sentiment@production", "--json").stdout)["version"] == 1
    catalog("brick", "pull", "sentiment@production", "-o", str(tmp_path / "pulled"))
    assert (tmp_path / "pulled" / "adapter_model.safetensors").is_file()
    aliases = json.loads(catalog("brick", "alias", "list", "sentiment", "--json").stdout)
    assert [(a["alias"], a["version"]) for a in aliases] == [("production", 1)]

    composed = json.loads(
        catalog(
            "compose", "-b", "tiny-llama", "--brick", "sentiment@production", "--output", "adapter",
            "-o", str(tmp_path / "out"), "--json",
        ).stdout
    )  # fmt: skip
    assert composed["status"] == "ready" and composed["recipe"]["bricks"][0]["version"] == 1

    missing = catalog("brick", "show", "sentiment@canary", ok=False)
    assert missing.exit_code == 1 and "no version or alias 'canary'" in missing.output
    catalog("brick", "alias", "rm", "sentiment@production")
    assert catalog("brick", "show", "sentiment@production", ok=False).exit_code == 1


def test_compositions_are_listed_named_and_removed(catalog: Any, settings: Any, tmp_path: Path) -> None:
    first = catalog(
        "compose", "-b", "tiny-llama", "--brick", "sentiment@1", "--output", "adapter", "-o", str(tmp_path / "a"),
        "--name", "support-bot",
    )  # fmt: skip
    assert "running" in first.stderr or "ready" in first.stderr  # plain progress lines, not a bar
    assert "downloaded" in first.stderr and " of " in first.stderr  # byte progress of the download
    catalog(
        "compose", "-b", "tiny-llama", "--brick", f"{LONG_NAME}:0.5", "--output", "adapter", "-o", str(tmp_path / "b")
    )

    listed = json.loads(catalog("composition", "list", "--json").stdout)
    assert len(listed) == 2 and listed[1]["names"] == ["support-bot"]
    lines = catalog("composition", "list", "--brick", LONG_NAME).stdout.splitlines()
    assert len(lines) == 1 and lines[0].split("\t")[0] == listed[0]["id"][:16]

    shown = json.loads(catalog("composition", "show", "support-bot", "--json").stdout)
    assert shown["id"] == listed[1]["id"]
    assert json.loads(catalog("composition", "show", listed[1]["id"][:12], "--json").stdout)["id"] == shown["id"]

    refused = catalog("composition", "cancel", "support-bot", ok=False)
    assert refused.exit_code == 1 and "only queued or running builds can be cancelled" in refused.output

    catalog("composition", "name", "canary", "support-bot")
    assert json.loads(catalog("composition", "show", "canary", "--json").stdout)["names"] == ["canary", "support-bot"]
    catalog("composition", "name", "canary", "--rm")
    assert "deleted composition" in catalog("composition", "rm", "support-bot", "--yes").stdout
    assert not (settings.compositions_dir / shown["id"]).exists()
    assert len(json.loads(catalog("composition", "list", "--json").stdout)) == 1
    gone = catalog("composition", "show", "support-bot", ok=False)
    assert gone.exit_code == 1 and "composition-not-found" in gone.output


def test_compose_from_a_yaml_recipe_and_again_from_its_brickyard_json(catalog: Any, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "base_model: tiny-llama\n"
        "method: linear\n"
        "output: adapter\n"
        "bricks:\n"
        "  - {name: sentiment, version: 1, weight: 0.7}\n"
        f"  - {LONG_NAME}\n"
    )
    first = json.loads(catalog("compose", "--recipe", str(recipe), "-o", str(tmp_path / "one"), "--json").stdout)
    assert [(b["name"], b["weight"]) for b in first["recipe"]["bricks"]] == [("sentiment", 0.7), (LONG_NAME, 1.0)]
    again = catalog("compose", "--recipe", str(tmp_path / "one"), "-o", str(tmp_path / "two"), "--json")
    assert json.loads(again.stdout)["id"] == first["id"]  # the same recipe: the cached build
    assert "note:" not in again.stderr
    assert (tmp_path / "two" / "brickyard.json").read_bytes() == (tmp_path / "one" / "brickyard.json").read_bytes()

    broken = tmp_path / "broken.yaml"
    broken.write_text("base_model: [unclosed\n")
    result = catalog("compose", "--recipe", str(broken), "-o", str(tmp_path / "three"), ok=False)
    assert result.exit_code == 1 and "not valid YAML" in result.output


def test_compose_refuses_bad_brick_options_before_any_work(catalog: Any, tmp_path: Path) -> None:
    out = str(tmp_path / "x")
    twice = catalog("compose", "-b", "tiny-llama", "--brick", "sentiment", "--brick", "sentiment", "-o", out, ok=False)
    assert twice.exit_code == 2 and "sentiment given more than once" in _flat(twice.output)
    equals = catalog("compose", "-b", "tiny-llama", "--brick", "sentiment=0.5", "-o", str(tmp_path / "x"), ok=False)
    assert equals.exit_code == 2 and "--brick sentiment:0.5" in _flat(equals.output)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    full = catalog("compose", "-b", "tiny-llama", "--brick", "sentiment", "-o", str(busy), ok=False)
    assert full.exit_code == 2 and "not an empty directory" in _flat(full.output)
    help_text = catalog("compose", "--help").stdout
    assert "NAME[@VERSION|@ALIAS][:WEIGHT]" in help_text


@pytest.fixture
def remote(monkeypatch: pytest.MonkeyPatch, client: Any, tmp_path: Path) -> Any:
    """The CLI pointed at the test app with BRICKYARD_URL, from a home that must stay empty."""
    from fastapi.testclient import TestClient

    import registry.client as client_module

    original = client_module.RemoteClient

    def connect(url: str, *, token: str | None = None, **_: Any) -> Any:
        return original(url, token=token, http=TestClient(client.app, raise_server_exceptions=False))

    monkeypatch.setattr(client_module, "RemoteClient", connect)
    home = tmp_path / "client-home"
    monkeypatch.setenv("BRICKYARD_HOME", str(home))
    monkeypatch.setenv("BRICKYARD_URL", "http://testserver")
    monkeypatch.delenv("BRICKYARD_TOKEN", raising=False)
    monkeypatch.delenv("BRICKYARD_DATABASE_URL", raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False), home


def test_token_commands_talk_to_the_server_with_url(remote: Any, admin_token: str) -> None:
    run, home = remote
    refused = run("token", "list")
    assert refused.exit_code == 1
    assert "set BRICKYARD_TOKEN or pass --token" in refused.output
    assert not home.exists()  # no empty local registry was created

    listed = run("--token", admin_token, "token", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [t["name"] for t in json.loads(listed.stdout)] == ["test-admin"]

    created = run("--token", admin_token, "token", "create", "-n", "ci", "-s", "read", "--json")
    secret = json.loads(created.stdout)["token"]
    assert run("--token", secret, "brick", "list", "--json").exit_code == 0  # the new token reads
    assert run("--token", admin_token, "token", "revoke", "ci").exit_code == 0
    again = run("--token", secret, "token", "list")
    assert again.exit_code == 1 and "set BRICKYARD_TOKEN or pass --token" in again.output


def test_push_reads_the_model_card_and_the_python_api_iterates_bricks(
    cli: Any, llama_base: Path, loras: dict[str, Path], tmp_path: Path, settings: Any
) -> None:
    import shutil

    from registry.client import LocalClient

    cli("base", "add", str(llama_base), "--name", "tiny-llama")
    adapter = tmp_path / "from-the-hub"
    shutil.copytree(loras["r4"], adapter)
    (adapter / "README.md").write_text(
        "---\nlicense: mit\nbase_model: tiny-llama\ntags: [Reviews, english]\n---\n# x\n\nRates product reviews.\n"
    )
    assert "registered sentiment@1" in cli("brick", "push", str(adapter), "-n", "sentiment").stdout
    shown = json.loads(cli("brick", "show", "sentiment", "--json").stdout)
    assert (shown["description"], shown["tags"], shown["license"]) == (
        "Rates product reviews.",
        ["english", "reviews"],  # the store keeps tags sorted
        "mit",
    )
    bare = tmp_path / "bare"
    shutil.copytree(loras["r8"], bare)
    refused = cli("brick", "push", str(bare), "-n", "other", ok=False)
    assert refused.exit_code == 2 and "give --base and --description" in _flat(refused.output)

    with LocalClient.open(settings) as client:
        bricks = list(client.list_bricks())
    assert [(b.name, b.version) for b in bricks] == [("sentiment", 1)]  # Brick objects, not (field, value) pairs


def test_compose_against_a_server_without_workers_hints_and_times_out(
    remote: Any,
    client: Any,
    admin_token: str,
    llama_base: Path,
    loras: dict[str, Path],
    monkeypatch: Any,
    tmp_path: Path,
) -> None:
    """Issue #21 item 7: a composition a server leaves queued (no worker running) says why it
    waits instead of sitting at 'queued' silently, and --timeout ends the wait (exit 2)."""
    import registry.cli.app as cli_module

    client.app.state.workers.stop()  # this server builds nothing: the composition stays queued
    monkeypatch.setattr(cli_module, "_NO_WORKER_HINT_S", 0.0)  # hint at the first queued state
    run, _ = remote
    assert run("--token", admin_token, "base", "add", str(llama_base), "-n", "tiny-llama").exit_code == 0
    pushed = run("--token", admin_token, "brick", "push", str(loras["r4"]), "-n", "s", "-b", "tiny-llama", "-d", "d")
    assert pushed.exit_code == 0, pushed.output
    out = tmp_path / "never"
    waited = run(
        "--token", admin_token, "compose", "-b", "tiny-llama", "--brick", "s", "-o", str(out), "--timeout", "1"
    )
    assert waited.exit_code == 2, waited.output
    flat = _flat(waited.stderr)
    assert "still queued after 0 s: is a worker running?" in flat and "`brickyard worker` runs more" in flat
    assert "timed out" in flat
    assert not out.exists()  # nothing downloaded
