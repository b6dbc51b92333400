"""The ``brickyard`` command line: thin commands over the clients in `registry.client`.

Without ``--url`` (or ``BRICKYARD_URL``) commands work on the local registry in
``BRICKYARD_HOME``; with it they talk to a server. Heavy libraries (torch, transformers,
sentence-transformers) are imported only by the commands that need them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from typer.core import TyperGroup

from registry.cli.support import (
    Column,
    JsonOption,
    UrlOption,
    open_client,
    print_json,
    print_record,
    print_rows,
    state,
)
from registry.errors import BrickyardError, Forbidden, Unauthorized

__all__ = ["app", "main"]

console = Console()
err_console = Console(stderr=True)


class _ReportingGroup(TyperGroup):
    """The root command group: the one place a `BrickyardError` from any command (and its
    subcommands) becomes the exit message, instead of an except block in every command."""

    def invoke(self, ctx: Any) -> Any:  # typer.Context (typer vendors click)
        """Run the command; a `BrickyardError` is printed as ``error (code): detail`` plus its
        problems and extra members, and exits with status 1."""
        try:
            return super().invoke(ctx)
        except BrickyardError as exc:
            _fail(exc)


app = typer.Typer(
    cls=_ReportingGroup,
    name="brickyard",
    help="Registry and composition service for LoRA adapter bricks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
base_app = typer.Typer(help="Base models: register, list, show.", no_args_is_help=True)
brick_app = typer.Typer(help="Bricks: push, list, show, pull, edit, remove.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
token_app = typer.Typer(
    help="API tokens: create, list, revoke (on the server with --url / BRICKYARD_URL, else the local registry).",
    no_args_is_help=True,
)
app.add_typer(base_app, name="base")
app.add_typer(token_app, name="token")
app.add_typer(brick_app, name="brick")
app.add_typer(db_app, name="db")


@app.callback()
def _root(
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="BRICKYARD_TOKEN", help="API token for --url servers", show_default=False),
    ] = None,
) -> None:
    """Registry and composition service for LoRA adapter bricks."""
    state.token = token


def _client(url: str | None) -> Any:
    return open_client(url)


def _fail(exc: BrickyardError) -> NoReturn:
    # soft_wrap: an error is one line however narrow the terminal (grep-able, copy-able)
    err_console.print(f"[bold red]error[/] ({exc.code}): {exc.detail}", soft_wrap=True, highlight=False)
    for line in exc.errors:
        err_console.print(f"  - {line}", markup=False, highlight=False)
    for key, value in exc.extra.items():
        err_console.print(f"  {key}: {json.dumps(value, default=str)}", markup=False, highlight=False)
    if isinstance(exc, (Unauthorized, Forbidden)):
        err_console.print("  hint: set BRICKYARD_TOKEN or pass --token (brickyard --token TOKEN COMMAND ...)")
    raise typer.Exit(1)


def _parse_ref(ref: str) -> tuple[str, int | str | None]:
    """``name``, ``name@version`` or ``name@alias`` (``latest`` and ``main``: the newest)."""
    from registry.storage.aliases import parse_version_or_alias

    name, sep, version = ref.partition("@")
    if sep and not version:
        raise typer.BadParameter(f"{ref!r}: give a version number or an alias after '@'")
    return name, parse_version_or_alias(version)


# -- serve & db -------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="interface to bind (default BRICKYARD_HOST or 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default BRICKYARD_PORT or 8000)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    workers: Annotated[
        int, typer.Option(help="server processes (each holds its own embedding model and embedding child process)")
    ] = 1,
) -> None:
    """Run the REST API with uvicorn."""
    import uvicorn

    from registry.settings import Settings

    settings = Settings()
    uvicorn.run(
        "registry.api.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        log_level=log_level,
        workers=workers,
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all database migrations (BRICKYARD_DATABASE_URL)."""
    from registry.db.migrate import current_revision, upgrade
    from registry.db.session import make_engine
    from registry.settings import Settings

    settings = Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with _database_errors(settings.sqlalchemy_url):
            before = current_revision(engine)
            upgrade(engine)
            after = current_revision(engine)
    finally:
        engine.dispose()
    console.print(f"database at revision [bold]{after}[/] (was {before or 'empty'})")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database and the one this code needs."""
    from registry.db.migrate import current_revision, head_revision
    from registry.db.session import make_engine
    from registry.settings import Settings

    url = Settings().sqlalchemy_url
    engine = make_engine(url)
    try:
        with _database_errors(url):
            current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    state = "[green]up to date[/]" if current == head else "[yellow]out of date: run `brickyard db upgrade`[/]"
    console.print(f"database: {current or 'empty'}; code: {head}; {state}")
    if current != head:
        raise typer.Exit(1)  # scripts and deploy checks can test it


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    """A database that cannot be reached is one line on stderr and exit status 1, not a traceback."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        cause = getattr(exc, "orig", None) or exc
        reason = " ".join(str(cause).split())[:300]
        shown = make_url(url).render_as_string(hide_password=True)
        err_console.print(f"error: cannot use the database {shown}: {reason}", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None


# -- base models ------------------------------------------------------------------------


@base_app.command("add")
def base_add(
    path: Annotated[
        Path, typer.Argument(help="Hugging Face model directory (with --url: a path on the server's file system)")
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="name to register it under")],
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    alias: Annotated[list[str] | None, typer.Option(help="another name adapters may record (repeatable)")] = None,
    url: UrlOption = None,
) -> None:
    """Register a base model (reads only its config and safetensors headers)."""
    with _client(url) as client:
        try:
            base = client.add_base_model(
                name, str(path if url else path.resolve()), description=description, aliases=alias or []
            )
        except BrickyardError as exc:
            if url and exc.status == 422:
                exc.errors.append(f"PATH is read by the server at {url}, on its file system, not on this machine")
            raise
    console.print(
        f"registered base model [bold]{base.name}[/]: {base.architecture}, {base.dtype}, "
        f"{base.parameter_count:,} parameters, {base.linear_module_count} linear modules"
    )


@base_app.command("list")
def base_list(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """List base models."""
    with _client(url) as client:
        bases = client.list_base_models()
    columns = [Column("name", key=True), Column("architecture"), Column("dtype"), Column("parameters")]
    columns += [Column("fingerprint"), Column("path", flex=True)]
    rows = [[b.name, b.architecture, b.dtype, f"{b.parameter_count:,}", b.fingerprint[:12], b.path] for b in bases]
    print_rows(console, columns, rows, records=bases, as_json=as_json, empty="no base models")


@base_app.command("show")
def base_show(name: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Show a base model."""
    with _client(url) as client:
        base = client.get_base_model(name)
    print_record(console, base, as_json=as_json, skip=() if as_json else ("linear_modules",))


alias_app = typer.Typer(help="Other names adapters may record for a base model.", no_args_is_help=True)
base_app.add_typer(alias_app, name="alias")


def _print_aliases(base: Any) -> None:
    """The line `base alias add` and `base alias rm` answer with: the base model's aliases now."""
    console.print(f"base model [bold]{base.name}[/] aliases: {', '.join(base.aliases) or '(none)'}")


@alias_app.command("add")
def base_alias_add(
    name: Annotated[str, typer.Argument(help="registered base model")],
    alias: Annotated[str, typer.Argument(help="e.g. a Hub id, or the directory name a brick was trained from")],
    url: UrlOption = None,
) -> None:
    """Add an alias: adapters recording it as base_model_name_or_path register for NAME."""
    with _client(url) as client:
        base = client.add_base_model_alias(name, alias)
    _print_aliases(base)


@alias_app.command("rm")
def base_alias_rm(
    name: Annotated[str, typer.Argument(help="registered base model")],
    alias: Annotated[str, typer.Argument(help="the alias to remove")],
    url: UrlOption = None,
) -> None:
    """Remove an alias of a base model."""
    with _client(url) as client:
        base = client.remove_base_model_alias(name, alias)
    _print_aliases(base)


@base_app.command("rm")
def base_rm(name: Annotated[str, typer.Argument(help="registered base model")], url: UrlOption = None) -> None:
    """Remove a base model's registration (its files stay); refused while bricks or
    compositions use it, naming them."""
    with _client(url) as client:
        base = client.delete_base_model(name)
    console.print(f"removed base model [bold]{base.name}[/] ({base.path})")


# -- bricks -----------------------------------------------------------------------------


@brick_app.command("push")
def brick_push(
    adapter_dir: Annotated[Path, typer.Argument(help="PEFT adapter directory (adapter_config.json + safetensors)")],
    name: Annotated[str, typer.Option("--name", "-n")],
    base: Annotated[
        str | None, typer.Option("--base", "-b", help="registered base model (default: README.md's base_model)")
    ] = None,
    description: Annotated[
        str | None,
        typer.Option("--description", "-d", help="what the brick can do (default: from the adapter's README.md)"),
    ] = None,
    example: Annotated[list[str] | None, typer.Option("--example", "-e", help="an example input (repeatable)")] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", "-t", help="a tag (repeatable; default README.md's)")
    ] = None,
    version: Annotated[int | None, typer.Option(help="explicit version; default the next free")] = None,
    license: Annotated[str | None, typer.Option(help="license identifier (default README.md's)")] = None,
    metric: Annotated[list[str] | None, typer.Option(help="NAME=VALUE (repeatable)")] = None,
    url: UrlOption = None,
) -> None:
    """Register an adapter directory as a brick. Its README.md (a Hugging Face model card)
    supplies what is not given: description (front matter or first paragraph), tags,
    license and base_model."""
    card: dict[str, Any] = {}
    readme = adapter_dir / "README.md"
    if readme.is_file():
        from registry.cli.model_card import card_metadata

        card, notes = card_metadata(readme.read_text(errors="replace"))
        for note in notes:
            err_console.print(note, markup=False, highlight=False)
    base = base or card.get("base_model")
    description = description if description is not None else card.get("description")
    if base is None or description is None:
        missing = [flag for flag, value in (("--base", base), ("--description", description)) if value is None]
        raise typer.BadParameter(f"give {' and '.join(missing)} (the adapter's README.md does not say)")
    metadata: dict[str, Any] = {
        "name": name,
        "base_model": base,
        "description": description,
        "examples": example or [],
        "tags": tag if tag is not None else card.get("tags", []),
    }
    if version is not None:
        metadata["version"] = version
    license = license or card.get("license")
    if license is not None:
        metadata["license"] = license
    if metric:
        metadata["metrics"] = dict(_parse_metric(m) for m in metric)
    with _client(url) as client:
        brick = client.register_brick(adapter_dir, metadata)
    console.print(
        f"registered [bold]{brick.name}@{brick.version}[/] on {brick.base_model}: rank {brick.rank}, "
        f"{brick.module_count} modules ({', '.join(brick.target_modules)}), sha256 {brick.sha256[:12]}"
    )


def _parse_metric(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return key, float(value)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected NAME=NUMBER") from None


@brick_app.command("list")
def brick_list(
    base: Annotated[str | None, typer.Option("--base", "-b", help="only bricks of this base model")] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", "-t", help="only bricks with this tag (repeat: all of them)")
    ] = None,
    all_versions: Annotated[bool, typer.Option("--all-versions", help="every version, not only the latest")] = False,
    limit: Annotated[int, typer.Option(help="at most this many (pages are followed)", min=1)] = 100,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List bricks (latest version of each). On a terminal a table; piped, one tab-separated
    line per brick (brick, base model, rank, modules, tags, size, description)."""
    from registry.client import iter_bricks

    wanted = {t.lower() for t in tag or []}
    first = sorted(wanted)[0] if wanted else None  # the server filters by one tag; the rest here
    found: list[Any] = []
    more = False
    with _client(url) as client:
        for brick in iter_bricks(client, base_model=base, tag=first, all_versions=all_versions, limit=min(limit, 500)):
            if not wanted <= set(brick.tags):
                continue
            if len(found) >= limit:
                more = True
                break
            found.append(brick)
    if more:
        err_console.print(f"showing the first {limit} bricks; pass --limit to see more", highlight=False)
    columns = [Column("brick", key=True), Column("base model"), Column("rank"), Column("modules"), Column("tags")]
    columns += [Column("size"), Column("quality"), Column("description", flex=True)]
    rows = [
        [
            f"{b.name}@{b.version}",
            b.base_model,
            str(b.rank),
            ",".join(b.target_modules),
            ",".join(b.tags),
            _size(b.size_bytes),
            _quality(b),
            b.description,
        ]
        for b in found
    ]
    print_rows(console, columns, rows, records=found, as_json=as_json, empty="no bricks")


def _quality(brick: Any) -> str:
    """The quality check in a table cell: exact match of brick vs base, or the job's state."""
    quality = brick.quality
    if brick.quality_status != "done" or not quality:
        return brick.quality_status or "-"
    mark = "beats base" if quality["beats_base"] else "NOT better"
    return f"{quality['brick']['exact_match']:.2f} vs {quality['base']['exact_match']:.2f} ({mark})"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@brick_app.command("show")
def brick_show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS")],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a brick version (the latest by default)."""
    name, version = _parse_ref(ref)
    with _client(url) as client:
        brick = client.get_brick(name, version)
    print_record(console, brick, as_json=as_json)


@brick_app.command("pull")
def brick_pull(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to write the adapter into")],
    url: UrlOption = None,
) -> None:
    """Download a brick as a PEFT adapter directory."""
    name, ref_version = _parse_ref(ref)
    with _client(url) as client:
        version = client.get_brick(name, ref_version).version
        paths = client.download_brick(name, version, out)
    console.print(f"wrote {name}@{version} to {out}: {', '.join(p.name for p in paths)}")


@brick_app.command("edit")
def brick_edit(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    description: Annotated[str | None, typer.Option("--description", "-d")] = None,
    example: Annotated[list[str] | None, typer.Option("--example", "-e", help="replaces all examples")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="replaces all tags")] = None,
    url: UrlOption = None,
) -> None:
    """Change the description, examples or tags of a brick version."""
    name, ref_version = _parse_ref(ref)
    if ref_version is None:
        raise typer.BadParameter("name the version to edit: NAME@VERSION")
    changes: dict[str, Any] = {}
    if description is not None:
        changes["description"] = description
    if example is not None:
        changes["examples"] = example
    if tag is not None:
        changes["tags"] = tag
    with _client(url) as client:
        version = client.get_brick(name, ref_version).version
        brick = client.update_brick(name, version, **changes)
    console.print(f"updated [bold]{brick.name}@{brick.version}[/]")


@brick_app.command("rm")
def brick_rm(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    url: UrlOption = None,
) -> None:
    """Delete a brick version."""
    name, ref_version = _parse_ref(ref)
    if ref_version is None:
        raise typer.BadParameter("name the version to delete: NAME@VERSION")
    with _client(url) as client:
        version = client.get_brick(name, ref_version).version
        if not yes and not typer.confirm(f"delete {name}@{version}?"):
            raise typer.Exit(1)
        brick = client.delete_brick(name, version)
    console.print(f"deleted [bold]{brick.name}@{brick.version}[/]")


@app.command("fsck")
def fsck_command(
    repair: Annotated[bool, typer.Option("--repair", help="remove unreferenced blobs and leftovers")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="do not re-hash every blob")] = False,
    grace: Annotated[float, typer.Option(help="only remove leftovers older than this many seconds")] = 3600.0,
) -> None:
    """Check database rows against stored blobs (missing, corrupt, orphaned) and repair what is safe."""
    from registry.service import Registry

    registry = Registry.open()
    try:
        report = registry.fsck(repair=repair, verify=not quick, grace_s=grace)
    finally:
        registry.close()
    console.print(f"checked {report.checked_blobs} referenced blobs" + ("" if quick else " (sha256 verified)"))
    for label, items, style in (
        ("missing", report.missing, "bold red"),
        ("corrupt", report.corrupt, "bold red"),
        ("orphaned blobs", report.orphaned, "yellow"),
        ("staging leftovers", report.staging_leftovers, "yellow"),
        ("stale multipart uploads", report.stale_uploads, "yellow"),
        ("compositions", report.composition_problems, "yellow"),
        ("removed", report.removed, "green"),
    ):
        if items:
            console.print(f"[{style}]{label}: {len(items)}[/]")
            for item in items[:50]:
                console.print(f"  {item}", markup=False, highlight=False)
    if repair:
        leftovers = len(report.orphaned) + len(report.staging_leftovers)
        removed = sum(1 for r in report.removed if r.startswith(("blob ", "staging file ")))
        if leftovers > removed:
            console.print(
                f"kept {leftovers - removed} orphaned blobs or staging files younger than the grace period "
                f"({grace:g} s): an upload may still be using them; --grace 0 removes them now",
                highlight=False,
            )
    if not report.healthy:
        err_console.print("[bold red]bricks with missing or corrupt bytes must be registered again[/]")
        raise typer.Exit(1)
    console.print("[green]no missing or corrupt data[/]")


# -- tokens -----------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option("--name", "-n", help="who or what will use it (e.g. ci)")],
    scope: Annotated[str, typer.Option("--scope", "-s", help="read, write or admin")] = "write",
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an API token and print it (it is stored hashed: this is the only time it is shown).
    With --url (or BRICKYARD_URL) on that server, with an admin token; else in the local registry."""
    import re

    from registry.inputs import NAME_PATTERN

    if scope not in ("read", "write", "admin"):
        raise typer.BadParameter("scope must be read, write or admin")
    if not re.match(NAME_PATTERN, name):
        raise typer.BadParameter("names are 1-100 ASCII letters, digits, '.', '_' or '-'")
    with _client(url) as client:
        created = client.create_token(name, scope)
    if as_json:
        print_json(created.model_dump(mode="json"))
        return
    err_console.print(
        f"created {created.scope} token [bold]{created.name}[/]; keep it secret, it will not be shown again:"
    )
    console.print(created.token, markup=False, highlight=False)


@token_app.command("list")
def token_list(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """List API tokens (names, scopes, use; never the secrets): the server's with --url (or
    BRICKYARD_URL), else the local registry's."""
    with _client(url) as client:
        tokens = client.list_tokens()
    columns = [Column("name", key=True), Column("scope"), Column("prefix"), Column("created"), Column("by")]
    columns += [Column("last used"), Column("revoked")]
    rows = [
        [
            t.name,
            t.scope,
            t.prefix + "…",
            f"{t.created_at:%Y-%m-%d %H:%M}",
            t.created_by or "",
            f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "",
            f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "",
        ]
        for t in tokens
    ]
    print_rows(console, columns, rows, records=tokens, as_json=as_json, empty="no tokens")


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument(help="token name")], url: UrlOption = None) -> None:
    """Revoke an API token; it stops working immediately (on the server with --url)."""
    with _client(url) as client:
        info = client.revoke_token(name)
    console.print(f"revoked token [bold]{info.name}[/]")


# -- search -----------------------------------------------------------------------------


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="a task description or an example input")],
    base: Annotated[str | None, typer.Option("--base", "-b", help="only bricks of this base model")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="only bricks with this tag (repeatable)")] = None,
    k: Annotated[int, typer.Option("-k", help="how many bricks")] = 5,
    min_score: Annotated[float | None, typer.Option(help="drop hits scoring below this")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Find the bricks that fit a task description or an example input."""
    with _client(url) as client:
        hits = client.search(query, base_model=base, tags=tag or None, k=k, min_score=min_score)
    columns = [Column("#"), Column("brick", key=True), Column("base model"), Column("score"), Column("matched")]
    columns += [Column("text", flex=True), Column("quality")]
    rows = [
        [
            str(rank),
            f"{hit.brick.name}@{hit.brick.version}",
            hit.brick.base_model,
            f"{hit.score:.2f}",
            f"{hit.matched} ({hit.similarity:.2f})",
            hit.text,
            _quality(hit.brick),
        ]
        for rank, hit in enumerate(hits, 1)
    ]
    print_rows(console, columns, rows, records=hits, as_json=as_json, empty="no matching bricks")


@app.command()
def reindex() -> None:
    """Re-embed every brick with the configured embedding model (after a model change)."""
    from rich.progress import Progress

    from registry.service import Registry
    from registry.settings import Settings

    # A batch the user waits for: embed in this process, at its priority, not in a background child.
    settings = Settings()
    registry = Registry.open(
        settings.model_copy(update={"embedding": settings.embedding.model_copy(update={"isolation": "thread"})})
    )
    try:
        with Progress(console=console) as progress:
            task = progress.add_task("embedding bricks", total=None)

            def report(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            count = registry.reindex(report)
    finally:
        registry.close()
    console.print(f"re-indexed {count} brick versions with {registry.embedder.name}")


# -- compositions -----------------------------------------------------------------------


def _parse_brick(text: str) -> dict[str, Any]:
    """``NAME[@VERSION|@ALIAS][:WEIGHT]``."""
    if "=" in text:
        name, _, weight = text.partition("=")
        raise typer.BadParameter(f"{text!r}: the weight follows a colon: --brick {name}:{weight}")
    ref, _, weight = text.partition(":")
    name, version = _parse_ref(ref)
    choice: dict[str, Any] = {"name": name}
    if version is not None:
        choice["version"] = version
    if weight:
        try:
            choice["weight"] = float(weight)
        except ValueError:
            raise typer.BadParameter(f"{text!r}: the weight after ':' must be a number") from None
    return choice


def _refuse_duplicates(bricks: list[dict[str, Any]]) -> None:
    seen: dict[tuple[str, Any], int] = {}
    for choice in bricks:
        key = (choice["name"], choice.get("version"))
        seen[key] = seen.get(key, 0) + 1
    twice = [f"{n}@{v}" if v is not None else n for (n, v), count in seen.items() if count > 1]
    if twice:
        raise typer.BadParameter(
            f"{', '.join(twice)} given more than once; give each brick once, with its total weight (NAME:WEIGHT)"
        )


@app.command()
def compose(
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to download the composed model into")],
    base: Annotated[str | None, typer.Option("--base", "-b", help="registered base model")] = None,
    brick: Annotated[
        list[str] | None,
        typer.Option("--brick", help="NAME\\[@VERSION|@ALIAS]\\[:WEIGHT] (repeatable)", show_default=False),
    ] = None,
    instruction: Annotated[str | None, typer.Option("--instruction", "-i", help="pick bricks by this task")] = None,
    k: Annotated[int, typer.Option("-k", help="with --instruction: how many bricks")] = 3,
    method: Annotated[str | None, typer.Option("--method", "-m", help="merge method (default linear)")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE method parameter")] = None,
    output: Annotated[str | None, typer.Option("--output", help="full (merged model, default) or adapter")] = None,
    rank: Annotated[int | None, typer.Option(help="adapter output: truncate to this rank")] = None,
    plan: Annotated[
        bool, typer.Option("--plan", help="with --instruction: show the bricks and weights it would merge, and stop")
    ] = False,
    fit: Annotated[
        Path | None, typer.Option("--fit", help='fit the weights to examples: JSONL of {"input": ..., "output": ...}')
    ] = None,
    fit_steps: Annotated[int | None, typer.Option("--fit-steps", help="with --fit: optimiser steps")] = None,
    fit_prompt: Annotated[str | None, typer.Option("--fit-prompt", help="with --fit: prompt, e.g. '{input}='")] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            "-r",
            help="a recipe file (YAML or JSON: base_model, bricks, method, params, output) or a composed "
            "model's brickyard.json (or its directory) to build again; options given override it",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="name the composition (like a tag)")] = None,
    timeout: Annotated[float | None, typer.Option(help="give up waiting after this many seconds")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compose bricks into the base model (or one adapter) and download the result."""
    request: dict[str, Any] = {}
    expected_id = None
    if recipe is not None:
        from registry.cli.recipe_files import load_recipe_file

        loaded = load_recipe_file(recipe)
        request, expected_id = loaded.request, loaded.expected_id
    if brick is not None and instruction is not None:
        raise typer.BadParameter("give --brick (one or more) or --instruction, not both")
    if plan:
        if instruction is None or base is None:
            raise typer.BadParameter("--plan goes with --instruction and --base")
        _print_instruction_plan(instruction, base, k, url)
        return
    if brick is not None:
        request.pop("instruction", None)
        request["bricks"] = [_parse_brick(b) for b in brick]
    elif instruction is not None:
        request.pop("bricks", None)
        request["instruction"], request["k"] = instruction, k
    for key, value in (("base_model", base), ("method", method), ("output", output), ("rank", rank)):
        if value is not None:
            request[key] = value
    if param:
        from composer.cli import parse_param

        request["params"] = {**request.get("params", {}), **dict(parse_param(p) for p in param)}
    if fit is not None:
        request["fit"] = _fit_request(fit, fit_steps, fit_prompt)
    if "base_model" not in request:
        raise typer.BadParameter("give --base (or a --recipe file naming base_model)")
    if "bricks" not in request and "instruction" not in request:
        raise typer.BadParameter("give --brick (one or more), --instruction or --recipe")
    if isinstance(request.get("bricks"), list):
        _refuse_duplicates([b for b in request["bricks"] if isinstance(b, dict) and "name" in b])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before any heavy work
        raise typer.BadParameter(f"{out} is not an empty directory; choose a new or empty output directory")
    with _client(url) as client:
        composition = client.compose(request)
        if expected_id is not None and composition.id != expected_id:
            err_console.print(
                f"note: the recipe now resolves to composition {composition.id[:16]}, not {expected_id[:16]} "
                "(a brick's bytes, the base model or the composer version changed)",
                highlight=False,
            )
        bricks = ", ".join(f"{b['name']}@{b['version']} x{b['weight']:.3g}" for b in composition.recipe["bricks"])
        err_console.print(
            f"composition {composition.id[:16]} ({composition.method}, {composition.output}): {bricks}",
            highlight=False,
        )
        if name is not None:
            client.name_composition(name, composition.id)
        composition = _wait_with_progress(client, composition, timeout=timeout, remote=bool(url))
        if composition.status != "ready":
            err_console.print(
                f"[bold red]the build {composition.status}[/] ({composition.error_code}): {composition.error}"
            )
            raise typer.Exit(1)
        paths = _download_with_progress(client, composition.id, out)
    size = sum(p.stat().st_size for p in paths)
    if as_json:
        print_json({**composition.model_dump(mode="json"), "out": str(out), "files": [str(p) for p in paths]})
        return
    console.print(f"wrote {len(paths)} files ({_size(size)}) to {out}", highlight=False)

    _report_truncation(out)


# An adapter output whose largest per-module relative error exceeds this no longer behaves
# like the exact merge: the user should raise the rank or compose a full model.
TRUNCATION_WARNING = 0.05


def _report_truncation(out: Path) -> None:
    """Print the truncation error an adapter output records in ``brickyard.json``, with a
    warning above `TRUNCATION_WARNING`."""
    try:
        record = json.loads((out / "brickyard.json").read_text(encoding="utf-8"))
        truncation = record["composer"]["truncation"]
        worst, mean = float(truncation["max_relative_error"]), float(truncation["mean_relative_error"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # a full model (no truncation), or no record to read
    console.print(f"adapter truncation: relative error max {worst:.3g}, mean {mean:.3g} (against the exact merge)")
    if worst > TRUNCATION_WARNING:
        err_console.print(
            f"[bold yellow]warning:[/] the adapter's error reaches {worst:.1%} on a module (above "
            f"{TRUNCATION_WARNING:.0%}): compose with a higher --rank, or --output full, which is exact"
        )


def _print_instruction_plan(instruction: str, base: str, k: int, url: str | None) -> None:
    """The bricks an instruction finds and the weights a composition would give them
    (`registry.builds.instruction_weights`), without building anything."""
    from rich.table import Table

    from registry.builds.instruction_weights import instruction_weights

    with _client(url) as client:
        hits = client.search(instruction, base_model=base, k=k)
    if not hits:
        err_console.print(f"no brick of base model {base!r} matches the instruction")
        raise typer.Exit(1)
    weights = instruction_weights([h.similarity for h in hits])
    table = Table("brick", "matched", "similarity", "weight")
    for hit, weight in zip(hits, weights, strict=True):
        shown = f"{weight:.3f}" if weight > 0 else "dropped (below the floor)"
        table.add_row(f"{hit.brick.name}@{hit.brick.version}", hit.matched, f"{hit.similarity:.3f}", shown)
    console.print(table)


# -- emergent bricks (issue #22) -------------------------------------------------------------

emergent_app = typer.Typer(
    help="Emergent bricks: find a base model's functional neurons, show them.", no_args_is_help=True
)
app.add_typer(emergent_app, name="emergent")


def _read_probe(spec: str, describe: Mapping[str, str]) -> dict[str, Any]:
    """``NAME=FILE``: a JSON file (``{"description": ..., "texts": [...]}``) or a text file
    with one probe text per line (description from ``--describe NAME=TEXT``)."""
    name, sep, file = spec.partition("=")
    if not sep or not name or not file:
        raise typer.BadParameter(f"{spec!r}: expected NAME=FILE")
    path = Path(file)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(f"{spec!r}: cannot read {file}: {exc.strerror or exc}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise typer.BadParameter(f"{file}: not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise typer.BadParameter(f"{file}: expected an object with description and texts")
        return {
            "name": name,
            "description": describe.get(name, data.get("description", "")),
            "texts": data.get("texts"),
        }
    texts = [line for line in raw.splitlines() if line.strip()]
    return {"name": name, "description": describe.get(name, f"emergent neurons of {name}"), "texts": texts}


@emergent_app.command("find")
def emergent_find(
    base: Annotated[str, typer.Option("--base", "-b", help="registered base model")],
    probe: Annotated[list[str], typer.Option("--probe", help="NAME=FILE, one per function (at least two)")],
    describe: Annotated[
        list[str] | None, typer.Option("--describe", help="NAME=TEXT: the function's description (repeatable)")
    ] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="lape | average_precision")] = "lape",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE method parameter")] = None,
    held_out: Annotated[float, typer.Option(help="fraction of each function's texts held out for verification")] = 0.2,
    url: UrlOption = None,
) -> None:
    """Find each function's neurons in the base model and register them as emergent bricks."""
    descriptions = dict(d.partition("=")[::2] for d in describe or [])
    request: dict[str, Any] = {
        "probes": [_read_probe(p, descriptions) for p in probe],
        "method": method,
        "held_out": held_out,
    }
    if param:
        from composer.cli import parse_param

        request["params"] = dict(parse_param(p) for p in param)
    with _client(url) as client:
        job = client.discover_emergent(base, request)
        console.print(f"discovery [bold]{job.id[:16]}[/] ({method}) on {base}: {', '.join(job.recipe['functions'])}")
        job = client.wait_composition(job.id)
        if job.status != "ready":
            err_console.print(f"[bold red]the discovery failed[/] ({job.error_code}): {job.error}")
            raise typer.Exit(1)
    console.print(job.message)


@emergent_app.command("show")
def emergent_show(ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION")], url: UrlOption = None) -> None:
    """Show an emergent brick and its verification table (relative loss increase per function
    when its neurons, or as many random ones, are ablated)."""
    from rich.table import Table

    name, version = _parse_ref(ref)
    with _client(url) as client:
        brick = client.get_brick(name, version)
    if brick.kind != "emergent" or brick.emergent is None:
        err_console.print(f"{brick.name}@{brick.version} is a {brick.kind} brick, not an emergent one")
        raise typer.Exit(1)
    print_record(console, brick, skip=("emergent", "rank", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"))
    info = brick.emergent
    console.print(
        f"method {info['method']} {json.dumps(info['params'])}; {info['neurons']} neurons "
        f"({', '.join(f'layer {k}: {v}' for k, v in info['neurons_per_layer'].items())})"
    )
    verification = info["verification"]
    functions = list(verification["base_loss"])
    table = Table("ablated set", "neurons", *functions, title="relative loss increase on held-out texts")
    for ablated_set, row in verification["relative_increase"].items():
        cells = [f"{row[f]:+.1%}" for f in functions]
        table.add_row(ablated_set, str(verification["sizes"][ablated_set]), *cells)
    table.add_row("(base loss)", "", *[f"{verification['base_loss'][f]:.4f}" for f in functions])
    console.print(table)


def _fit_request(path: Path, steps: int | None, prompt: str | None) -> dict[str, Any]:
    """The ``fit`` part of a composition request from a JSONL file of examples."""
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                examples.append(json.loads(line))
            except ValueError as exc:
                raise typer.BadParameter(f"{path}:{number}: not JSON ({exc})") from None
    fit: dict[str, Any] = {"examples": examples}
    if steps is not None:
        fit["steps"] = steps
    if prompt is not None:
        fit["prompt"] = prompt
    return fit


def _download_with_progress(client: Any, composition_id: str, out: Path) -> list[Path]:
    """Download with byte progress: a bar with sizes on a terminal, a line per 10 % otherwise."""
    if err_console.is_terminal:
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        with Progress(
            "downloading", BarColumn(bar_width=30), DownloadColumn(), TransferSpeedColumn(), console=err_console
        ) as progress:
            task = progress.add_task("download", total=None)
            return list(
                client.download_composition(
                    composition_id, out, lambda done, total: progress.update(task, completed=done, total=total)
                )
            )
    shown = [-1]

    def log(done: int, total: int) -> None:
        step = 100 * done // total // 10 if total else 10
        if step > shown[0]:
            shown[0] = step
            err_console.print(f"downloaded {_size(done)} of {_size(total)}", markup=False, highlight=False)

    return list(client.download_composition(composition_id, out, log))


_NO_WORKER_HINT_S = 15.0


def _wait_with_progress(client: Any, composition: Any, *, timeout: float | None, remote: bool) -> Any:
    """Wait for the build: a progress bar on a terminal, a plain line per change otherwise
    (CI logs), and a hint when a server leaves it queued (no worker running?)."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.monotonic()
    hinted = False
    last: list[str] = [""]

    def hint(state: Any) -> None:
        nonlocal hinted
        if remote and not hinted and state.status == "queued" and time.monotonic() - started > _NO_WORKER_HINT_S:
            hinted = True
            err_console.print(
                f"still queued after {_NO_WORKER_HINT_S:.0f} s: is a worker running? (the server builds with "
                "its own workers unless compose.workers is 0; `brickyard worker` runs more)",
                highlight=False,
            )

    try:
        if err_console.is_terminal:
            columns = (
                TextColumn("{task.description:<40.40}"),
                BarColumn(bar_width=30),
                TextColumn("{task.percentage:>5.1f}%"),
            )
            with Progress(*columns, TimeElapsedColumn(), console=err_console) as progress:
                task = progress.add_task(composition.status, total=1.0)

                def show(state: Any) -> None:
                    progress.update(task, completed=state.progress, description=f"{state.status}: {state.message}")
                    hint(state)

                return client.wait_composition(composition.id, show, timeout=timeout)

        def log(state: Any) -> None:
            line = f"{state.status} {state.progress:.0%}: {state.message}"
            if line != last[0]:
                last[0] = line
                err_console.print(line, markup=False, highlight=False)
            hint(state)

        return client.wait_composition(composition.id, log, timeout=timeout)
    except TimeoutError as exc:
        err_console.print(f"[bold red]timed out[/]: {exc}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def methods(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """List the merge methods and their parameters."""
    with _client(url) as client:
        found = client.merge_methods()
    rows = []
    for method in found:
        props = method.params.get("properties", {})
        rows.append([method.name, ", ".join(f"{k}={v.get('default')!r}" for k, v in props.items()), method.description])
    columns = [Column("method", key=True), Column("parameters (default)"), Column("description", flex=True)]
    print_rows(console, columns, rows, records=found, as_json=as_json)


@app.command()
def worker(
    workers: Annotated[int, typer.Option(help="builds run at once")] = 1,
) -> None:
    """Build queued compositions (run beside or instead of the server's own workers)."""
    import signal
    import threading

    from registry.builds.jobs import WorkerPool
    from registry.service import Registry
    from registry.settings import Settings

    settings = Settings()
    settings = settings.model_copy(update={"compose": settings.compose.model_copy(update={"workers": workers})})
    registry = Registry.open(settings)

    def report(composition_id: str, seconds: float, status: str, detail: str) -> None:
        line = f"{composition_id[:16]} {status} in {seconds:.1f} s" + (f": {detail}" if detail else "")
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    pool = WorkerPool(registry.compositions, settings, on_build=report)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pool.start()
    console.print(f"building compositions with {workers} worker(s); Ctrl-C to stop")
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        pool.stop()
        registry.close()


def _mount_management() -> None:
    from registry.cli.manage import alias_app, composition_app

    app.add_typer(composition_app, name="composition")
    brick_app.add_typer(alias_app, name="alias")


_mount_management()


# -- OpenAI-compatible generation (registry.serve) ------------------------------------------


def _generate(body: dict[str, Any], *, chat: bool, url: str | None) -> str:
    """Stream one generation to the terminal; print which bricks answered. Returns the text."""
    from registry.serve.console import stream_generation
    from registry.settings import Settings

    token = None
    if url:
        settings = Settings()
        token = settings.token
        if token is None and settings.admin_token_file.exists():
            token = settings.admin_token_file.read_text().strip()
    pieces: list[str] = []

    def on_used(used: dict[str, Any]) -> None:
        bricks = ", ".join(
            f"{b['name']}@{b['version']} x{b['weight']:.3g}" + (f" (score {b['score']:.2f})" if b.get("score") else "")
            for b in used.get("bricks", [])
        )
        line = f"[dim]{used.get('base_model')}[/]" + (f" + {bricks}" if bricks else " (base model alone)")
        if used.get("recipe_id"):
            line += f" [dim]recipe {str(used['recipe_id'])[:16]}[/]"
        err_console.print(line)
        if used.get("note"):
            err_console.print(f"[yellow]{used['note']}[/]")

    def on_text(text: str) -> None:
        pieces.append(text)
        console.print(text, end="", markup=False, highlight=False, soft_wrap=True)

    try:
        stream_generation(body, chat=chat, url=url, token=token, on_used=on_used, on_text=on_text)
    except BrickyardError as exc:
        _fail(exc)
    console.print()
    return "".join(pieces)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt (sent as one user message with --chat)")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="base, brick[@version], composition id, auto[:base]")
    ] = "auto",
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="tokens to generate")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0: greedy")] = 0.0,
    k: Annotated[int, typer.Option("-k", help="auto: at most this many bricks")] = 3,
    min_score: Annotated[float | None, typer.Option("--min-score", help="auto: score threshold")] = None,
    chat_format: Annotated[bool, typer.Option("--chat", help="send as a chat message")] = False,
    url: UrlOption = None,
) -> None:
    """Generate text with a model of the registry, showing which bricks answered."""
    options: dict[str, Any] = {"k": k} | ({"min_score": min_score} if min_score is not None else {})
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "brickyard": options}
    if chat_format:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    _generate(body, chat=chat_format, url=url)


@app.command()
def chat(
    model: Annotated[
        str, typer.Option("--model", "-m", help="base, brick[@version], composition id, auto[:base]")
    ] = "auto",
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="tokens per answer")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0: greedy")] = 0.0,
    url: UrlOption = None,
) -> None:
    """Chat in the terminal (empty line or Ctrl-D ends); each answer says which bricks answered."""
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        messages.append({"role": "assistant", "content": _generate(body, chat=True, url=url)})


def _mount_local() -> None:
    from composer.cli import app as composer_app

    app.add_typer(composer_app, name="local", help="Compose from local paths, without a registry.")


_mount_local()


# -- demo -------------------------------------------------------------------------------


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where to build models and keep the demo registry")] = Path(".demo"),
) -> None:
    """The whole flow on SQLite: build tiny models, serve, register, search, compose, generate."""
    from registry.demo import run_demo

    sys.exit(run_demo(workdir, console))


def main() -> None:
    """Entry point of the ``brickyard`` script."""
    app()
