"""The `kvmart` command line (the entry point is `kvmart.cli.main:main`): thin commands that parse, call the
library and print through `output`. main.py holds the core loop's commands and `serve`; ledger.py the operator's
`accounts` and `ledger` groups."""
