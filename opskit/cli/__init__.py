"""The `opskit` command line: each command parses, calls one operation, renders. Nothing else lives
here, and only this layer imports typer and rich.

    app.py      the apps, --state, main()          output.py   --json, emit, tables, formats
    runs.py     launch logs cancel resume pull runs queue export
    status.py   status (and the live view of launch --wait)
    catalog.py  matrix models rope datasets         targets.py  targets add/list/check/prepare/remove
    results.py  report gate publish import          cost.py     cost
    store.py    store show/adopt

Heavy modules (the store, the catalog, targets) are imported inside the commands so that
`opskit --help` starts fast; torch is never imported by the control plane.
"""
from opskit.cli.app import app, main
from opskit.cli import runs, status, catalog, targets, results, cost, store  # noqa: E402,F401,I001  (each registers its commands)

__all__ = ["app", "main"]
