"""The Typer apps, the global --state option and the entry point that turns errors into one line."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Optional

import typer

from opskit.errors import OpsError

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Launch, watch and collect RoPE-spectrum training runs on local, SSH and SLURM targets.\n\n"
                       "Example: opskit launch demo --wait && opskit status && opskit pull")
targets_app = typer.Typer(no_args_is_help=True, help="Machines that run the trainer: local, ssh, slurm.")
matrix_app = typer.Typer(no_args_is_help=True, help="The experiment catalog (configs/*.yaml).")
runs_app = typer.Typer(no_args_is_help=True, help="One run in detail.")
rope_app = typer.Typer(no_args_is_help=True, help="RoPE spectra: check a config before spending GPU hours on it.")
app.add_typer(targets_app, name="targets")
app.add_typer(matrix_app, name="matrix")
app.add_typer(runs_app, name="runs")
app.add_typer(rope_app, name="rope")

_state_path: Optional[str] = None


@app.callback()
def _global(state: Optional[str] = typer.Option(None, "--state", envvar="OPSKIT_STATE",
                                                 help="Path of the run store (default ./state.db).")):
    global _state_path
    _state_path = state


def state_path() -> str:
    from opskit.store import DEFAULT_PATH
    return _state_path or DEFAULT_PATH


def open_store():
    from opskit.store import Store
    return Store(state_path())


@contextmanager
def open_store_if_exists():
    """The store when one exists (report lists runs that were never pulled); None on a laptop without one."""
    if not os.path.exists(state_path()):
        yield None
        return
    with open_store() as store:
        yield store


def main() -> None:
    try:
        app()
    except OpsError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # a bug or an unforeseen failure: one line, the traceback on request
        if os.environ.get("OPSKIT_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {e} (set OPSKIT_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
