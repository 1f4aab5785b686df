"""Commands on results: report, gate, publish, import."""
from __future__ import annotations

from typing import Optional

import typer

from opskit.cli.app import app, open_store, open_store_if_exists
from opskit.cli.output import JSON, console, emit, print_json, table
from opskit.errors import OpsError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise OpsError(f"expected comma-separated numbers like 1.5e9,7e9, got '{text}'") from None


@app.command()
def report(phase: Optional[str] = typer.Option(None, "--phase", "-p", help="Only this phase (default: every phase under results/raw/).", metavar="PHASE"),
           scaling: bool = typer.Option(False, "--scaling", help="Fit L(N) and L(D) scaling laws instead of the phase report."),
           to_params: str = typer.Option("1.5e9,7e9", "--to-params", help="Model sizes to extrapolate L(N) to (--scaling).", metavar="N,N,..."),
           to_tokens: str = typer.Option("3e10,1e11", "--to-tokens", help="Token counts to extrapolate L(D) to (--scaling).", metavar="D,D,..."),
           results_dir: str = typer.Option("results", "--results-dir", help="Folder holding raw/; processed/ is written beside it.", metavar="DIR"),
           as_json: bool = JSON):
    """Tables (CSV, Markdown) and figures under results/processed/ from the pulled runs.

    Per-run CSV, per-config mean ± std over seeds, the six figures; missing and failed runs are listed.

    \b
    Example: opskit report --phase p0
    Example: opskit report --scaling --to-params 1.5e9
    """
    from pathlib import Path

    if scaling:
        from opskit.results.artifacts import load_runs
        from opskit.results.scaling import make_scaling_report
        rep = make_scaling_report(load_runs(Path(results_dir) / "raw", phase), Path(results_dir) / "processed",
                                  _floats(to_params), _floats(to_tokens))
        if as_json:
            return print_json(rep.to_json())
        from opskit.results.scaling import markdown as scaling_markdown
        typer.echo(scaling_markdown(rep))
        typer.echo(f"figure: {rep.figure}")
        return
    from opskit.results.aggregate import summary_table
    from opskit.results.report import make_report
    from opskit.operations import run_costs
    with open_store_if_exists() as store:
        out = make_report(Path(results_dir), phase, store, costs=run_costs(store) if store else None)
    if as_json:
        return print_json(out.to_json())
    header, rows = summary_table(out.report)
    con = console()
    con.print(table(header, rows, left=("phase", "config"), title="mean ± population std over seeds"))
    from opskit.results.artifacts import NOT_PULLED
    for r in out.report.not_done:
        hint = f" (opskit pull {r.name})" if r.state == NOT_PULLED else ""
        con.print(f"[yellow]not in the averages[/yellow] {r.name}: {r.state}{hint}", highlight=False)
    for w in out.warnings:
        con.print(f"warning: {w}", markup=False, style="yellow")
    for f in out.figures:
        if f.path is None or f.note:
            con.print(f"[dim]{f.note}[/dim]")
    con.print(f"wrote {', '.join(str(p) for p in out.tables.values())} and {sum(1 for f in out.figures if f.path)} figures")


@app.command()
def gate(phase: str = typer.Argument(..., help="Phase with a gate rule, e.g. p0.", metavar="PHASE"),
         matrix: Optional[str] = typer.Option(None, "--matrix", "-m", help="Matrix name or YAML file.", metavar="MATRIX"),
         allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Gate on the runs that finished; the others are recorded."),
         results_dir: str = typer.Option("results", "--results-dir", help="Folder holding raw/.", metavar="DIR"),
         as_json: bool = JSON):
    """Apply the phase's gate rule to its pulled results, record the decision, list the configs that go on.

    \b
    Example: opskit gate p0    (then: opskit launch p1 runs the survivors)
    """
    from pathlib import Path

    from opskit.results.gate import apply_gate
    with open_store(create=True) as store:  # a gate decided on imported results starts a project's store
        decision = apply_gate(store, Path(results_dir) / "raw", phase, matrix, allow_incomplete)
    emit(decision, as_json, _print_gate)


def _print_gate(decision: dict) -> None:
    rule = (f"drop a config whose mean PPL@{decision['metric_length']} is more than "
            f"{decision['max_rel_above_best']:.0%} above the best")
    rows = [[config, "-" if c["mean"] is None else f"{c['mean']:.3f}", "-" if c["std"] is None else f"{c['std']:.3f}",
             str(c["n"]), "-" if c["rel_above_best"] is None else f"{c['rel_above_best']:+.1%}",
             "[green]goes on[/green]" if c["keep"] else f"[red]dropped[/red] {c.get('reason', '')}"]
            for config, c in decision["configs"].items()]
    con = console()
    con.print(table(["config", "mean", "std", "seeds", "vs best", "decision"], rows, left=("config", "decision"),
                    title=f"gate {decision['phase']}: {rule}"))
    for run in decision["incomplete"]:
        con.print(f"[yellow]gated without[/yellow] {run}")
    con.print(f"goes on: {', '.join(decision['survivors'])}")


@app.command()
def publish(message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit subject (the run list is added below it).", metavar="TEXT"),
            no_push: bool = typer.Option(False, "--no-push", help="Commit only; do not push."),
            max_mb: float = typer.Option(5.0, "--max-mb", help="Refuse any file larger than this (MB).", metavar="MB"),
            results_dir: str = typer.Option("results", "--results-dir", help="The folder to publish.", metavar="DIR"),
            as_json: bool = JSON):
    """Commit results/ (raw artifacts, tables, figures) and push it; refuses weights, big files and secrets.

    \b
    Example: opskit publish --message "p0 pilot results" --no-push
    """
    from pathlib import Path

    from opskit.results.publish import publish as publish_results
    result = publish_results(Path(results_dir), message, push=not no_push, max_mb=max_mb)
    emit(result.__dict__, as_json, lambda r: typer.echo(r["summary"]))


@app.command("import")
def import_results(file: str = typer.Argument(..., help="An earlier study's results JSON.", metavar="FILE"),
                   phase: str = typer.Option(..., "--phase", "-p", help="Phase name the imported runs get.", metavar="PHASE"),
                   matrix: Optional[str] = typer.Option(None, "--matrix", "-m", help="Matrix the study used (preset, training length).", metavar="MATRIX"),
                   results_dir: str = typer.Option("results", "--results-dir", help="Folder holding raw/.", metavar="DIR"),
                   as_json: bool = JSON):
    """Bring an earlier study's results file into results/raw/ as runs, so old and new sit in one report.

    \b
    Example: opskit import old/final_350m.json --phase final350m --matrix 350m
    """
    from pathlib import Path

    from opskit.results.legacy_import import import_file
    names = import_file(Path(file), phase, Path(results_dir), matrix)
    emit({"imported": names}, as_json, lambda r: typer.echo(
        f"imported {len(names)} runs into {Path(results_dir) / 'raw' / phase}: {', '.join(names)}"))
