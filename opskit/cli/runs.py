"""Commands on runs: launch, logs, cancel, resume, pull, runs show, queue, export (status: status.py)."""
from __future__ import annotations

import sys
import time
from typing import List, Optional

import typer

from opskit.cli.app import app, open_store, runs_app
from opskit.cli.output import JSON, console, emit, fmt_age, fmt_num, for_humans
from opskit.cli.status import watch_runs
from opskit.errors import EXIT_UNREACHABLE, Incomplete, OpsError


@app.command()
def launch(
    phase: str = typer.Argument(..., help="Phase from the catalog, e.g. demo, p0, p1.", metavar="PHASE"),
    config: Optional[List[str]] = typer.Option(None, "--config", "-c", metavar="CONFIG",
                                               help="Only these configs (repeatable)."),
    seed: Optional[List[int]] = typer.Option(None, "--seed", "-s", metavar="SEED", help="Only these seeds (repeatable)."),
    target: str = typer.Option("local", "--target", "-t", help="Target name (opskit targets list).", metavar="TARGET"),
    matrix: Optional[str] = typer.Option(None, "--matrix", "-m", help="Matrix name or YAML file.", metavar="MATRIX"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what each run needs and the command; start nothing."),
    rerun: bool = typer.Option(False, "--rerun", help="Start done/failed runs again from scratch."),
    force: bool = typer.Option(False, "--force", help="Launch runs the target cannot run well (no GPUs for a large "
                                                      "preset, bf16 on a CPU, an unreachable hub, checkpoints and "
                                                      "token cache that do not fit its free disk) anyway."),
    wait: bool = typer.Option(False, "--wait", help="Show live status until every launched run has ended."),
    after: Optional[List[str]] = typer.Option(None, "--after", metavar="RUN",
                                              help="Start only once this run is done (repeatable)."),
    tracker: Optional[List[str]] = typer.Option(None, "--tracker", metavar="tensorboard|wandb|mlflow:URI",
                                                help="Also log to this tracker (repeatable; docs/trackers.md)."),
    as_json: bool = JSON,
):
    """Expand a phase into runs and queue them on a target (each starts detached as GPUs free up).

    Each run is checked against its target first (GPUs, memory, dtype, data) and refused in one line
    if it cannot run there. Exits 3 when a run was not launched (refused, e.g. already done).

    \b
    Example: opskit launch demo --config hybrid_a0.2_t100k --seed 123
    Example: opskit launch p0 --target box1 --dry-run
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
        watch_runs(started)
    refused = [r["run"] for r in result if not (r.get("started") or r.get("queued"))]
    if refused and not dry_run:
        raise Incomplete(f"{len(refused)} of {len(result)} runs not launched (see above)" if started
                         else f"nothing launched: {len(refused)} run(s) refused (see above)")


def _print_launch(out, rows: list[dict], dry_run: bool) -> None:
    for r in rows:
        if dry_run:
            mark = "refused" if not r["start"] else "would refuse" if r["problems"] else "would start"
            out.print(f"{mark}: [bold]{r['run']}[/bold] on {r['target']} ({r['reason']})")
            out.print(f"  {needs_line(r['needs'])}", markup=False, highlight=False)
            if r["start"] and r["problems"]:
                out.print(f"  [yellow]cannot run there:[/yellow] {'; '.join(r['problems'])} (--force launches it anyway)")
            out.print(f"  command: {' '.join(r['command'])}", markup=False)
            if r.get("sbatch"):
                out.print(r["sbatch"], markup=False)
        elif r.get("queued"):
            out.print(f"[green]queued[/green] {r['run']} on {r['target']} at position {r['position']}")
        elif r.get("started"):
            out.print(f"[green]started[/green] {r['run']} (attempt {r['attempt']}, pid {r.get('pid') or r.get('job_id')})")
        else:
            out.print(f"[yellow]not started[/yellow] {r['run']}: {r['reason']}")


def needs_line(n: dict) -> str:
    """preset (parameters), tokens, steps, dtype, data, GPUs and GPU-hours of one planned run."""
    data = "+".join(n["data"]) or "-"
    gpus = f"{n['gpus']} GPU{'s' if n['gpus'] != 1 else ''}" if n["gpus"] else "CPU"
    if n["kind"] == "downstream":
        return f"downstream evaluation, {gpus}, {n['dtype']}"
    return (f"preset {n['preset']} ({n['params'] / 1e6:,.1f}M params), {fmt_num(n['tokens'])} tokens, {n['steps']:,} steps, "
            f"{n['dtype']}, data {data}, tokenizer {n['tokenizer']}, {gpus}, ~{n['memory_gb']:g} GB per "
            f"{'GPU' if n['gpus'] else 'process'}, ~{n['gpu_hours']:,.1f} GPU-hours (H100 bf16 at 40% MFU)")


@app.command()
def logs(
    run: str = typer.Argument(..., help="Run name <phase>/<config>/s<seed>.", metavar="RUN"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing as the log grows."),
    lines: int = typer.Option(50, "--lines", "-n", min=0, help="How many last lines to show first.", metavar="N"),
):
    """Show a run's log (run.log on its target).

    \b
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
def cancel(runs: List[str] = typer.Argument(..., help="Run names.", metavar="RUN..."),
           now: bool = typer.Option(False, "--now", help="SIGKILL at once, no checkpoint (a hung run)."),
           as_json: bool = JSON):
    """Stop runs: the trainer saves a checkpoint and exits (resume continues it).

    \b
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
def resume(run: str = typer.Argument(..., help="Run name.", metavar="RUN"),
           target: Optional[str] = typer.Option(None, "--target", "-t", help="Resume on this target.", metavar="TARGET"),
           as_json: bool = JSON):
    """Restart a failed, lost, cancelled or stalled run from its last checkpoint, as a new attempt.

    \b
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
def pull(runs: Optional[List[str]] = typer.Argument(None, help="Run names (default: every run).", metavar="RUN..."),
         results_dir: str = typer.Option("results", "--results-dir", help="Where raw/ goes.", metavar="DIR"),
         as_json: bool = JSON):
    """Bring back non-weight artifacts (results, loss curve, eval, logs) into results/raw/.

    \b
    Example: opskit pull demo/geo_500k/s42
    """
    from opskit import operations
    with open_store() as store:
        result = operations.pull(store, runs, results_dir, on_event=for_humans(as_json))
    emit(result, as_json, _print_pulled)
    missed = [r["run"] for r in result if r.get("error")]
    if missed:
        raise Incomplete(f"{len(missed)} of {len(result)} runs not pulled: {', '.join(missed[:5])}"
                         + (", ..." if len(missed) > 5 else ""))


def _print_pulled(rows: list[dict]) -> None:
    """What came (each run's line was printed as it came), what failed, and say so when nothing did."""
    for r in rows:
        if r.get("error"):
            typer.echo(f"{r['run']}: not pulled ({r['error']})", err=True)
    new = sum(r.get("pulled", 0) + len(r.get("removed") or []) for r in rows)
    if not new and not any(r.get("error") for r in rows):
        typer.echo(f"nothing new to pull: {len(rows)} run{'s' if len(rows) != 1 else ''} up to date" if rows
                   else "no runs to pull yet: try `opskit launch demo`")


@runs_app.command("show")
def runs_show(run: str = typer.Argument(..., metavar="RUN"), as_json: bool = JSON):
    """A run's record, its state history and pulled artifacts.

    \b
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

    \b
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
    if any(q.get("error") for q in result):  # a target that did not answer is a failure, not an empty queue
        raise typer.Exit(EXIT_UNREACHABLE)


def _print_queues(queues: list[dict]) -> None:
    for q in queues:
        if q.get("error"):
            typer.echo(f"error: {q['error']}", err=True)
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
def export(run: str = typer.Argument(..., help="Run name, e.g. p1/geo_500k/s42.", metavar="RUN"),
           hf: str = typer.Option(..., "--hf", help="Directory to write the Hugging Face checkpoint into.", metavar="DIR"),
           step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: the newest).", metavar="STEP"),
           dtype: str = typer.Option("fp32", "--dtype", help="Weights on disk: fp32 or bf16.", metavar="fp32|bf16")):
    """Write a trained run as a Hugging Face Llama checkpoint + tokenizer (runs where its checkpoint is).

    \b
    Example: opskit export p1/geo_500k/s42 --hf exports/geo_500k_s42
    """
    from opskit import operations
    with open_store() as store:
        operations.export_run(store, run, hf, step, dtype)
