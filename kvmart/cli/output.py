"""Where the command line writes: `out` for results (stdout, never wrapped or highlighted, so pipes get plain
text), `console` for progress, notices and errors (stderr). Every command module prints through these two.

Listings go through `listing`: a table when it fits the terminal, one block per row when it does not (ids and
dollar amounts are never cut or wrapped), and at its natural width on a pipe; every listing command also takes
--json."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)

Column = tuple[str, bool]  # (heading, right-aligned)
UNLIMITED = 10_000  # columns: to measure a table's natural width


def table_of(columns: Sequence[Column], rows: Sequence[Sequence[str]], title: str | None = None) -> Table:
    """A table whose cells never wrap or shorten (text, not markup)."""
    table = Table(title=title, title_justify="left")
    for heading, right in columns:
        table.add_column(heading, justify="right" if right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*map(escape, row))
    return table


def records(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> str:
    """One block per row: its first cell, then `heading value` pairs wrapped to `width`."""
    blocks = []
    for row in rows:
        pairs = " · ".join(f"{heading} {value}" for (heading, _), value in zip(columns[1:], row[1:], strict=True))
        blocks.append(row[0] + "\n" + textwrap.fill(pairs, width, initial_indent="  ", subsequent_indent="  ",
                                                    break_on_hyphens=False))
    return "\n".join(blocks)


def listing(columns: Sequence[Column], rows: Sequence[Sequence[str]], title: str | None = None, empty: str = "",
            console_: Console | None = None) -> None:
    """Print rows as a table if it fits (on a terminal: its width; on a pipe: any width), else as records."""
    target = console_ or out
    if not rows and empty:
        target.print(empty, markup=False)
        return
    table = table_of(columns, rows, title)
    natural = target.measure(table, options=target.options.update_width(UNLIMITED)).maximum
    if not target.is_terminal:  # a pipe has no width: print the whole table (Console.print cannot go wider)
        Console(file=target.file, width=max(natural, target.width), highlight=False, soft_wrap=True).print(table)
    elif natural <= target.width:
        target.print(table)
    else:
        if title:
            target.print(title, markup=False)
        target.print(records(columns, rows, target.width), markup=False)


def print_json(value: object) -> None:
    """`value` as indented JSON on stdout (the --json of every listing command)."""
    click.echo(json.dumps(value, indent=2))
