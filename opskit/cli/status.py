"""`opskit status`: the runs' table (the default view stays the same size as history grows), its
per-phase counts, the watched boxes' idle time, and the live view shared with `launch --wait`."""
from __future__ import annotations

import time
from typing import List, Optional

import typer

from opskit.cli.app import app, open_store, store_exists
from opskit.cli.output import console, fmt_age, fmt_duration, fmt_money, fmt_num, print_json_lines

REASON_WIDTH = 60
SHOW_REASON = ("failed", "lost", "stalled", "cancelled")


@app.command()
def status(
    phase: Optional[List[str]] = typer.Option(None, "--phase", "-p", metavar="PHASE",
                                              help="Only these phases (repeatable or comma-separated)."),
    run_state: Optional[List[str]] = typer.Option(None, "--state", metavar="STATE",
                                                  help="Only runs in these states, e.g. failed,lost "
                                                       "(every such run, not only the latest)."),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t", metavar="TARGET", help="Only these targets."),
    since: Optional[str] = typer.Option(None, "--since", metavar="AGE|DATE",
                                        help="Only runs updated since then: 30m, 2h, 3d, 1w or 2025-05-01."),
    all_runs: bool = typer.Option(False, "--all", "-a", help="Every selected run, not only the unfinished ones "
                                                           "and the latest ended ones."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Redraw a live table until interrupted."),
    interval: float = typer.Option(2.0, "--interval", min=0.5, metavar="SECONDS", help="Seconds between redraws with --watch."),
    as_json: bool = typer.Option(False, "--json", help="Every selected run as a JSON list on stdout (not capped "
                                                       "like the table)."),
):
    """Runs: state, step, loss, tokens/s, ETA, cache growth, why a run failed; a count per phase.

    The table shows every unfinished run and the 20 that ended last, then one line per phase with its
    runs counted by state; --all, --state, --phase, --target and --since select.

    \b
    Example: opskit status
    Example: opskit status --phase demo --watch
    Example: opskit status --state failed,lost --since 1d
    """
    from opskit import operations
    from opskit.operations.selection import selection
    if not store_exists():  # a fresh project: nothing to show, and nothing is created by looking
        hint = "no run store here or in a folder above (no state.db): `opskit launch demo` creates ./state.db"
        if as_json:
            print_json_lines([])
        typer.echo(hint, err=as_json)
        return
    with open_store() as store:
        sel = selection(store, phase, run_state, target, since, all_runs)
        if watch:
            return _watch(store, sel, None, until_ended=False, interval=interval)
        notes: dict[str, list[str]] = {}
        health = operations.refresh(store, sel=sel, notes=notes)
        if as_json:  # every selected run; the table's caption lines go to stderr, stdout stays JSON
            print_json_lines(operations.status_json(store, sel))
            for line in caption_notes(health, notes):
                typer.echo(line, err=True)
            return
        view = operations.status_view(store, sel)
        boxes = operations.box_views(store)
    out = console()
    out.print(status_table(view["runs"], health, boxes, notes))
    for line in summary_lines(view):
        out.print(line, markup=False, highlight=False)


def caption_notes(health: dict, notes: dict | None) -> list[str]:
    """Targets that did not answer, and what the others said beside their runs (low disk, torn entries)."""
    return ([err if err.startswith(f"target {t}") else f"target {t}: {err}" for t, err in health.items() if err]
            + [f"target {t}: {note}" for t, lines in (notes or {}).items() for note in lines])


def status_table(rows: list[dict], health: dict, boxes: list[dict] = (), notes: dict | None = None):
    from rich.table import Table

    from opskit import states as S
    table = Table(title=None, show_lines=False, header_style="bold")
    right = ("try", "step", "loss", "tok/s last", "GPU", "ETA", "cache")
    for col in ("run", "target", "try", "state", "step", "loss", "tok/s last", "GPU", "ETA", "cache", "heartbeat",
                "why"):
        table.add_column(col, justify="right" if col in right else "left",
                         overflow="fold" if col == "why" else "ellipsis", max_width=REASON_WIDTH if col == "why" else None)
    colours = {S.DONE: "green", S.FAILED: "red", S.LOST: "red", S.STALLED: "yellow", S.CANCELLED: "magenta",
               S.TRAINING: "cyan", S.TOKENIZING: "blue", S.EVALUATING: "blue"}
    for r in rows:
        state = r["state"] + (" (stale)" if r["stale"] else "")
        if r["state"] == S.QUEUED and r.get("queue_pos"):  # position in the target's queue, estimated start
            state += f" #{r['queue_pos']}" + (f" (starts ~{fmt_duration(r['starts_in_s'])})"
                                              if r.get("starts_in_s") is not None else "")
        c = colours.get(r["state"], "white")
        step = f"{r['step'] or 0}/{r['total_steps']}" if r["total_steps"] else (str(r["step"]) if r["step"] else "-")
        cache = fmt_num(r["cache_bytes"], "B") if r["cache_bytes"] else "-"
        table.add_row(r["run"], r["target"], str(r["attempt"]), f"[{c}]{state}[/{c}]", step,
                      f"{r['loss']:.3f}" if r["loss"] is not None else "-", fmt_num(r["tokens_per_s"]),
                      f"{r['gpu_util']:.0f}%" if r.get("gpu_util") is not None and r["state"] in S.ACTIVE else "-",
                      fmt_duration(r["eta_s"]) if r["state"] not in S.ENDED else "-",
                      cache, fmt_age(r["heartbeat_at"]), short_reason(r))
    caption = caption_notes(health, notes)
    caption += [box_line(b) for b in boxes]
    if not rows:
        caption.append("no runs yet: try `opskit launch demo`")
    table.caption = "\n".join(caption) or None
    return table


def box_line(b: dict) -> str:
    """One watched box for status: idle for how long and what that cost, and its idle action."""
    if b.get("error"):
        return f"target {b['target']}: box not read ({b['error']})"
    if b.get("idle_since"):
        line = f"target {b['target']}: idle {fmt_duration(b['idle_now_s'])}"
        if b.get("idle_now_cost") is not None:
            line += f", cost {fmt_money(b['idle_now_cost'])} idle at {fmt_money(b['price_per_hour'])}/h"
    else:
        line = f"target {b['target']}: " + ("busy" if b.get("supervisor_alive") else "not watched now")
    from opskit import ledger as L
    act = b.get("idle_action") or {}
    if act.get("phase") == L.ACTION_WAITING_FOR_PULL:
        line += f"; idle action waits for `opskit pull` of {', '.join(act.get('unpulled') or [])}"
    elif act.get("phase") == L.ACTION_IDLE and act.get("fires_at"):
        line += f"; idle action `{act['cmd']}` at {time.strftime('%H:%M', time.localtime(act['fires_at']))}"
    elif act.get("phase") in (L.ACTION_RUNNING, L.ACTION_RAN):
        out = (act.get("output") or "").strip().splitlines()
        line += (f"; idle action `{act['cmd']}` ran {time.strftime('%m-%d %H:%M', time.localtime(act['ran_at']))}"
                 + (f", exit {act['exit_code']}" if act.get("phase") == L.ACTION_RAN else " (running)")
                 + (f": {out[-1][:120]}" if out else ""))
    return line


def short_reason(row: dict) -> str:
    """Why a run failed, was lost, stalled or was cancelled (the state's reason), on one short line."""
    if row["state"] not in SHOW_REASON or not row.get("reason"):
        return ""
    text = " ".join(str(row["reason"]).split())
    return text if len(text) <= REASON_WIDTH else text[:REASON_WIDTH - 1] + "…"


def summary_lines(view: dict) -> list[str]:
    """One line per phase (its runs counted by state), then what the table left out."""
    lines = [f"{phase}: " + ", ".join(f"{n} {state}" for state, n in sorted(per_state.items(), key=lambda kv: -kv[1]))
             for phase, per_state in view["counts"].items()]
    if view["hidden"]:
        lines.append(f"showing {view['total'] - view['hidden']} of {view['total']} runs (the unfinished ones and "
                     f"the latest ended); --all shows every run, --state/--phase/--target/--since select")
    return lines


def watch_runs(runs: list[str], interval: float = 2.0) -> None:
    """`launch --wait`: a live table of these runs until every one has ended (Ctrl-C leaves them running)."""
    from opskit.operations.selection import Selection
    with open_store() as store:
        _watch(store, Selection(all=True), runs, until_ended=True, interval=interval)


def _watch(store, sel, runs: list[str] | None, until_ended: bool, interval: float = 2.0) -> None:
    from rich.live import Live

    from opskit import operations, states
    out = console()
    try:
        with Live(refresh_per_second=4, console=out) as live:
            while True:
                notes: dict[str, list[str]] = {}
                health = operations.refresh(store, runs=runs, sel=sel, notes=notes)
                rows = operations.status_of(store, runs) if runs else operations.status_view(store, sel)["runs"]
                live.update(status_table(rows, health, notes=notes))
                if until_ended and all(r["state"] in states.ENDED for r in rows):
                    return
                time.sleep(interval)
    except KeyboardInterrupt:
        if until_ended:  # the runs are detached on their targets: leaving the view stops nothing
            names = runs or []
            hint = "opskit status --watch" + (f" --phase {names[0].split('/')[0]}" if names else "")
            out.print(f"stopped watching; the runs go on. Watch again: {hint} · one run's log: "
                      f"opskit logs {names[0] if names else 'RUN'} --follow", markup=False, highlight=False)
            raise typer.Exit(130)
        return
