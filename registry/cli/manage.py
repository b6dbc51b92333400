"""``brickyard composition ...`` and ``brickyard brick alias ...``: managing compositions
(list, show, rm, cancel, name) and brick version aliases, over the local registry or a
server. Mounted on the root command by `registry.cli.app`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from registry.cli.support import Column, JsonOption, UrlOption, open_client, print_json, print_record, print_rows

__all__ = ["alias_app", "composition_app", "composition_rows"]

console = Console()
err_console = Console(stderr=True)

composition_app = typer.Typer(help="Compositions: list, show, cancel, rm, name.", no_args_is_help=True)
alias_app = typer.Typer(help="Brick version aliases: set, rm, list (NAME@ALIAS works wherever a version does).")

RefArgument = Annotated[str, typer.Argument(help="composition id (or a unique prefix of 8+) or name")]


def _resolve(client: Any, ref: str) -> str:
    """A full id for a name, an id, or an id prefix of at least 8 hex digits (as listed)."""
    if 8 <= len(ref) < 64 and all(c in "0123456789abcdef" for c in ref):
        matches = [c.id for c in _all(client) if c.id.startswith(ref)]
        if len(matches) == 1:
            return str(matches[0])
        if len(matches) > 1:
            raise typer.BadParameter(f"{ref!r} is the start of {len(matches)} composition ids; give more of it")
    return ref


def _all(client: Any, **filters: Any) -> list[Any]:
    found, cursor = [], None
    while True:
        page = client.list_compositions(cursor=cursor, limit=500, **filters)
        found.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return found


def composition_rows(compositions: list[Any]) -> list[list[str]]:
    """Table rows of compositions: id, names, status, method/output, bricks, created."""
    rows = []
    for c in compositions:
        bricks = ", ".join(f"{b['name']}@{b['version']}x{b['weight']:.3g}" for b in c.recipe.get("bricks", []))
        status = c.status if c.status != "running" else f"running {c.progress:.0%}"
        rows.append(
            [c.id[:16], ",".join(c.names), status, f"{c.method}/{c.output}", f"{c.created_at:%Y-%m-%d %H:%M}", bricks]
        )
    return rows


@composition_app.command("list")
def composition_list(
    base: Annotated[str | None, typer.Option("--base", "-b", help="only compositions of this base model")] = None,
    brick: Annotated[str | None, typer.Option("--brick", help="only compositions using this brick (name)")] = None,
    status: Annotated[str | None, typer.Option("--status", help="queued, running, ready, failed or cancelled")] = None,
    name: Annotated[str | None, typer.Option("--name", help="only the composition with this name")] = None,
    limit: Annotated[int, typer.Option(help="at most this many (pages are followed)", min=1)] = 100,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List compositions, newest first. Piped: one tab-separated line each (id prefix, names,
    status, method/output, created, bricks)."""
    found: list[Any] = []
    more = False
    with open_client(url) as client:
        cursor = None
        while len(found) <= limit:
            page = client.list_compositions(
                base_model=base, brick=brick, status=status, name=name, cursor=cursor, limit=min(limit + 1, 500)
            )
            found.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
    if len(found) > limit:
        found, more = found[:limit], True
    if more:
        err_console.print(f"showing the newest {limit} compositions; pass --limit to see more", highlight=False)
    columns = [Column("id", key=True), Column("names"), Column("status"), Column("method"), Column("created")]
    columns.append(Column("bricks", flex=True))
    print_rows(console, columns, composition_rows(found), records=found, as_json=as_json, empty="no compositions")


@composition_app.command("show")
def composition_show(ref: RefArgument, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Show a composition: status, progress, error, names and recipe."""
    with open_client(url) as client:
        composition = client.describe_composition(_resolve(client, ref))
    print_record(console, composition, as_json=as_json)


@composition_app.command("cancel")
def composition_cancel(ref: RefArgument, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Cancel a queued or running build (it stops within about a second and leaves no files)."""
    with open_client(url) as client:
        composition = client.cancel_composition(_resolve(client, ref))
    if as_json:
        print_json(composition.model_dump(mode="json"))
    else:
        console.print(f"cancelled composition {composition.id}", highlight=False)


@composition_app.command("rm")
def composition_rm(
    ref: RefArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    url: UrlOption = None,
) -> None:
    """Delete a composition, its names and files (a queued or running build is cancelled)."""
    with open_client(url) as client:
        composition_id = _resolve(client, ref)
        if not yes and not typer.confirm(f"delete composition {composition_id}?"):
            raise typer.Exit(1)
        composition = client.delete_composition(composition_id)
    console.print(f"deleted composition {composition.id}", highlight=False)


@composition_app.command("name")
def composition_name(
    name: Annotated[str, typer.Argument(help="the name")],
    ref: Annotated[str | None, typer.Argument(help="composition id or name to point it at")] = None,
    remove: Annotated[bool, typer.Option("--rm", help="remove the name instead")] = False,
    url: UrlOption = None,
) -> None:
    """Point NAME at a composition (moving it if it exists), or remove it with --rm. The name
    then works wherever an id does (show, cancel, rm, the REST API)."""
    if remove == (ref is not None):
        raise typer.BadParameter("give NAME and a composition to point it at, or NAME --rm")
    with open_client(url) as client:
        if remove:
            composition = client.unname_composition(name)
            console.print(f"removed name {name} (was {composition.id})", highlight=False)
            return
        assert ref is not None
        composition = client.name_composition(name, _resolve(client, ref))
    console.print(f"{name} -> {composition.id}", highlight=False)


# -- brick aliases ------------------------------------------------------------------------


@alias_app.command("set")
def alias_set(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION (or NAME@ANOTHER_ALIAS)")],
    alias: Annotated[str, typer.Argument(help="the alias, e.g. production")],
    url: UrlOption = None,
) -> None:
    """Point NAME@ALIAS at a version; setting it again moves it."""
    name, sep, version = ref.partition("@")
    if not sep or not version:
        raise typer.BadParameter(f"{ref!r}: give NAME@VERSION, e.g. sentiment@3")
    target: int | str = int(version) if version.isascii() and version.isdigit() else version
    with open_client(url) as client:
        found = client.set_brick_alias(name, target, alias)
    console.print(f"{found.name}@{found.alias} -> {found.name}@{found.version}", highlight=False)


@alias_app.command("rm")
def alias_rm(
    ref: Annotated[str, typer.Argument(help="NAME@ALIAS")],
    url: UrlOption = None,
) -> None:
    """Remove an alias (the version stays)."""
    name, sep, alias = ref.partition("@")
    if not sep or not alias:
        raise typer.BadParameter(f"{ref!r}: give NAME@ALIAS, e.g. sentiment@production")
    with open_client(url) as client:
        found = client.remove_brick_alias(name, alias)
    console.print(f"removed {found.name}@{found.alias} (was version {found.version})", highlight=False)


@alias_app.command("list")
def alias_list(
    name: Annotated[str, typer.Argument(help="brick name")],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """The aliases of a brick and the versions they point at."""
    with open_client(url) as client:
        aliases = client.brick_aliases(name)
    rows = [[a.alias, f"{a.name}@{a.version}", f"{a.created_at:%Y-%m-%d %H:%M}", a.created_by or ""] for a in aliases]
    columns = [Column("alias", key=True), Column("version", key=True), Column("set"), Column("by", flex=True)]
    print_rows(console, columns, rows, records=aliases, as_json=as_json, empty=f"{name} has no aliases")
