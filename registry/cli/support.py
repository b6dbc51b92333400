"""How the ``brickyard`` command line prints and whom it talks to.

Three output modes, chosen per call:

- ``--json``: machine-readable JSON on stdout (the REST API's field names, so they are
  stable), nothing else on stdout;
- a terminal: a rich table that never cuts the identifying column (``sentiment@3``); the
  free-text column (description) is truncated with an ellipsis to fit the width instead;
- anything else (a pipe, a file, CI logs): plain tab-separated lines without header or
  borders, full values, so ``brickyard brick list | grep`` and ``cut -f1`` work.

The client is the remote one when a URL is given (``--url`` / ``BRICKYARD_URL``), with the
token from ``--token`` / ``BRICKYARD_TOKEN`` (or the local server's bootstrap token file).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console

__all__ = [
    "Column",
    "JsonOption",
    "UrlOption",
    "fit_widths",
    "open_client",
    "print_json",
    "print_record",
    "print_rows",
    "state",
]

UrlOption = Annotated[
    str | None,
    typer.Option("--url", envvar="BRICKYARD_URL", help="Brickyard server; default: the local registry"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print machine-readable JSON (stable keys) on stdout")]


@dataclass
class _State:
    """Options of the root command that every subcommand sees."""

    token: str | None = None


state = _State()

_GAP = 2  # spaces between table columns
_MIN_FLEX = 12  # the free-text column keeps at least this much
_MIN_OTHER = 6


@contextmanager
def open_client(url: str | None) -> Iterator[Any]:
    """The remote client for ``url`` (with the configured token), else the local registry."""
    if url:
        from registry.client import RemoteClient
        from registry.settings import Settings

        token = state.token
        if token is None:
            settings = Settings()
            token = settings.token
            if token is None and settings.admin_token_file.exists():
                token = settings.admin_token_file.read_text().strip()  # the local server's bootstrap token
        client: Any = RemoteClient(url, token=token)
    else:
        from registry.client import LocalClient

        _announce_one_time_work()
        client = LocalClient.open()
    try:
        yield client
    finally:
        client.close()


def _announce_one_time_work() -> None:
    """Let the one-time ONNX export of the embedding model (about 10 s, on the first local
    search or registration) print one line on stderr instead of looking like a hang."""
    import logging

    logger = logging.getLogger("registry.search.onnx_export")
    if not any(isinstance(h, _StderrNote) for h in logger.handlers):
        handler = _StderrNote(logging.INFO)
        handler.setFormatter(logging.Formatter("note: %(message)s; this takes a few seconds, once"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class _StderrNote(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record arrives (not the stream of the
    first command that installed it: the CLI may run several times in one process)."""

    def emit(self, record: logging.LogRecord) -> None:
        """Print the formatted record on the current stderr."""
        sys.stderr.write(self.format(record) + "\n")


@dataclass(frozen=True)
class Column:
    """A table column: ``key`` columns are never cut; the ``flex`` column absorbs the width."""

    header: str
    key: bool = False
    flex: bool = False


def fit_widths(natural: Sequence[int], columns: Sequence[Column], total: int) -> list[int]:
    """Column widths that fit ``total`` characters (with two-space gaps) where possible.

    The flexible column shrinks first (to a floor), then the widest other non-key columns;
    key columns keep their natural width even if the table then overflows.
    """
    widths = list(natural)
    gaps = _GAP * (len(widths) - 1)

    def excess() -> int:
        return sum(widths) + gaps - total

    for i, column in enumerate(columns):
        if column.flex and excess() > 0:
            widths[i] = max(min(_MIN_FLEX, natural[i]), widths[i] - excess())
    while excess() > 0:
        shrinkable = [i for i, c in enumerate(columns) if not c.key and not c.flex and widths[i] > _MIN_OTHER]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] = max(_MIN_OTHER, widths[widest] - excess())
    return widths


def print_rows(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    records: Sequence[Any] | None = None,
    as_json: bool = False,
    empty: str = "",
) -> None:
    """Print a listing in the mode that fits: JSON records, a table, or tab-separated lines."""
    if as_json:
        print_json([_jsonable(r) for r in (records if records is not None else rows)])
        return
    if not console.is_terminal:
        for row in rows:
            sys.stdout.write("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in row) + "\n")
        return
    if not rows:
        if empty:
            console.print(empty)
        return
    from rich.table import Table  # only a terminal listing needs it

    natural = [max([len(c.header), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    widths = fit_widths(natural, columns, console.width)
    table = Table(box=None, padding=(0, _GAP, 0, 0), pad_edge=False, show_edge=False, header_style="bold")
    for column, width in zip(columns, widths, strict=True):
        table.add_column(column.header, width=width, no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    console.print(table, soft_wrap=False, crop=False)


def print_record(console: Console, record: Any, *, as_json: bool = False, skip: tuple[str, ...] = ()) -> None:
    """One record: JSON, or ``key  value`` lines (aligned on a terminal, tab-separated otherwise)."""
    data = _jsonable(record)
    if as_json:
        print_json(data)
        return
    items = [(k, _text(v)) for k, v in data.items() if k not in skip]
    if not console.is_terminal:
        for key, text in items:
            sys.stdout.write(f"{key}\t{text}\n")
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for key, text in items:
        table.add_row(key, text)
    console.print(table)


def print_json(data: Any) -> None:
    """JSON on stdout, unstyled (no markup, highlighting or wrapping)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


def _jsonable(record: Any) -> Any:
    if hasattr(record, "model_dump"):
        return record.model_dump(mode="json")
    return record


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return "" if value is None else str(value)
