"""Commands on runs: launch, status, logs, cancel, resume, pull, runs show, queue, export."""
from __future__ import annotations

import sys
import time
from typing import List, Optional

import typer

from opskit.cli.app import app, open_store, runs_app, store_exists
from opskit.cli.output import JSON, console, emit, fmt_age, fmt_duration, fmt_money, fmt_num, for_humans
from opskit.errors import Incomplete, OpsError


@app.command()
def launch(
    phase: str = typer.Argument(..., help="Phase from the catalog, e.g. demo, p0, p1."),
    config: Optional[List[str]] = typer.Option(None, "--config", "-c", help="Only these configs (repeatable)."),
    seed: Optional[List[int]] = typer.Option(None, "--seed", "-s", help="Only these seeds (repeatable)."),
    target: str = typer.Option("local", "--target", "-t", help="Target name (opskit targets list)."),
    matrix: Optional[str] = typer.Option(None, "--matrix", "-m", help="Matrix name or YAML file."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the runs, specs and commands; start nothing."),
    rerun: bool = typer.Option(False, "--rerun", help="Start done/failed runs again from scratch."),
    wait: bool = typer.Option(False, "--wait", help="Show live status until every launched run has ended."),
    after: Optional[List[str]] = typer.Option(None, "--after", help="Start only once this run is done (repeatable)."),
    tracker: Optional[List[str]] = typer.Option(None, "--tracker", metavar="tensorboard|wandb|mlflow:URI",
                                                help="Also log to this tracker (repeatable; docs/trackers.md)."),
    force: bool = typer.Option(False, "--force", help="Launch even when the runs' estimated checkpoints and "
                                                      "token cache do not fit on the target's free disk."),
    as_json: bool = JSON,
):
    """Expand a phase into runs and queue them on a target (each starts detached as GPUs free up).

    Example: opskit launch demo --config hybrid_a0.2_t100k --seed 42
    """
    from opskit import operations
    out = console()
    with open_store(create=True) as store:
        result = operations.launch(store, phase, config, seed, target, matrix, rerun, dry_run,
                                   on_event=lambda m: out.print(f"[dim]{m}[/dim]") if not as_json else None,
                                   after=after, trackers=tracker, force=force)
    emit(result, as_json, lambda rows: _print_launch(out, rows, dry_run))
    started = [r["run"] for r in result if r.get("started") or r.get("queued")]
    if wait and not dry_run and started:
        _watch(phase=None, runs=started, until_ended=True)
    refused = [r["run"] for r in result if not (r.get("started") or r.get("queued"))]
    if refused and not dry_run:
        raise Incomplete(f"{len(refused)} of {len(result)} runs not launched (see above)" if started
                         else f"nothing launched: {len(refused)} run(s) refused (see above)")


def _print_launch(out, rows: list[dict], dry_run: bool) -> None:
    for r in rows:
        if dry_run:
            mark = "would start" if r["start"] else "refused"
            out.print(f"{mark}: [bold]{r['run']}[/bold] on {r['target']} ({r['reason']})")
            out.print(f"  command: {' '.join(r['command'])}", markup=False)
            if r.get("sbatch"):
                out.print(r["sbatch"], markup=False)
        elif r.get("queued"):
            out.print(f"[green]queued[/green] {r['run']} on {r['target']} at position {r['position']}")
        elif r.get("started"):
            out.print(f"[green]started[/green] {r['run']} (attempt {r['attempt']}, pid {r.get('pid') or r.get('job_id')})")
        else:
            out.print(f"[yellow]not started[/yellow] {r['run']}: {r['reason']}")


@app.command()
def status(
    phase: Optional[str] = typer.Option(None, "--phase", "-p", help="Only this phase."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Redraw a live table until interrupted."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between redraws with --watch."),
    as_json: bool = JSON,
):
    """Every run: state, step, loss, tokens/s, ETA, cache growth, stalls, deaths.

    Example: opskit status --phase demo --watch
    """
    from opskit import operations
    if not store_exists():  # a fresh project: nothing to show, and nothing is created by looking
        hint = "no run store here or in a folder above (no state.db): `opskit launch demo` creates ./state.db"
        emit([], as_json, lambda _: typer.echo(hint))
        if as_json:
            typer.echo(hint, err=True)
        return
    if watch:
        return _watch(phase, None, until_ended=False, interval=interval)
    with open_store() as store:
        notes: dict[str, list[str]] = {}
        health = operations.refresh(store, phase=phase, notes=notes)
        rows = operations.status_rows(store, phase)
        boxes = [] if as_json else operations.box_views(store)
    emit(rows, as_json, lambda rows: console().print(_status_table(rows, health, boxes, notes)))
    if as_json:  # the table's caption lines, where a script's stdout stays JSON
        for line in _caption_notes(health, notes):
            typer.echo(line, err=True)


def _caption_notes(health: dict, notes: dict | None) -> list[str]:
    return ([f"target {t} unreachable: {err}" for t, err in health.items() if err]
            + [f"target {t}: {note}" for t, lines in (notes or {}).items() for note in lines])


def _status_table(rows: list[dict], health: dict, boxes: list[dict] = (), notes: dict | None = None):
    from rich.table import Table

    from opskit import states as S
    table = Table(title=None, show_lines=False, header_style="bold")
    for col in ("run", "target", "try", "state", "step", "loss", "tok/s", "GPU", "ETA", "cache", "heartbeat"):
        table.add_column(col, justify="right" if col in ("try", "step", "loss", "tok/s", "GPU", "ETA", "cache") else "left")
    colours = {S.DONE: "green", S.FAILED: "red", S.LOST: "red", S.STALLED: "yellow", S.CANCELLED: "magenta",
               S.TRAINING: "cyan", S.TOKENIZING: "blue", S.EVALUATING: "blue"}
    for r in rows:
        state = r["state"] + (" (stale)" if r["stale"] else "")
        if r["state"] == S.QUEUED and r.get("queue_pos"):  # position in the target's queue, estimated start
            state += f" #{r['queue_pos']}" + (f" (starts ~{fmt_duration(r['starts_in_s'])})"
                                              if r.get("starts_in_s") is not None else "")
        c = colours.get(r["state"], "white")
        step = f"{r['step']}/{r['total_steps']}" if r["total_steps"] else (str(r["step"]) if r["step"] else "-")
        cache = fmt_num(r["cache_bytes"], "B") if r["cache_bytes"] else "-"
        table.add_row(r["run"], r["target"], str(r["attempt"]), f"[{c}]{state}[/{c}]", step,
                      f"{r['loss']:.3f}" if r["loss"] is not None else "-", fmt_num(r["tokens_per_s"]),
                      f"{r['gpu_util']:.0f}%" if r.get("gpu_util") is not None and r["state"] in S.ACTIVE else "-",
                      fmt_duration(r["eta_s"]) if r["state"] not in S.ENDED else "-",
                      cache, fmt_age(r["heartbeat_at"]))
    caption = _caption_notes(health, notes)
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


def _watch(phase, runs, until_ended: bool, interval: float = 2.0) -> None:
    from rich.live import Live

    from opskit import operations, states
    with open_store() as store, Live(refresh_per_second=4, console=console()) as live:
        try:
            while True:
                notes: dict[str, list[str]] = {}
                health = operations.refresh(store, phase=phase, runs=runs, notes=notes)
                rows = [r for r in operations.status_rows(store, phase) if not runs or r["run"] in runs]
                live.update(_status_table(rows, health, notes=notes))
                if until_ended and all(r["state"] in states.ENDED for r in rows):
                    return
                time.sleep(interval)
        except KeyboardInterrupt:
            return


@app.command()
def logs(
    run: str = typer.Argument(..., help="Run name <phase>/<config>/s<seed>."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing as the log grows."),
    lines: int = typer.Option(50, "--lines", "-n", help="How many last lines to show first."),
):
    """Show a run's log (run.log on its target).

    Example: opskit logs demo/hybrid_a0.2_t100k/s42 --follow
    """
    from opskit import operations
    with open_store() as store:
        try:
            for chunk in operations.logs(store, run, lines, follow):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


CANCEL_OUTCOMES = {"removed-from-queue": "removed from the queue", "killed": "killed (no checkpoint)",
                   "signalled": "signalled: it saves a checkpoint and stops",
                   "cancelled-before-start": "cancelled before it started",
                   "not-running": "not running, nothing to signal (`opskit status` shows how it ended)"}


@app.command()
def cancel(runs: List[str] = typer.Argument(..., help="Run names."),
           now: bool = typer.Option(False, "--now", help="SIGKILL at once, no checkpoint (a hung run)."),
           as_json: bool = JSON):
    """Stop runs: the trainer saves a checkpoint and exits (resume continues it).

    Example: opskit cancel demo/geo_500k/s42
    Example: opskit cancel demo/geo_500k/s42 --now    # hung: kill it; resume starts from the last checkpoint
    """
    from opskit import operations
    with open_store() as store:
        result = operations.cancel(store, runs, now=now)
    emit(result, as_json, _print_cancelled)


def _print_cancelled(rows: list[dict]) -> None:
    for r in rows:
        typer.echo(f"{r['run']}: " + CANCEL_OUTCOMES.get(r["outcome"], f"not cancelled ({r.get('reason')})"))


@app.command()
def resume(run: str = typer.Argument(..., help="Run name."),
           target: Optional[str] = typer.Option(None, "--target", "-t", help="Resume on this target."),
           as_json: bool = JSON):
    """Restart a failed, lost, cancelled or stalled run from its last checkpoint, as a new attempt.

    Example: opskit resume demo/geo_500k/s42
    """
    from opskit import operations
    with open_store() as store:
        result = operations.resume(store, run, target, on_event=for_humans(as_json))
    if not (result.get("started") or result.get("queued")):
        raise OpsError(f"could not resume {run}: {result['reason']}")
    how = f"queued at position {result['position']}" if result.get("queued") else "started"
    emit(result, as_json, lambda r: typer.echo(f"resumed {run} as attempt {r['attempt']} ({how})"))


@app.command()
def pull(runs: Optional[List[str]] = typer.Argument(None, help="Run names (default: every run)."),
         results_dir: str = typer.Option("results", "--results-dir", help="Where raw/ goes."),
         as_json: bool = JSON):
    """Bring back non-weight artifacts (results, loss curve, eval, logs) into results/raw/.

    Example: opskit pull demo/geo_500k/s42
    """
    from opskit import operations
    with open_store() as store:
        result = operations.pull(store, runs, results_dir, on_event=for_humans(as_json))
    emit(result, as_json, lambda rows: [typer.echo(f"{r['run']}: not pulled ({r['error']})", err=True)
                                        for r in rows if r.get("error")])
    missed = [r["run"] for r in result if r.get("error")]
    if missed:
        raise Incomplete(f"{len(missed)} of {len(result)} runs not pulled: {', '.join(missed[:5])}"
                         + (", ..." if len(missed) > 5 else ""))


@runs_app.command("show")
def runs_show(run: str = typer.Argument(...), as_json: bool = JSON):
    """A run's record, its state history and pulled artifacts.

    Example: opskit runs show demo/geo_500k/s42
    """
    from opskit import operations
    with open_store() as store:
        d = operations.run_details(store, run)
    emit(d, as_json, _print_run)


def _print_run(d: dict) -> None:
    out = console()
    for k in ("name", "matrix", "target", "attempt", "state", "step", "total_steps", "loss", "tokens_per_s",
              "eta_s", "cache_bytes", "exit_code", "pid", "job_id", "run_dir", "message"):
        out.print(f"[bold]{k:>12}[/bold]  {d.get(k) if d.get(k) is not None else '-'}")
    out.print("[bold]history[/bold]")
    for e in d["events"]:
        out.print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['time']))}  attempt {e['attempt']}  "
                  f"{e['from_state'] or '-'} -> {e['to_state']}  {e['reason']}")
    if d["artifacts"]:
        out.print("[bold]pulled[/bold]  " + ", ".join(a["path"] for a in d["artifacts"]))
    code = d.get("code")
    if code:
        tree = "a dirty tree (its changes are in code.diff)" if code["dirty"] else "a clean tree"
        out.print(f"[bold]code[/bold]  launched from {tree} at commit {code['commit'] or '?'}")


@app.command()
def queue(
    words: Optional[List[str]] = typer.Argument(None, metavar="[TARGET] | move RUN --top",
                                                help="A target name (default: every target), or `move RUN`."),
    top: bool = typer.Option(False, "--top", help="With `move RUN`: put the run first in its queue."),
    as_json: bool = JSON,
):
    """Each target's queue: what runs on which GPUs, and what waits, in order (SLURM: its own queue).

    Example: opskit queue box1
    Example: opskit queue move p1/geo_500k/s42 --top
    """
    from opskit import operations
    words = words or []
    if words and words[0] == "move":
        if len(words) != 2 or not top:
            raise OpsError("usage: opskit queue move RUN --top")
        with open_store() as store:
            result = operations.queue_move_top(store, words[1])
        return emit(result, as_json, lambda r: typer.echo(f"{r['run']} is now #{r['position']}"))
    if len(words) > 1:
        raise OpsError("usage: opskit queue [TARGET] or opskit queue move RUN --top")
    with open_store() as store:
        result = operations.queue_view(store, words[0] if words else None)
    emit(result, as_json, _print_queues)


def _print_queues(queues: list[dict]) -> None:
    for q in queues:
        if q.get("error"):
            typer.echo(f"{q['target']}: unreachable ({q['error']})")
            continue
        sup = q.get("supervisor") or {}
        gpus = (q.get("config") or {}).get("gpus")
        typer.echo(f"{q['target']} ({q['kind']}, {gpus or 'no'} GPUs"
                   + (f", supervisor pid {sup['pid']})" if sup.get("alive") else ", supervisor idle)"))
        for r in q.get("running", []):
            where = f"GPUs {r['cuda_visible_devices']}" if r.get("cuda_visible_devices") else "CPU"
            what = "running " if r.get("pid") else "starting"  # no pid yet: being started (or recovered)
            typer.echo(f"  {what} {r['run']}  {where}  port {r.get('port') or '-'}  since {fmt_age(r.get('started_at'))}")
        for r in q.get("pending", []):  # `waiting` names the --after run it waits for, if any
            typer.echo(f"  #{r['position']:<6} {r['run']}  {r.get('units', '?')} GPU(s)  {r['waiting']}")
        if not q.get("running") and not q.get("pending"):
            typer.echo("  (empty)")
        if q.get("config_error"):
            typer.echo(f"  warning: {q['config_error']}")
        for b in q.get("broken") or []:
            typer.echo(f"  torn entry {b['file']} ({b['error']}; run {b.get('run') or 'unreadable'}): "
                       f"moved to queue/{b['moved_to']}; launch its run again, then delete the file")


@app.command("export")
def export(run: str = typer.Argument(..., help="Run name, e.g. p1/geo_500k/s42."),
           hf: str = typer.Option(..., "--hf", help="Directory to write the Hugging Face checkpoint into."),
           step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: the newest)."),
           dtype: str = typer.Option("fp32", "--dtype", help="Weights on disk: fp32 or bf16.")):
    """Write a trained run as a Hugging Face Llama checkpoint + tokenizer (runs where its checkpoint is).

    Example: opskit export p1/geo_500k/s42 --hf exports/geo_500k_s42
    """
    from opskit import operations
    with open_store() as store:
        operations.export_run(store, run, hf, step, dtype)
