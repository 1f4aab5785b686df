"""`opskit cost`: what runs, configs, phases and targets cost (docs/cost-and-notifications.md)."""
from __future__ import annotations

from typing import Optional

import typer

from opskit.cli.app import app, open_store
from opskit.cli.output import JSON, console, emit, fmt_duration, fmt_money, table


@app.command()
def cost(phase: Optional[str] = typer.Option(None, "--phase", "-p", help="Only this phase's runs.", metavar="PHASE"),
         target: Optional[str] = typer.Option(None, "--target", "-t", help="Only this target.", metavar="TARGET"),
         as_json: bool = JSON):
    """What each run, config, phase and target cost: busy time from the boxes' own ledgers x the price.

    A run's cost is its share of the box's GPUs x the time it was active; a target's, the hours it was
    held, busy and idle (SLURM: its jobs' elapsed time x GPUs). Prices come from `targets add
    --price-per-hour`; a run that never started costs nothing.

    Example: opskit cost --phase p1
    """
    from opskit import operations
    with open_store() as store:
        result = operations.cost(store, phase, target)
    emit(result, as_json, _print_cost)


def _hours(s) -> str:
    return "-" if s is None else f"{s / 3600:.2f}"


def _print_cost(r: dict) -> None:
    out = console()
    if r["runs"]:
        out.print(table(["run", "target", "state", "busy", "cost"],
                        [[x["run"], x["target"], x["state"], fmt_duration(x["busy_s"]) if x["busy_s"] else "-",
                          fmt_money(x["cost"])] for x in r["runs"]], left=("run", "target", "state"), title="runs"))
        out.print(table(["phase", "config", "runs", "busy h", "cost"],
                        [[x["phase"], x["config"], str(x["runs"]), _hours(x["busy_s"]), fmt_money(x["cost"])]
                         for x in r["configs"]], left=("phase", "config"), title="configs"))
    rows = []
    for t in r["targets"]:
        rows.append([t["target"], t["kind"], fmt_money(t["price_per_hour"]), _hours(t["held_s"]), _hours(t["busy_s"]),
                     _hours(t["idle_s"]), fmt_money(t["held_cost"]), fmt_money(t["busy_cost"]), fmt_money(t["idle_cost"]),
                     f"unreachable: {t['error']}" if t["error"] else _idle_now(t)])
    if rows:
        out.print(table(["target", "kind", "price/h", "held h", "busy h", "idle h", "held", "busy", "idle", "now"],
                        rows, left=("target", "kind", "now"), title="targets"))
    out.print(f"total held: {fmt_money(r['total'])}" if r["total"] is not None
              else "no target has a price: opskit targets add NAME ... --price-per-hour X --replace")


def _idle_now(t: dict) -> str:
    if t.get("idle_since"):
        return f"idle {fmt_duration(t['idle_now_s'])} (cost {fmt_money(t['idle_now_cost'])})"
    return "busy" if t.get("supervisor_alive") else "-"
