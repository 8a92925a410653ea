"""The command line as tests drive it: `kvmart.cli.main.main` (which reads sys.argv and translates errors) wrapped in the
shape click's CliRunner invokes. Not a test module."""

from __future__ import annotations

import sys

import click

import kvmart.cli.main


class EntryPoint(click.Command):
    """`kvmart.cli.main.main` in the shape CliRunner invokes."""

    def __init__(self) -> None:
        super().__init__("kvmart")

    def main(self, args=None, prog_name=None, **extra):
        sys.argv = ["kvmart", *(args or [])]
        kvmart.cli.main.main()
