"""The Typer apps, the global --state option and the entry point that turns errors into one line."""
from __future__ import annotations

import os
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from opskit.errors import EXIT_ERROR, EXIT_INTERRUPTED, OpsError

try:  # typer vendors click since 0.2x; older ones use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:
    from click.exceptions import ClickException
    NoArgsIsHelpError = ()  # (click < 8.2 prints the help itself)



def _help(text: str, *examples: str) -> str:
    """A command group's help: its line, then its examples one per line (\b keeps click from joining them)."""
    return text + "\n\n\b\n" + "\n".join(f"Example: {e}" for e in examples)


app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help=_help("Launch, watch and collect RoPE-spectrum training runs on local, SSH and SLURM targets.",
                             "opskit launch demo --wait && opskit status && opskit pull",
                             "opskit status --state failed --since 1d"))
targets_app = typer.Typer(no_args_is_help=True, help=_help(
    "Machines that run the trainer: local, ssh, slurm.", "opskit targets add box1 --ssh ubuntu@203.0.113.7 --gpus 8",
    "opskit targets check box1"))
matrix_app = typer.Typer(no_args_is_help=True, help=_help("The experiment catalog (configs/*.yaml).",
                                                          "opskit matrix show --phase demo"))
runs_app = typer.Typer(no_args_is_help=True, help=_help("One run in detail.", "opskit runs show demo/geo_500k/s42"))
rope_app = typer.Typer(no_args_is_help=True, help=_help("RoPE spectra: check a config before spending GPU hours on it.",
                                                        "opskit rope show hybrid_a0.2_t100k --preset 1.5B"))
app.add_typer(targets_app, name="targets")
app.add_typer(matrix_app, name="matrix")
app.add_typer(runs_app, name="runs")
app.add_typer(rope_app, name="rope")

_state_option: Optional[str] = None
_opened: Optional[str] = None  # the store this command opened, named by errors its later queries raise


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import PackageNotFoundError, version
        try:
            typer.echo(f"opskit {version('opskit')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("opskit (not installed: pip install -e .)")
        raise typer.Exit()


@app.callback()
def _global(state: Optional[str] = typer.Option(
        None, "--state", metavar="PATH",
        help="The run store. Default: $OPSKIT_STATE, else the nearest state.db in this folder or one above "
             "it, else ./state.db (created by launch and targets commands)."),
            _version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                          help="Print opskit's version and exit.")):
    global _state_option
    _state_option = state


def store_choice():
    from opskit.store_path import choose
    return choose(_state_option)


def state_path() -> str:
    return str(store_choice().path)


def store_exists() -> bool:
    """Whether the store a command would use exists (explicit paths: a missing one is an error later)."""
    choice = store_choice()
    return choice.path.exists() or choice.how != "default"


def open_store(create: bool = False):
    """The run store (opskit/store_path.py says which). `create`: a project's first launch or target
    command makes ./state.db; others refuse to create one. Says on stderr which store is used when it
    is not the one in this folder, and when one was created."""
    from opskit.store import Store
    from opskit.store_path import check_file
    global _opened
    choice = store_choice()
    check_file(choice, create)
    _opened = str(choice.path)
    store = Store(choice.path, create=create)
    if store.created:
        typer.echo(f"note: created the run store {choice.path}", err=True)
    elif choice.how == "found" and not choice.is_here:
        typer.echo(f"note: using the run store {choice.path}", err=True)
    for note in store.notes:
        typer.echo(f"note: {note}", err=True)
    return store


@contextmanager
def open_store_if_exists():
    """The store when one exists (report lists runs that were never pulled); None on a laptop without one."""
    if not store_choice().path.exists():
        yield None
        return
    with open_store() as store:
        yield store


def main() -> None:
    try:
        code = app(standalone_mode=False, prog_name="opskit")  # usage errors come here, for one line
    except OpsError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except ClickException as e:
        if isinstance(e, NoArgsIsHelpError):  # `opskit targets` alone: its help
            e.show()
            sys.exit(0)
        where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        typer.echo(f"error: {e.format_message()}{where}", err=True)
        sys.exit(e.exit_code)
    except sqlite3.Error as e:  # a store that breaks after it opened (a corrupt page, a full disk)
        from opskit.store_path import describe
        typer.echo(f"error: {describe(Path(_opened or state_path()), e)}", err=True)
        sys.exit(EXIT_ERROR)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # a bug or an unforeseen failure: one line, the traceback on request
        if os.environ.get("OPSKIT_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {e} (set OPSKIT_DEBUG=1 for the traceback)", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else 0)
