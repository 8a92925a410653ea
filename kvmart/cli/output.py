"""Where the command line writes: `out` for results (stdout, never wrapped or highlighted, so pipes get plain
text), `console` for progress, notices and errors (stderr). Every command module prints through these two."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)
