"""Commands on the run store itself: which one a command uses, and making a copied store its own."""
from __future__ import annotations

import typer

from opskit.cli.app import _help, app, store_choice
from opskit.cli.output import JSON, emit, key_values

store_app = typer.Typer(no_args_is_help=True, help=_help("The run store (state.db): which one is used, and copies.",
                                                         "opskit store show", "opskit store adopt --state ~/backup/state.db"))
app.add_typer(store_app, name="store")


@store_app.command("show")
def store_show(as_json: bool = JSON):
    """Which run store commands use here, and why (--state, OPSKIT_STATE, found here or above).

    Example: opskit store show
    """
    from opskit.cli.app import open_store
    choice = store_choice()
    info = {"path": str(choice.path.resolve()), "chosen_by": choice.how, "exists": choice.path.exists()}
    if info["exists"]:
        with open_store() as store:
            info.update(schema_version=store.schema_version, runs=store.count("runs"),
                        targets=[t["name"] for t in store.list_targets()])
    emit(info, as_json, lambda d: key_values(d))


@store_app.command("adopt")
def store_adopt(as_json: bool = JSON):
    """Make a copied store one of its own: it records its new place, and the targets that kept their
    runs beside the original (the built-in local one) now keep them beside the copy.

    Example: opskit store adopt --state ~/backup/state.db
    """
    from opskit.store import Store
    choice = store_choice()
    with Store(choice.path, create=False, adopt=True) as store:
        notes = list(store.notes)
    emit({"path": str(choice.path.resolve()), "notes": notes}, as_json,
         lambda d: typer.echo("\n".join(d["notes"]) or f"{d['path']} is its own store"))
