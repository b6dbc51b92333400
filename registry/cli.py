"""The ``brickyard`` command line: thin commands over the clients in `registry.client`.

Without ``--url`` (or ``BRICKYARD_URL``) commands work on the local registry in
``BRICKYARD_HOME``; with it they talk to a server. Heavy libraries (torch, transformers,
sentence-transformers) are imported only by the commands that need them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from registry.errors import BrickyardError

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
token_app = typer.Typer(help="API tokens: create, list, revoke (on the local registry).", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(token_app, name="token")
app.add_typer(brick_app, name="brick")
app.add_typer(db_app, name="db")

UrlOption = Annotated[
    str | None,
    typer.Option("--url", envvar="BRICKYARD_URL", help="Brickyard server; default: the local registry"),
]


@contextmanager
def _client(url: str | None) -> Iterator[Any]:
    if url:
        from registry.client import RemoteClient
        from registry.settings import Settings

        settings = Settings()
        token = settings.token
        if token is None and settings.admin_token_file.exists():
            token = settings.admin_token_file.read_text().strip()  # the local server's bootstrap token
        client: Any = RemoteClient(url, token=token)
    else:
        from registry.client import LocalClient

        client = LocalClient.open()
    try:
        yield client
    finally:
        client.close()


def _fail(exc: BrickyardError) -> NoReturn:
    err_console.print(f"[bold red]error[/] ({exc.code}): {exc.detail}")
    for line in exc.errors:
        err_console.print(f"  - {line}", markup=False, highlight=False)
    for key, value in exc.extra.items():
        err_console.print(f"  {key}: {json.dumps(value, default=str)}", markup=False, highlight=False)
    raise typer.Exit(1)


def _parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` or ``name@version``."""
    name, _, version = ref.partition("@")
    if not version:
        return name, None
    if not version.isdigit():
        raise typer.BadParameter(f"{ref!r}: the version after '@' must be a number")
    return name, int(version)


def _show_record(record: Any, *, skip: tuple[str, ...] = ()) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in record.model_dump(mode="json").items():
        if key in skip:
            continue
        text = (
            ", ".join(map(str, value))
            if isinstance(value, list)
            else json.dumps(value)
            if isinstance(value, dict)
            else str(value)
        )
        table.add_row(key, text)
    console.print(table)


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

    engine = make_engine(Settings().sqlalchemy_url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    state = "[green]up to date[/]" if current == head else "[yellow]out of date: run `brickyard db upgrade`[/]"
    console.print(f"database: {current or 'empty'}; code: {head}; {state}")


# -- base models ------------------------------------------------------------------------


@base_app.command("add")
def base_add(
    path: Annotated[Path, typer.Argument(help="local Hugging Face model directory")],
    name: Annotated[str, typer.Option("--name", "-n", help="name to register it under")],
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    alias: Annotated[list[str] | None, typer.Option(help="another name adapters may record (repeatable)")] = None,
    url: UrlOption = None,
) -> None:
    """Register a base model (reads only its config and safetensors headers)."""
    with _client(url) as client:
        base = client.add_base_model(
            name, str(path if url else path.resolve()), description=description, aliases=alias or []
        )
    console.print(
        f"registered base model [bold]{base.name}[/]: {base.architecture}, {base.dtype}, "
        f"{base.parameter_count:,} parameters, {base.linear_module_count} linear modules"
    )


@base_app.command("list")
def base_list(url: UrlOption = None) -> None:
    """List base models."""
    with _client(url) as client:
        bases = client.list_base_models()
    table = Table("name", "architecture", "dtype", "parameters", "fingerprint", "path")
    for base in bases:
        table.add_row(
            base.name, base.architecture, base.dtype, f"{base.parameter_count:,}", base.fingerprint[:12], base.path
        )
    console.print(table)


@base_app.command("show")
def base_show(name: str, url: UrlOption = None) -> None:
    """Show a base model."""
    with _client(url) as client:
        base = client.get_base_model(name)
    _show_record(base, skip=("linear_modules",))


# -- bricks -----------------------------------------------------------------------------


@brick_app.command("push")
def brick_push(
    adapter_dir: Annotated[Path, typer.Argument(help="PEFT adapter directory (adapter_config.json + safetensors)")],
    name: Annotated[str, typer.Option("--name", "-n")],
    base: Annotated[str, typer.Option("--base", "-b", help="registered base model name")],
    description: Annotated[str, typer.Option("--description", "-d", help="what the brick can do")],
    example: Annotated[list[str] | None, typer.Option("--example", "-e", help="an example input (repeatable)")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="a tag (repeatable)")] = None,
    version: Annotated[int | None, typer.Option(help="explicit version; default the next free")] = None,
    license: Annotated[str | None, typer.Option(help="license identifier")] = None,
    metric: Annotated[list[str] | None, typer.Option(help="NAME=VALUE (repeatable)")] = None,
    url: UrlOption = None,
) -> None:
    """Register an adapter directory as a brick."""
    metadata: dict[str, Any] = {
        "name": name,
        "base_model": base,
        "description": description,
        "examples": example or [],
        "tags": tag or [],
    }
    if version is not None:
        metadata["version"] = version
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
    tag: Annotated[str | None, typer.Option("--tag", "-t")] = None,
    all_versions: Annotated[bool, typer.Option("--all-versions", help="every version, not only the latest")] = False,
    limit: Annotated[int, typer.Option(help="at most this many")] = 100,
    url: UrlOption = None,
) -> None:
    """List bricks (latest version of each)."""
    from registry.client import iter_bricks

    table = Table("brick", "base model", "rank", "modules", "tags", "size", "description")
    with _client(url) as client:
        for count, brick in enumerate(
            iter_bricks(client, base_model=base, tag=tag, all_versions=all_versions, limit=min(limit, 500))
        ):
            if count >= limit:
                break
            table.add_row(
                f"{brick.name}@{brick.version}",
                brick.base_model,
                str(brick.rank),
                ",".join(brick.target_modules),
                ",".join(brick.tags),
                _size(brick.size_bytes),
                brick.description if len(brick.description) <= 60 else brick.description[:57] + "...",
            )
    console.print(table)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@brick_app.command("show")
def brick_show(ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION")], url: UrlOption = None) -> None:
    """Show a brick version (the latest by default)."""
    name, version = _parse_ref(ref)
    with _client(url) as client:
        brick = client.get_brick(name, version)
    _show_record(brick)


@brick_app.command("pull")
def brick_pull(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to write the adapter into")],
    url: UrlOption = None,
) -> None:
    """Download a brick as a PEFT adapter directory."""
    name, version = _parse_ref(ref)
    with _client(url) as client:
        version = version or client.get_brick(name).version
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
    name, version = _parse_ref(ref)
    if version is None:
        raise typer.BadParameter("name the version to edit: NAME@VERSION")
    changes: dict[str, Any] = {}
    if description is not None:
        changes["description"] = description
    if example is not None:
        changes["examples"] = example
    if tag is not None:
        changes["tags"] = tag
    with _client(url) as client:
        brick = client.update_brick(name, version, **changes)
    console.print(f"updated [bold]{brick.name}@{brick.version}[/]")


@brick_app.command("rm")
def brick_rm(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    url: UrlOption = None,
) -> None:
    """Delete a brick version."""
    name, version = _parse_ref(ref)
    if version is None:
        raise typer.BadParameter("name the version to delete: NAME@VERSION")
    if not yes and not typer.confirm(f"delete {name}@{version}?"):
        raise typer.Exit(1)
    with _client(url) as client:
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
        ("compositions", report.composition_problems, "yellow"),
        ("removed", report.removed, "green"),
    ):
        if items:
            console.print(f"[{style}]{label}: {len(items)}[/]")
            for item in items[:50]:
                console.print(f"  {item}", markup=False, highlight=False)
    if not report.healthy:
        err_console.print("[bold red]bricks with missing or corrupt bytes must be registered again[/]")
        raise typer.Exit(1)
    console.print("[green]no missing or corrupt data[/]")


# -- tokens -----------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option("--name", "-n", help="who or what will use it (e.g. ci)")],
    scope: Annotated[str, typer.Option("--scope", "-s", help="read, write or admin")] = "write",
) -> None:
    """Create an API token and print it (it is stored hashed: this is the only time it is shown)."""
    from registry.inputs import NAME_PATTERN
    from registry.service import Registry

    if scope not in ("read", "write", "admin"):
        raise typer.BadParameter("scope must be read, write or admin")
    import re

    if not re.match(NAME_PATTERN, name):
        raise typer.BadParameter("names are 1-100 ASCII letters, digits, '.', '_' or '-'")
    registry = Registry.open()
    try:
        token, info = registry.tokens.create(name, scope, actor=_local_actor())  # type: ignore[arg-type]
    finally:
        registry.close()
    err_console.print(f"created {info.scope} token [bold]{info.name}[/]; keep it secret, it will not be shown again:")
    console.print(token, markup=False, highlight=False)


@token_app.command("list")
def token_list() -> None:
    """List API tokens (names, scopes, use; never the secrets)."""
    from registry.service import Registry

    registry = Registry.open()
    try:
        tokens = registry.tokens.list()
    finally:
        registry.close()
    table = Table("name", "scope", "prefix", "created", "by", "last used", "revoked")
    for t in tokens:
        table.add_row(
            t.name,
            t.scope,
            t.prefix + "…",
            f"{t.created_at:%Y-%m-%d %H:%M}",
            t.created_by or "",
            f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "",
            f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "",
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument(help="token name")]) -> None:
    """Revoke an API token; it stops working immediately."""
    from registry.service import Registry

    registry = Registry.open()
    try:
        info = registry.tokens.revoke(name, actor=_local_actor())
    finally:
        registry.close()
    console.print(f"revoked token [bold]{info.name}[/]")


def _local_actor() -> str:
    from registry.client import local_actor

    return local_actor()


# -- search -----------------------------------------------------------------------------


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="a task description or an example input")],
    base: Annotated[str | None, typer.Option("--base", "-b", help="only bricks of this base model")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="only bricks with this tag (repeatable)")] = None,
    k: Annotated[int, typer.Option("-k", help="how many bricks")] = 5,
    min_score: Annotated[float | None, typer.Option(help="drop hits scoring below this")] = None,
    url: UrlOption = None,
) -> None:
    """Find the bricks that fit a task description or an example input."""
    with _client(url) as client:
        hits = client.search(query, base_model=base, tags=tag or None, k=k, min_score=min_score)
    table = Table("#", "brick", "base model", "score", "matched", "text")
    for rank, hit in enumerate(hits, 1):
        shown = hit.text if len(hit.text) <= 70 else hit.text[:67] + "..."
        table.add_row(
            str(rank),
            f"{hit.brick.name}@{hit.brick.version}",
            hit.brick.base_model,
            f"{hit.score:.2f}",
            f"{hit.matched} ({hit.similarity:.2f})",
            shown,
        )
    console.print(table if hits else "no matching bricks")


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
    """``NAME[@VERSION][:WEIGHT]``."""
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


@app.command()
def compose(
    base: Annotated[str, typer.Option("--base", "-b", help="registered base model")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to download the composed model into")],
    brick: Annotated[
        list[str] | None, typer.Option("--brick", help="NAME[@VERSION][:WEIGHT] (repeatable)", show_default=False)
    ] = None,
    instruction: Annotated[str | None, typer.Option("--instruction", "-i", help="pick bricks by this task")] = None,
    k: Annotated[int, typer.Option("-k", help="with --instruction: how many bricks")] = 3,
    method: Annotated[str, typer.Option("--method", "-m", help="merge method (see `brickyard methods`)")] = "linear",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE method parameter")] = None,
    output: Annotated[str, typer.Option("--output", help="full (merged model) or adapter (one LoRA)")] = "full",
    rank: Annotated[int | None, typer.Option(help="adapter output: truncate to this rank")] = None,
    url: UrlOption = None,
) -> None:
    """Compose bricks into the base model (or one adapter) and download the result."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if (brick is None) == (instruction is None):
        raise typer.BadParameter("give --brick (one or more) or --instruction")
    request: dict[str, Any] = {"base_model": base, "method": method, "output": output}
    if brick is not None:
        request["bricks"] = [_parse_brick(b) for b in brick]
    else:
        request["instruction"], request["k"] = instruction, k
    if param:
        from composer.cli import parse_param

        request["params"] = dict(parse_param(p) for p in param)
    if rank is not None:
        request["rank"] = rank
    with _client(url) as client:
        composition = client.compose(request)
        bricks = ", ".join(f"{b['name']}@{b['version']} x{b['weight']:.3g}" for b in composition.recipe["bricks"])
        console.print(f"composition [bold]{composition.id[:16]}[/] ({method}, {output}): {bricks}")
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"))
        with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task(composition.status, total=1.0)

            def show(state: Any) -> None:
                progress.update(task, completed=state.progress, description=f"{state.status}: {state.message}"[:60])

            composition = client.wait_composition(composition.id, show)
        if composition.status != "ready":
            err_console.print(f"[bold red]the build failed[/] ({composition.error_code}): {composition.error}")
            raise typer.Exit(1)
        paths = client.download_composition(composition.id, out)
    size = sum(p.stat().st_size for p in paths)
    console.print(f"wrote {len(paths)} files ({_size(size)}) to {out}")


@app.command()
def methods(url: UrlOption = None) -> None:
    """List the merge methods and their parameters."""
    with _client(url) as client:
        found = client.merge_methods()
    table = Table("method", "parameters (default)", "description")
    for method in found:
        props = method.params.get("properties", {})
        params = ", ".join(f"{k}={v.get('default')!r}" for k, v in props.items())
        table.add_row(method.name, params, method.description)
    console.print(table)


@app.command()
def worker(
    workers: Annotated[int, typer.Option(help="builds run at once")] = 1,
) -> None:
    """Build queued compositions (run beside or instead of the server's own workers)."""
    import signal
    import threading

    from registry.jobs import WorkerPool
    from registry.service import Registry
    from registry.settings import Settings

    settings = Settings()
    settings = settings.model_copy(update={"compose": settings.compose.model_copy(update={"workers": workers})})
    registry = Registry.open(settings)
    pool = WorkerPool(registry.compositions, settings)
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
