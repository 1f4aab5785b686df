"""The `opskit` command line: parse, call one function, print. Nothing else lives here.

Heavy modules (the store, the catalog, targets) are imported inside the commands so that
`opskit --help` starts fast; torch is never imported by the control plane.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Optional

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


def _store():
    from opskit.store import DEFAULT_PATH, Store
    return Store(_state_path or DEFAULT_PATH)


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))


def _console():
    from rich.console import Console
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
        console = Console(width=200)
    return console


def _quiet_if(as_json: bool):
    """Progress lines for humans; nothing that would break --json output."""
    return (lambda _m: None) if as_json else typer.echo


def _fmt_num(x, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}{unit}"
    return f"{x:.0f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def _fmt_duration(s) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_age(t) -> str:
    return "-" if not t else _fmt_duration(max(0.0, time.time() - t)) + " ago"


# ====================================================================== runs


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
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Expand a phase into runs and queue them on a target (each starts detached as GPUs free up).

    Example: opskit launch demo --config hybrid_a0.2_t100k --seed 42
    """
    from opskit import operations
    console = _console()
    with _store() as store:
        result = operations.launch(store, phase, config, seed, target, matrix, rerun, dry_run,
                                   on_event=lambda m: console.print(f"[dim]{m}[/dim]") if not as_json else None,
                                   after=after)
    if as_json:
        return _print_json(result)
    for r in result:
        if dry_run:
            mark = "would start" if r["start"] else "refused"
            console.print(f"{mark}: [bold]{r['run']}[/bold] on {r['target']} ({r['reason']})")
            console.print(f"  command: {' '.join(r['command'])}", markup=False)
            if r.get("sbatch"):
                console.print(r["sbatch"], markup=False)
        elif r.get("queued"):
            console.print(f"[green]queued[/green] {r['run']} on {r['target']} at position {r['position']}")
        elif r.get("started"):
            console.print(f"[green]started[/green] {r['run']} (attempt {r['attempt']}, pid {r.get('pid') or r.get('job_id')})")
        else:
            console.print(f"[yellow]not started[/yellow] {r['run']}: {r['reason']}")
    if wait and not dry_run:
        started = [r["run"] for r in result if r.get("started") or r.get("queued")]
        if started:
            _watch(phase=None, runs=started, until_ended=True)


@app.command()
def status(
    phase: Optional[str] = typer.Option(None, "--phase", "-p", help="Only this phase."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Redraw a live table until interrupted."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between redraws with --watch."),
    as_json: bool = typer.Option(False, "--json", help="A JSON list of run objects."),
):
    """Every run: state, step, loss, tokens/s, ETA, cache growth, stalls, deaths.

    Example: opskit status --phase demo --watch
    """
    from opskit import operations
    if watch:
        return _watch(phase, None, until_ended=False, interval=interval)
    with _store() as store:
        health = operations.refresh(store, phase=phase)
        rows = operations.status_rows(store, phase)
    if as_json:
        return _print_json(rows)
    console = _console()
    console.print(_status_table(rows, health))


def _status_table(rows: list[dict], health: dict):
    from rich.table import Table

    from opskit.states import ENDED
    table = Table(title=None, show_lines=False, header_style="bold")
    for col in ("run", "target", "try", "state", "step", "loss", "tok/s", "ETA", "cache", "heartbeat"):
        table.add_column(col, justify="right" if col in ("try", "step", "loss", "tok/s", "ETA", "cache") else "left")
    colours = {"done": "green", "failed": "red", "lost": "red", "stalled": "yellow", "cancelled": "magenta",
               "training": "cyan", "tokenizing": "blue", "evaluating": "blue"}
    for r in rows:
        state = r["state"] + (" (stale)" if r["stale"] else "")
        if r["state"] == "queued" and r.get("queue_pos"):  # position in the target's queue, estimated start
            state += f" #{r['queue_pos']}" + (f" (starts ~{_fmt_duration(r['starts_in_s'])})"
                                              if r.get("starts_in_s") is not None else "")
        c = colours.get(r["state"], "white")
        step = f"{r['step']}/{r['total_steps']}" if r["total_steps"] else (str(r["step"]) if r["step"] else "-")
        cache = _fmt_num(r["cache_bytes"], "B") if r["cache_bytes"] else "-"
        table.add_row(r["run"], r["target"], str(r["attempt"]), f"[{c}]{state}[/{c}]", step,
                      f"{r['loss']:.3f}" if r["loss"] is not None else "-", _fmt_num(r["tokens_per_s"]),
                      _fmt_duration(r["eta_s"]) if r["state"] not in ENDED else "-",
                      cache, _fmt_age(r["heartbeat_at"]))
    caption = [f"target {t} unreachable: {err}" for t, err in health.items() if err]
    if not rows:
        caption.append("no runs yet: try `opskit launch demo`")
    table.caption = "\n".join(caption) or None
    return table


def _watch(phase, runs, until_ended: bool, interval: float = 2.0) -> None:
    from rich.live import Live

    from opskit import operations, states
    with _store() as store, Live(refresh_per_second=4, console=_console()) as live:
        try:
            while True:
                health = operations.refresh(store, phase=phase, runs=runs)
                rows = [r for r in operations.status_rows(store, phase) if not runs or r["run"] in runs]
                live.update(_status_table(rows, health))
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
    with _store() as store:
        try:
            for chunk in operations.logs(store, run, lines, follow):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


@app.command()
def cancel(runs: List[str] = typer.Argument(..., help="Run names."),
           now: bool = typer.Option(False, "--now", help="SIGKILL at once, no checkpoint (a hung run)."),
           as_json: bool = typer.Option(False, "--json")):
    """Stop runs: the trainer saves a checkpoint and exits (resume continues it).

    Example: opskit cancel demo/geo_500k/s42
    Example: opskit cancel demo/geo_500k/s42 --now    # hung: kill it; resume starts from the last checkpoint
    """
    from opskit import operations
    with _store() as store:
        result = operations.cancel(store, runs, now=now)
    if as_json:
        return _print_json(result)
    said = {"removed-from-queue": "removed from the queue", "killed": "killed (no checkpoint)",
            "signalled": "signalled: it saves a checkpoint and stops",
            "cancelled-before-start": "cancelled before it started",
            "not-running": "not running, nothing to signal (`opskit status` shows how it ended)"}
    for r in result:
        text = said.get(r["outcome"], f"not cancelled ({r.get('reason')})")
        typer.echo(f"{r['run']}: {text}")


@app.command()
def resume(run: str = typer.Argument(..., help="Run name."),
           target: Optional[str] = typer.Option(None, "--target", "-t", help="Resume on this target."),
           as_json: bool = typer.Option(False, "--json")):
    """Restart a failed, lost, cancelled or stalled run from its last checkpoint, as a new attempt.

    Example: opskit resume demo/geo_500k/s42
    """
    from opskit import operations
    with _store() as store:
        result = operations.resume(store, run, target, on_event=_quiet_if(as_json))
    if as_json:
        return _print_json(result)
    if result.get("started") or result.get("queued"):
        how = f"queued at position {result['position']}" if result.get("queued") else "started"
        typer.echo(f"resumed {run} as attempt {result['attempt']} ({how})")
    else:
        raise OpsError(f"could not resume {run}: {result['reason']}")


@app.command()
def pull(runs: Optional[List[str]] = typer.Argument(None, help="Run names (default: every run)."),
         results_dir: str = typer.Option("results", "--results-dir", help="Where raw/ goes."),
         as_json: bool = typer.Option(False, "--json")):
    """Bring back non-weight artifacts (results, loss curve, eval, logs) into results/raw/.

    Example: opskit pull demo/geo_500k/s42
    """
    from opskit import operations
    with _store() as store:
        result = operations.pull(store, runs, results_dir, on_event=_quiet_if(as_json))
    if as_json:
        return _print_json(result)
    for r in result:
        if r.get("error"):
            typer.echo(f"{r['run']}: not pulled ({r['error']})", err=True)


@runs_app.command("show")
def runs_show(run: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")):
    """A run's record, its state history and pulled artifacts.

    Example: opskit runs show demo/geo_500k/s42
    """
    from opskit import operations
    with _store() as store:
        operations.refresh(store, runs=[run])
        d = operations.run_details(store, run)
    if as_json:
        return _print_json(d)
    console = _console()
    for k in ("name", "matrix", "target", "attempt", "state", "step", "total_steps", "loss", "tokens_per_s",
              "eta_s", "cache_bytes", "exit_code", "pid", "job_id", "run_dir", "message"):
        console.print(f"[bold]{k:>12}[/bold]  {d.get(k) if d.get(k) is not None else '-'}")
    console.print("[bold]history[/bold]")
    for e in d["events"]:
        console.print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['time']))}  attempt {e['attempt']}  "
                      f"{e['from_state'] or '-'} -> {e['to_state']}  {e['reason']}")
    if d["artifacts"]:
        console.print("[bold]pulled[/bold]  " + ", ".join(a["path"] for a in d["artifacts"]))


# ====================================================================== catalog


@matrix_app.command("show")
def matrix_show(matrix: Optional[str] = typer.Option(None, "--matrix", "-m", help="Matrix name or YAML file."),
                phase: Optional[str] = typer.Option(None, "--phase", "-p", help="Only this phase."),
                as_json: bool = typer.Option(False, "--json")):
    """The matrices and the runs each phase expands to.

    Example: opskit matrix show --matrix 1p5b --phase p0
    """
    from opskit import catalog
    if matrix:
        matrices = [catalog.load_matrix(matrix)]
    elif phase:
        matrices = [catalog.resolve_phase(phase)[0]]
    else:
        matrices = list(catalog.load_all().values())
    out = []
    for m in matrices:
        phases = [m.phases[phase]] if phase else list(m.phases.values())
        if phase and phase not in m.phases:
            raise OpsError(f"matrix {m.name} has no phase {phase} (phases: {', '.join(m.phases)})")
        for ph in phases:
            if ph.from_gate:
                runs = [f"{ph.name}/<survivors of {ph.from_gate}>/s{s}" for s in ph.seeds]
            else:
                runs = [r.name for r in catalog.expand(m, ph)]
            out.append({"matrix": m.name, "phase": ph.name, "kind": ph.kind, "preset": m.preset,
                        "tokens": int(m.train["tokens"] * ph.token_fraction), "configs": list(ph.configs),
                        "seeds": list(ph.seeds), "gate": ph.gate, "from_gate": ph.from_gate, "runs": runs})
    if as_json:
        return _print_json(out)
    for p in out:
        typer.echo(f"{p['matrix']} / {p['phase']} ({p['kind']}, preset {p['preset']}, "
                   f"{_fmt_num(p['tokens'])} tokens per run)" + (f", gate {p['gate']}" if p["gate"] else ""))
        for r in p["runs"]:
            typer.echo(f"  {r}")


@app.command()
def models(as_json: bool = typer.Option(False, "--json")):
    """Model presets with their parameter counts (computed from the shapes).

    Example: opskit models --json
    """
    from train.presets import list_presets
    rows = list_presets()
    if as_json:
        return _print_json(rows)
    from rich.table import Table
    table = Table(header_style="bold")
    for col in ("name", "hidden", "layers", "heads", "head_dim", "intermediate", "vocab", "params"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for r in rows:
        table.add_row(r["name"], *(str(r[k]) for k in ("hidden", "layers", "heads", "head_dim", "intermediate", "vocab")),
                      f"{r['params'] / 1e6:,.1f}M")
    _console().print(table)


@rope_app.command("show")
def rope_show(name: str = typer.Argument(..., help="Spectrum, e.g. geo_500k, hybrid_a0.2_t100k."),
              head_dim: int = typer.Option(64, "--head-dim"),
              scaling: Optional[str] = typer.Option(None, "--scaling", help="pi, ntk or yarn."),
              factor: Optional[float] = typer.Option(None, "--factor", help="Scaling factor s."),
              original_max: Optional[int] = typer.Option(None, "--original-max", help="Original (training) length."),
              as_json: bool = typer.Option(False, "--json")):
    """Frequencies, wavelengths and attention factor of a spectrum (with an optional scaling).

    Example: opskit rope show hybrid_a0.2_t100k --head-dim 128 --scaling yarn --factor 4 --original-max 2048
    """
    from train import spectra
    sc = None
    if scaling:
        if factor is None or original_max is None:
            raise OpsError("--scaling needs --factor and --original-max")
        sc = spectra.Scaling(scaling, factor, original_max)
    try:
        d = spectra.describe(name, head_dim=head_dim, scaling=sc)
    except ValueError as e:
        raise OpsError(str(e)) from None
    if as_json:
        return _print_json(d)
    typer.echo(f"{d['name']}  head_dim {d['head_dim']}  attention factor {d['attention_factor']:.4f}")
    typer.echo(f"{'k':>4}  {'inv_freq':>14}  {'wavelength':>14}")
    for k, (w, lam) in enumerate(zip(d["inv_freq"], d["wavelengths"])):
        typer.echo(f"{k:>4}  {w:>14.6e}  {lam:>14.1f}")


@app.command()
def datasets(info: Optional[str] = typer.Option(None, "--info", help="Details of one dataset."),
             as_json: bool = typer.Option(False, "--json")):
    """Datasets the trainer knows (Hugging Face ids, local:PATH, the offline demo corpus).

    Example: opskit datasets --info fineweb-edu
    """
    from train.data import registry
    try:
        rows = [registry.dataset_info(info)] if info else registry.list_datasets()
    except ValueError as e:
        raise OpsError(str(e)) from None
    if as_json:
        return _print_json(rows[0] if info else rows)
    if info:
        for k, v in rows[0].items():
            typer.echo(f"{k:>12}  {v}")
        return
    from rich.table import Table
    table = Table(header_style="bold")
    for col in ("name", "hf_id", "config", "size", "use"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r.get(k) or "-") for k in ("name", "hf_id", "config", "size", "use")))
    _console().print(table)


# ====================================================================== targets


@targets_app.command("add")
def targets_add(
    name: str = typer.Argument(..., help="A short name, e.g. box1."),
    ssh: Optional[str] = typer.Option(None, "--ssh", help="USER@HOST[:PORT] of an SSH box."),
    slurm: bool = typer.Option(False, "--slurm", help="A SLURM cluster (submission here or via --login)."),
    key: Optional[str] = typer.Option(None, "--key", help="SSH private key path (never copied or stored)."),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="Work directory on the target."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs on the box (0: CPU)."),
    gpus_per_run: Optional[int] = typer.Option(None, "--gpus-per-run", help="GPUs one run takes (default all)."),
    python: Optional[str] = typer.Option(None, "--python", help="Trainer python on the target (default: the prepared venv)."),
    partition: Optional[str] = typer.Option(None, "--partition"),
    account: Optional[str] = typer.Option(None, "--account"),
    qos: Optional[str] = typer.Option(None, "--qos"),
    nodes: Optional[int] = typer.Option(None, "--nodes"),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node"),
    time_limit: Optional[str] = typer.Option(None, "--time", help="SLURM time limit HH:MM:SS."),
    login: Optional[str] = typer.Option(None, "--login", help="USER@HOST[:PORT] of a SLURM login node."),
    known_hosts: Optional[str] = typer.Option(None, "--known-hosts", help="known_hosts file for this box."),
    base_python: Optional[str] = typer.Option(None, "--base-python", help="python3 on the box that builds the venv."),
    system_site_packages: bool = typer.Option(False, "--system-site-packages",
                                              help="Let the venv see the box's packages (a preinstalled torch)."),
    no_install: bool = typer.Option(False, "--no-install", help="prepare checks only; installs nothing."),
    torch_index: Optional[str] = typer.Option(None, "--torch-index",
                                              help="Where prepare gets torch: an index URL or a folder of wheels "
                                                   "on the box (default: download.pytorch.org for its CUDA)."),
    agent_python: Optional[str] = typer.Option(None, "--agent-python",
                                               help="python3 on the box that runs opskit's agent (stdlib only)."),
    stall_after: Optional[float] = typer.Option(None, "--stall-after", metavar="SECONDS",
                                                help="A live run with no heartbeat (or no training progress) "
                                                     "for this long shows stalled (default 300)."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite an existing target of that name."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Register a target.

    Example: opskit targets add box1 --ssh ubuntu@203.0.113.7 --key ~/.ssh/id_ed25519 --gpus 2
    Example: opskit targets add cluster --slurm --partition gpu --nodes 2 --gpus-per-node 8 --time 24:00:00
    """
    from opskit import operations
    options = {"ssh": ssh, "key": key, "workdir": workdir, "gpus": gpus, "gpus_per_run": gpus_per_run,
               "python": python, "partition": partition, "account": account, "qos": qos, "nodes": nodes,
               "gpus_per_node": gpus_per_node, "time": time_limit, "login": login, "known_hosts": known_hosts,
               "base_python": base_python, "system_site_packages": system_site_packages or None,
               "no_install": no_install or None, "torch_index": torch_index, "agent_python": agent_python,
               "stall_after_s": stall_after}
    kind = "slurm" if slurm else "ssh" if ssh else None
    if kind is None:
        raise OpsError("say what the target is: --ssh USER@HOST[:PORT] or --slurm")
    with _store() as store:
        rec = operations.add_target(store, name, kind, {k: v for k, v in options.items() if v is not None}, replace)
    if as_json:
        return _print_json(rec)
    typer.echo(f"added {rec['kind']} target {name}: " + ", ".join(f"{k}={v}" for k, v in rec["config"].items()))


@targets_app.command("list")
def targets_list(as_json: bool = typer.Option(False, "--json")):
    """Known targets.

    Example: opskit targets list
    """
    from opskit import operations
    with _store() as store:
        operations.local_target_record(store)
        rows = store.list_targets()
    if as_json:
        return _print_json(rows)
    for t in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in t["config"].items())
        typer.echo(f"{t['name']:<16} {t['kind']:<6} {cfg}")


@targets_app.command("remove")
def targets_remove(name: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")):
    """Forget a target (its runs stay in the store).

    Example: opskit targets remove box1
    """
    with _store() as store:
        store.remove_target(name)
    if as_json:
        return _print_json({"removed": name})
    typer.echo(f"removed target {name}")


@targets_app.command("check")
def targets_check(name: str = typer.Argument("local"), as_json: bool = typer.Option(False, "--json")):
    """Is the target reachable, with python, GPUs and free disk?

    Example: opskit targets check box1
    """
    from opskit import operations
    from opskit.targets import TargetUnreachable
    with _store() as store:
        try:
            result = operations.get_target(store, name).check()
        except TargetUnreachable as e:
            result = {"reachable": False, "error": str(e)}
    if as_json:
        _print_json(result)
    else:
        for k, v in result.items():
            typer.echo(f"{k:>14}  {v}")
    if not result.get("reachable", True):
        raise typer.Exit(1)


@targets_app.command("prepare")
def targets_prepare(name: str = typer.Argument(...),
                    as_json: bool = typer.Option(False, "--json", help="Progress lines go to stderr.")):
    """Provision a target (venv, trainer dependencies, checks); safe to repeat.

    Example: opskit targets prepare box1
    """
    from opskit import operations
    with _store() as store:
        tgt = operations.get_target(store, name)
        tgt.prepare(on_line=(lambda line: typer.echo(line, err=True)) if as_json else typer.echo)
        tgt.sync()
        if tgt.has_queue:
            tgt.ensure_supervisor()  # picks up a queue whose supervisor died
    if as_json:
        return _print_json({"target": name, "ready": True})
    typer.echo(f"target {name} is ready")


# ====================================================================== results (report, gate, publish, import)


def _results_store():
    """The store when one exists (it lists runs that were never pulled); None on a laptop without one."""
    from opskit.store import DEFAULT_PATH, Store
    path = _state_path or DEFAULT_PATH
    return Store(path) if os.path.exists(path) else None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise OpsError(f"expected comma-separated numbers like 1.5e9,7e9, got '{text}'") from None


@app.command()
def report(phase: Optional[str] = typer.Option(None, "--phase", "-p", help="Only this phase (default: every phase under results/raw/)."),
           scaling: bool = typer.Option(False, "--scaling", help="Fit L(N) and L(D) scaling laws instead of the phase report."),
           to_params: str = typer.Option("1.5e9,7e9", "--to-params", help="Model sizes to extrapolate L(N) to (--scaling)."),
           to_tokens: str = typer.Option("3e10,1e11", "--to-tokens", help="Token counts to extrapolate L(D) to (--scaling)."),
           results_dir: str = typer.Option("results", "--results-dir", help="Folder holding raw/; processed/ is written beside it."),
           as_json: bool = typer.Option(False, "--json")):
    """Tables (CSV, Markdown) and figures under results/processed/ from the pulled runs.

    Per-run CSV, per-config mean ± std over seeds, the six figures; missing and failed runs are listed.
    Example: opskit report --phase p0    (or: opskit report --scaling --to-params 1.5e9)
    """
    from pathlib import Path

    if scaling:
        from opskit.results.artifacts import load_runs
        from opskit.results.scaling import make_scaling_report
        rep = make_scaling_report(load_runs(Path(results_dir) / "raw", phase), Path(results_dir) / "processed",
                                  _floats(to_params), _floats(to_tokens))
        if as_json:
            return _print_json(rep.to_json())
        from opskit.results.scaling import markdown as scaling_markdown
        typer.echo(scaling_markdown(rep))
        typer.echo(f"figure: {rep.figure}")
        return
    from opskit.results.aggregate import summary_table
    from opskit.results.report import make_report
    store = _results_store()
    try:
        out = make_report(Path(results_dir), phase, store)
    finally:
        if store is not None:
            store.close()
    if as_json:
        return _print_json(out.to_json())
    from rich.table import Table
    header, rows = summary_table(out.report)
    table = Table(title="mean ± population std over seeds")
    for h in header:
        table.add_column(h, justify="left" if h in ("phase", "config") else "right")
    for row in rows:
        table.add_row(*row)
    console = _console()
    console.print(table)
    for r in out.report.not_done:
        console.print(f"[yellow]not in the averages[/yellow] {r.name}: {r.state}")
    for f in out.figures:
        if f.path is None or f.note:
            console.print(f"[dim]{f.note}[/dim]")
    console.print(f"wrote {', '.join(str(p) for p in out.tables.values())} and {sum(1 for f in out.figures if f.path)} figures")


@app.command()
def gate(phase: str = typer.Argument(..., help="Phase with a gate rule, e.g. p0."),
         matrix: Optional[str] = typer.Option(None, "--matrix", "-m", help="Matrix name or YAML file."),
         allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Gate on the runs that finished; the others are recorded."),
         results_dir: str = typer.Option("results", "--results-dir", help="Folder holding raw/."),
         as_json: bool = typer.Option(False, "--json")):
    """Apply the phase's gate rule to its pulled results, record the decision, list the configs that go on.

    Example: opskit gate p0    (then: opskit launch p1 runs the survivors)
    """
    from pathlib import Path

    from opskit.results.gate import apply_gate
    with _store() as store:
        decision = apply_gate(store, Path(results_dir) / "raw", phase, matrix, allow_incomplete)
    if as_json:
        return _print_json(decision)
    from rich.table import Table
    rule = f"drop a config whose mean PPL@{decision['metric_length']} is more than {decision['max_rel_above_best']:.0%} above the best"
    table = Table(title=f"gate {decision['phase']}: {rule}")
    for col in ("config", "mean", "std", "seeds", "vs best", "decision"):
        table.add_column(col, justify="left" if col in ("config", "decision") else "right")
    for config, c in decision["configs"].items():
        table.add_row(config, "-" if c["mean"] is None else f"{c['mean']:.3f}", "-" if c["std"] is None else f"{c['std']:.3f}",
                      str(c["n"]), "-" if c["rel_above_best"] is None else f"{c['rel_above_best']:+.1%}",
                      "[green]goes on[/green]" if c["keep"] else f"[red]dropped[/red] {c.get('reason', '')}")
    console = _console()
    console.print(table)
    for run in decision["incomplete"]:
        console.print(f"[yellow]gated without[/yellow] {run}")
    console.print(f"goes on: {', '.join(decision['survivors'])}")


@app.command()
def publish(message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit subject (the run list is added below it)."),
            no_push: bool = typer.Option(False, "--no-push", help="Commit only; do not push."),
            max_mb: float = typer.Option(5.0, "--max-mb", help="Refuse any file larger than this (MB)."),
            results_dir: str = typer.Option("results", "--results-dir", help="The folder to publish."),
            as_json: bool = typer.Option(False, "--json")):
    """Commit results/ (raw artifacts, tables, figures) and push it; refuses weights, big files and secrets.

    Example: opskit publish --message "p0 pilot results" --no-push
    """
    from pathlib import Path

    from opskit.results.publish import publish as publish_results
    result = publish_results(Path(results_dir), message, push=not no_push, max_mb=max_mb)
    if as_json:
        return _print_json(result.__dict__)
    typer.echo(f"committed {result.commit[:10]}: {len(result.files)} files, {len(result.runs)} runs, "
               f"phases {', '.join(result.phases) or '-'}" + (f"; pushed to {result.pushed_to}" if result.pushed_to else ""))


@app.command("import")
def import_results(file: str = typer.Argument(..., help="An earlier study's results JSON."),
                   phase: str = typer.Option(..., "--phase", "-p", help="Phase name the imported runs get."),
                   matrix: Optional[str] = typer.Option(None, "--matrix", "-m", help="Matrix the study used (preset, training length)."),
                   results_dir: str = typer.Option("results", "--results-dir", help="Folder holding raw/."),
                   as_json: bool = typer.Option(False, "--json")):
    """Bring an earlier study's results file into results/raw/ as runs, so old and new sit in one report.

    Example: opskit import old/final_350m.json --phase final350m --matrix 350m
    """
    from pathlib import Path

    from opskit.results.legacy_import import import_file
    names = import_file(Path(file), phase, Path(results_dir), matrix)
    if as_json:
        return _print_json({"imported": names})
    typer.echo(f"imported {len(names)} runs into {Path(results_dir) / 'raw' / phase}: {', '.join(names)}")


# ====================================================================== queues


@app.command()
def queue(
    words: Optional[List[str]] = typer.Argument(None, metavar="[TARGET] | move RUN --top",
                                                help="A target name (default: every target), or `move RUN`."),
    top: bool = typer.Option(False, "--top", help="With `move RUN`: put the run first in its queue."),
    as_json: bool = typer.Option(False, "--json"),
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
        with _store() as store:
            result = operations.queue_move_top(store, words[1])
        return _print_json(result) if as_json else typer.echo(f"{result['run']} is now #{result['position']}")
    if len(words) > 1:
        raise OpsError("usage: opskit queue [TARGET] or opskit queue move RUN --top")
    with _store() as store:
        result = operations.queue_view(store, words[0] if words else None)
    if as_json:
        return _print_json(result)
    for q in result:
        if q.get("error"):
            typer.echo(f"{q['target']}: unreachable ({q['error']})")
            continue
        sup = q.get("supervisor") or {}
        gpus = (q.get("config") or {}).get("gpus")
        typer.echo(f"{q['target']} ({q['kind']}, {gpus or 'no'} GPUs"
                   + (f", supervisor pid {sup['pid']})" if sup.get("alive") else ", supervisor idle)"))
        for r in q.get("running", []):
            where = f"GPUs {r['cuda_visible_devices']}" if r.get("cuda_visible_devices") else "CPU"
            typer.echo(f"  running  {r['run']}  {where}  port {r.get('port')}  since {_fmt_age(r.get('started_at'))}")
        for r in q.get("pending", []):  # `waiting` names the --after run it waits for, if any
            typer.echo(f"  #{r['position']:<6} {r['run']}  {r.get('units', '?')} GPU(s)  {r['waiting']}")
        if not q.get("running") and not q.get("pending"):
            typer.echo("  (empty)")


# ---------------------------------------------------------------------- export (p2)


@app.command("export")
def export(run: str = typer.Argument(..., help="Run name, e.g. p1/geo_500k/s42."),
           hf: str = typer.Option(..., "--hf", help="Directory to write the Hugging Face checkpoint into."),
           step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: the newest)."),
           dtype: str = typer.Option("fp32", "--dtype", help="Weights on disk: fp32 or bf16.")):
    """Write a trained run as a Hugging Face Llama checkpoint + tokenizer (runs where its checkpoint is).

    Example: opskit export p1/geo_500k/s42 --hf exports/geo_500k_s42
    """
    import subprocess

    from opskit import operations
    with _store() as store:
        row = store.require_run(run)
        kind = operations.get_target(store, row["target"]).kind
    if kind != "local":
        raise OpsError(f"{run} lives on {kind} target {row['target']}; export it there: "
                       f"python -m train.export_hf --run-dir {row['run_dir']} --out DIR")
    # A subprocess: the control plane never imports torch.
    cmd = [sys.executable, "-m", "train.export_hf", "--run-dir", row["run_dir"], "--out", os.path.abspath(hf),
           "--dtype", dtype] + (["--step", str(step)] if step is not None else [])
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise OpsError(f"export of {run} failed (exit {done.returncode}; its message is above)")


# === end of commands ===


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


if __name__ == "__main__":
    main()
