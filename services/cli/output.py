"""What the command line prints: aligned tables and short summaries for people, JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

JsonOutput = Annotated[bool, typer.Option("--json", help="print JSON (for scripts) instead of the summary")]


def print_json(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2, default=str))


def emit(body: Any, as_json: bool, for_people: Callable[[Any], None]) -> None:
    """The API's JSON with --json, else `for_people`'s table or summary."""
    if as_json:
        print_json(body)
    else:
        for_people(body)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Plain columns separated by two spaces: readable in a terminal, and greppable in a pipe (no
    wrapping or truncation, whatever the width)."""
    cells = [[str(header).upper() for header in headers]] + [
        ["-" if v is None else str(v) for v in row] for row in rows
    ]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    for row in cells:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_fields(fields: Sequence[tuple[str, Any]]) -> None:
    """`label: value` lines; nested values as compact JSON."""
    width = max(len(label) for label, _ in fields)
    for label, value in fields:
        if isinstance(value, dict | list):
            value = json.dumps(value, default=str)
        typer.echo(f"{label + ':':{width + 1}} {'-' if value is None else value}")


def fail(message: str) -> typer.Exit:
    """Print `message` to stderr; the caller raises the returned Exit (status 1)."""
    typer.echo(message, err=True)
    return typer.Exit(1)


def figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
