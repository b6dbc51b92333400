"""Local CLI: compose bricks from paths (``python -m composer compose ...``).

The typer ``app`` is mounted by the registry's CLI as ``brickyard local``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from composer.errors import ComposeError
from composer.plan import BrickSource

__all__ = ["app", "parse_brick", "parse_param"]

app = typer.Typer(help="Compose LoRA bricks locally, from paths.", no_args_is_help=True, add_completion=False)
_err = Console(stderr=True)


@app.callback()
def _main() -> None:
    """Compose LoRA bricks locally, from paths."""


def parse_brick(text: str) -> BrickSource:
    """``DIR`` or ``DIR:WEIGHT`` -> a BrickSource reading ``DIR/adapter_config.json`` and
    ``DIR/adapter_model.safetensors`` (the weight defaults to 1)."""
    path_text, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            pass
        else:
            path_text = head
    if not math.isfinite(weight):
        raise typer.BadParameter(f"brick weight must be finite: {text!r}")
    path = Path(path_text)
    if not path.is_dir():
        raise typer.BadParameter(f"{path} is not a directory (expected an adapter directory, optionally :WEIGHT)")
    return BrickSource(
        name=path.name or str(path),
        config_path=path / "adapter_config.json",
        weights_path=path / "adapter_model.safetensors",
        weight=weight,
    )


def parse_param(text: str) -> tuple[str, Any]:
    """``key=value``; the value is read as JSON when it parses (numbers, booleans), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


@app.command("compose")
def compose_command(
    base: Annotated[Path, typer.Option("--base", help="Base model directory (safetensors).")],
    brick: Annotated[list[str], typer.Option("--brick", help="Adapter directory, optionally DIR:WEIGHT. Repeat.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory (must not exist).")],
    method: Annotated[str, typer.Option("--method", help="Merge method (see `methods`).")] = "linear",
    param: Annotated[list[str] | None, typer.Option("--param", help="Method parameter key=value. Repeat.")] = None,
    output: Annotated[str, typer.Option("--output", help="full (a merged model) or adapter (one LoRA).")] = "full",
    rank: Annotated[int | None, typer.Option("--rank", help="Adapter output: truncate to this rank.")] = None,
) -> None:
    """Merge bricks into the base model (or into one adapter) and write OUT."""
    from composer.compose import compose

    sources = [parse_brick(text) for text in brick]
    params = dict(parse_param(text) for text in param or [])
    try:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}"),
            console=_err,
            transient=False,
        ) as bar:
            task = bar.add_task("composing", total=1.0, detail="")
            result = compose(
                base,
                sources,
                out,
                method=method,
                params=params,
                output=output,  # type: ignore[arg-type]  # validated by compose
                rank=rank,
                progress=lambda fraction, message: bar.update(task, completed=fraction, detail=message[-60:]),
            )
    except ComposeError as exc:
        _err.print(f"[red]error:[/red] {exc.message}")
        for problem in exc.problems:
            _err.print(f"  - {problem}")
        raise typer.Exit(code=2) from None
    except OSError as exc:
        _err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from None
    size = result.total_bytes / 1e6
    typer.echo(
        f"wrote {result.out_dir} ({result.output}, {len(result.files)} files, {size:.1f} MB) in {result.seconds:.1f}s"
    )
    if result.truncation is not None:
        typer.echo(
            f"relative error vs the exact merge: max {result.truncation.max_relative_error:.3g}, "
            f"mean {result.truncation.mean_relative_error:.3g}"
        )


@app.command("methods")
def methods_command() -> None:
    """List the merge methods and their parameters."""
    from composer.methods import list_methods

    table = Table("method", "description", "parameters")
    for info in list_methods():
        fields = info.params_schema.get("properties", {})
        shown = ", ".join(f"{name}={spec.get('default')!r}" for name, spec in fields.items()) or "-"
        table.add_row(info.name, info.description, shown)
    Console().print(table)
