"""Commands on targets: targets add, list, remove, check, prepare."""
from __future__ import annotations

from typing import List, Optional

import typer

from opskit.cli.app import open_store, targets_app
from opskit.cli.output import JSON, emit, key_values, print_json, progress
from opskit.errors import EXIT_UNREACHABLE, OpsError, TargetUnreachable


@targets_app.command("add")
def targets_add(
    name: str = typer.Argument(..., help="A short name, e.g. box1.", metavar="NAME"),
    ssh: Optional[str] = typer.Option(None, "--ssh", help="USER@HOST[:PORT] of an SSH box.", metavar="USER@HOST[:PORT]"),
    slurm: bool = typer.Option(False, "--slurm", help="A SLURM cluster (submission here or via --login)."),
    local: bool = typer.Option(False, "--local", help="This machine, e.g. a GPU workstation (its own --workdir, "
                                                      "--gpus; default: detected). `local` itself may be set so."),
    key: Optional[str] = typer.Option(None, "--key", help="SSH private key path (never copied or stored).", metavar="PATH"),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="Work directory on the target.", metavar="DIR"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs on the box (0: CPU).", metavar="N"),
    gpus_per_run: Optional[int] = typer.Option(None, "--gpus-per-run", help="GPUs one run takes (default all).", metavar="N"),
    max_parallel: Optional[int] = typer.Option(None, "--max-parallel", help="At most this many runs at once "
                                                                            "(a CPU box: default 1).", metavar="N"),
    python: Optional[str] = typer.Option(None, "--python", help="Trainer python on the target (default: the prepared venv).", metavar="PATH"),
    partition: Optional[str] = typer.Option(None, "--partition", help="SLURM partition.", metavar="NAME"),
    account: Optional[str] = typer.Option(None, "--account", help="SLURM account.", metavar="NAME"),
    qos: Optional[str] = typer.Option(None, "--qos", help="SLURM quality of service.", metavar="NAME"),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="SLURM nodes per run.", metavar="N"),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="GPUs per SLURM node (each run takes them all).", metavar="N"),
    time_limit: Optional[str] = typer.Option(None, "--time", help="SLURM time limit HH:MM:SS.", metavar="HH:MM:SS"),
    login: Optional[str] = typer.Option(None, "--login", help="USER@HOST[:PORT] of a SLURM login node.", metavar="USER@HOST[:PORT]"),
    known_hosts: Optional[str] = typer.Option(None, "--known-hosts", help="known_hosts file for this box.", metavar="FILE"),
    base_python: Optional[str] = typer.Option(None, "--base-python", help="python3 on the box that builds the venv.", metavar="PATH"),
    system_site_packages: bool = typer.Option(False, "--system-site-packages",
                                              help="Let the venv see the box's packages (a preinstalled torch)."),
    no_install: bool = typer.Option(False, "--no-install", help="prepare checks only; installs nothing."),
    torch_index: Optional[str] = typer.Option(None, "--torch-index",
                                              help="Where prepare gets torch: an index URL or a folder of wheels "
                                                   "on the box (default: download.pytorch.org for its CUDA).", metavar="URL|DIR"),
    agent_python: Optional[str] = typer.Option(None, "--agent-python",
                                               help="python3 on the box that runs opskit's agent (stdlib only).", metavar="PATH"),
    stall_after: Optional[float] = typer.Option(None, "--stall-after", metavar="SECONDS",
                                                help="A live run with no heartbeat (or no training progress) "
                                                     "for this long shows stalled (default 300)."),
    price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", metavar="PRICE",
                                                   help="What the box costs an hour (SLURM: a GPU-hour); `opskit "
                                                        "cost` and `status` count its busy and idle time."),
    notify: Optional[List[str]] = typer.Option(None, "--notify", metavar="URL",
                                               help="POST JSON (Slack-compatible) here when a run ends or "
                                                    "stalls and when the queue drains (repeatable)."),
    idle_after: Optional[float] = typer.Option(None, "--idle-after", metavar="SECONDS",
                                               help="With --on-idle: how long nothing may run or wait first."),
    on_idle: Optional[str] = typer.Option(None, "--on-idle", metavar="CMD",
                                          help="Run CMD once on the box when it has been idle --idle-after "
                                               "seconds and every finished run was pulled, e.g. 'sudo shutdown -h now'."),
    idle_even_unpulled: bool = typer.Option(False, "--idle-even-unpulled",
                                            help="Run --on-idle even when some results were not pulled yet."),
    gpu_idle_pct: Optional[float] = typer.Option(None, "--gpu-idle-pct", metavar="PCT",
                                                 help="A training run whose GPUs stay under this utilisation "
                                                      "shows stalled, 'GPUs idle' (default 10; 0: never)."),
    gpu_idle_window: Optional[float] = typer.Option(None, "--gpu-idle-window", metavar="SECONDS",
                                                    help="... for this long (default 600)."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite an existing target of that name."),
    as_json: bool = JSON,
):
    """Register a target.

    \b
    Example: opskit targets add box1 --ssh ubuntu@203.0.113.7 --key ~/.ssh/id_ed25519 --gpus 2
    Example: opskit targets add box1 --ssh ubuntu@203.0.113.7 --price-per-hour 4.40 --notify URL --idle-after 1800 --on-idle 'sudo poweroff'
    Example: opskit targets add ws --local --gpus 4 --workdir /scratch/opskit
    Example: opskit targets add cluster --slurm --partition gpu --nodes 2 --gpus-per-node 8 --time 24:00:00
    """
    from opskit import operations
    options = {"ssh": ssh, "key": key, "workdir": workdir, "gpus": gpus, "gpus_per_run": gpus_per_run,
               "max_parallel": max_parallel, "price_per_hour": price_per_hour, "notify": notify or None,
               "idle_after_s": idle_after, "on_idle": on_idle, "idle_even_unpulled": idle_even_unpulled or None,
               "gpu_idle_pct": gpu_idle_pct, "gpu_idle_window_s": gpu_idle_window,
               "python": python, "partition": partition, "account": account, "qos": qos, "nodes": nodes,
               "gpus_per_node": gpus_per_node, "time": time_limit, "login": login, "known_hosts": known_hosts,
               "base_python": base_python, "system_site_packages": system_site_packages or None,
               "no_install": no_install or None, "torch_index": torch_index, "agent_python": agent_python,
               "stall_after_s": stall_after}
    kind = "slurm" if slurm else "ssh" if ssh else "local" if local else None
    if kind is None:
        raise OpsError("say what the target is: --ssh USER@HOST[:PORT], --slurm or --local")
    if local and kind != "local":
        raise OpsError("--local is this machine: not with --ssh or --slurm")
    with open_store(create=True) as store:
        rec = operations.add_target(store, name, kind, {k: v for k, v in options.items() if v is not None}, replace)
    emit(rec, as_json, lambda r: typer.echo(f"added {r['kind']} target {name}: " + _config_line(r)))


def _config_line(rec: dict) -> str:
    from opskit.cli.output import shown_url
    return ", ".join(f"{k}={[shown_url(u) for u in v] if k == 'notify' else v}" for k, v in rec["config"].items())


@targets_app.command("list")
def targets_list(as_json: bool = JSON):
    """Known targets.

    \b
    Example: opskit targets list
    """
    from opskit import operations
    with open_store(create=True) as store:
        rows = operations.list_targets(store)
    emit(rows, as_json, lambda rows: [typer.echo(f"{t['name']:<16} {t['kind']:<6} {_config_line(t)}") for t in rows])


@targets_app.command("remove")
def targets_remove(name: str = typer.Argument(..., metavar="NAME"), as_json: bool = JSON):
    """Forget a target (its runs stay in the store).

    \b
    Example: opskit targets remove box1
    """
    from opskit import operations
    with open_store() as store:
        result = operations.remove_target(store, name)
    emit(result, as_json, lambda r: typer.echo(
        f"removed target {r['removed']}" if "removed" in r else
        "target local is built in (this machine) and cannot be removed: reset it to its defaults, " + _config_line(r)))


@targets_app.command("check")
def targets_check(name: str = typer.Argument("local", metavar="NAME"), as_json: bool = JSON):
    """Is the target reachable, with python, GPUs and free disk?

    \b
    Example: opskit targets check box1
    """
    from opskit import operations
    with open_store(create=True) as store:
        result = operations.check_target(store, name)
    if not result.get("reachable", True):
        if as_json:
            print_json(result)
            raise typer.Exit(EXIT_UNREACHABLE)
        raise TargetUnreachable(f"target {name}: {result['error']}")
    emit(result, as_json, key_values)


@targets_app.command("prepare")
def targets_prepare(name: str = typer.Argument(..., metavar="NAME"),
                    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout; "
                                                                          "progress lines go to stderr.")):
    """Provision a target (venv, trainer dependencies, checks); safe to repeat.

    \b
    Example: opskit targets prepare box1
    """
    from opskit import operations
    with open_store(create=True) as store:
        result = operations.prepare_target(store, name, on_line=progress(as_json))
    emit(result, as_json, lambda r: typer.echo(f"target {name} is ready"))
