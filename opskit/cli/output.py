"""Output shared by the commands: one --json option and `emit` (JSON or a human rendering), rich
consoles and tables, and number formats."""
from __future__ import annotations

import json
import sys
import time
from typing import Callable

import typer

JSON = typer.Option(False, "--json", help="Machine-readable output: JSON on stdout, nothing else.")


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))


def print_json_lines(objects: list[str]) -> None:
    """A JSON list of already encoded objects, one per line: as readable as indented JSON, and fast
    for 100k rows (`status --json`: SQLite writes each object)."""
    sys.stdout.write(("[\n" + ",\n".join(objects) + "\n]" if objects else "[]") + "\n")


def emit(result, as_json: bool, human: Callable) -> None:
    """Print `result` as JSON, or hand it to `human` to render."""
    if as_json:
        print_json(result)
    else:
        human(result)


def for_humans(as_json: bool) -> Callable[[str], None]:
    """Progress lines for humans; none with --json (nothing may break its output)."""
    return (lambda _line: None) if as_json else typer.echo


def progress(as_json: bool) -> Callable[[str], None]:
    """Progress lines for humans: on stdout normally, on stderr with --json (stdout stays JSON)."""
    return (lambda line: typer.echo(line, err=True)) if as_json else typer.echo


def console():
    from rich.console import Console
    out = Console()
    if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
        out = Console(width=200)
    return out


def table(columns: list[str], rows: list[list[str]], left: tuple[str, ...] = (), **kwargs):
    """A rich Table; columns named in `left` are left-aligned, the others (numbers) right-aligned."""
    from rich.table import Table
    t = Table(header_style="bold", **kwargs)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    for row in rows:
        t.add_row(*row)
    return t


def fmt_num(x, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}{unit}"
    return f"{x:.0f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def fmt_duration(s) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_age(t) -> str:
    return "-" if not t else fmt_duration(max(0.0, time.time() - t)) + " ago"


def fmt_money(x) -> str:
    """An amount in the units of the targets' prices."""
    return "-" if x is None else f"{x:,.2f}"


def shown_url(url: str) -> str:
    """A notification URL as opskit prints it: scheme, host and path (a webhook's query can be a secret)."""
    from urllib.parse import urlsplit
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname or ''}{f':{u.port}' if u.port else ''}{u.path}" + ("?..." if u.query else "")


def key_values(d: dict, keys=None, width: int = 14) -> None:
    for k in keys or d:
        v = d.get(k)
        typer.echo(f"{k:>{width}}  {v if v is not None else '-'}")
