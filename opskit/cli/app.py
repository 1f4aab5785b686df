"""The Typer apps, the global --state option and the entry point that turns errors into one line."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Optional

import typer

from opskit.errors import OpsError

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

_state_path: Optional[str] = None


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import PackageNotFoundError, version
        try:
            typer.echo(f"opskit {version('opskit')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("opskit (not installed: pip install -e .)")
        raise typer.Exit()


@app.callback()
def _global(state: Optional[str] = typer.Option(None, "--state", envvar="OPSKIT_STATE",
                                                 help="Path of the run store (default ./state.db).", metavar="PATH"),
            _version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                          help="Print opskit's version and exit.")):
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
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except Exception as e:  # a bug or an unforeseen failure: one line, the traceback on request
        if os.environ.get("OPSKIT_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {e} (set OPSKIT_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
