"""`opskit report`: tables and figures under results/processed/ from the runs under results/raw/."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opskit.errors import OpsError
from opskit.results.aggregate import Report, build_report, write_tables
from opskit.results.artifacts import add_expected, load_runs, phases_in
from opskit.results.figures import FigureResult, make_figures
from opskit.results.wide import write_wide_tables

RAW = "raw"
PROCESSED = "processed"
FIGURES = "figures"


class ReportError(OpsError):
    pass


@dataclass
class ReportOutput:
    report: Report
    tables: dict[str, Path]
    figures: list[FigureResult]

    @property
    def warnings(self) -> list[str]:
        """What was skipped while reading the pulled runs (one bad loss-curve line, ...)."""
        return [w for r in self.report.runs for w in r.warnings]

    def to_json(self) -> dict:
        from opskit.results.aggregate import run_rows, summary_rows

        return {"summary": summary_rows(self.report), "runs": run_rows(self.report),
                "missing_or_failed": [{"run": r.name, "state": r.state} for r in self.report.not_done],
                "warnings": self.warnings,
                "tables": {k: str(v) for k, v in self.tables.items()},
                "figures": [{"name": f.name, "path": str(f.path) if f.path else None, "note": f.note} for f in self.figures]}


def expected_runs(phase: str, store=None, config_dir: Path | None = None) -> list[tuple[str, str, int]]:
    """(phase, config, seed) the catalog plans for `phase`; [] for phases no matrix defines (imports)."""
    from opskit import catalog
    from opskit.results.gate import GateError, phase_configs

    kw = {"config_dir": config_dir} if config_dir else {}
    try:
        m, ph = catalog.resolve_phase(phase, **kw)
    except OpsError:
        return []
    configs = list(ph.configs)
    if store is not None:
        try:
            configs = phase_configs(store, phase, m.name, **kw)
        except GateError:
            pass
    return [(phase, c, s) for c in configs for s in ph.seeds]


def collect(results_dir: Path, phase: str | None = None, store=None, config_dir: Path | None = None) -> Report:
    raw = Path(results_dir) / RAW
    store_runs = store.list_runs(phase=phase) if store is not None else []
    phases = [phase] if phase else sorted(set(phases_in(raw)) | {r["phase"] for r in store_runs})
    if not phases:
        raise ReportError(f"no runs under {raw}: pull some first (opskit pull) or import earlier results (opskit import)")
    runs = []
    for ph in phases:
        expected = expected_runs(ph, store, config_dir)
        expected += [(r["phase"], r["config"], r["seed"]) for r in store_runs if r["phase"] == ph]
        states = {r["name"]: r["state"] for r in store_runs if r["phase"] == ph}
        runs += add_expected(load_runs(raw, ph), sorted(set(expected)), states)
    if phase and not runs:
        raise ReportError(f"no runs of phase '{phase}' under {raw} (phases there: {', '.join(phases_in(raw)) or 'none'})")
    return build_report(runs)


def make_report(results_dir: Path, phase: str | None = None, store=None, config_dir: Path | None = None,
                costs: dict[str, float | None] | None = None) -> ReportOutput:
    """Write runs.csv, summary.csv, summary.md, the wide CSVs (ppl_wide.csv, ...) and figures/*.png under
    results/processed/. `costs`: each run's cost (opskit cost) for a cost column per run and per config;
    none without a price."""
    report = collect(results_dir, phase, store, config_dir)
    report.costs = {run: c for run, c in (costs or {}).items() if c is not None}
    out = Path(results_dir) / PROCESSED
    figures = make_figures(report, out / FIGURES)
    notes = [f"`{f.path.name}`" + (f" ({f.note})" if f.note else "") if f.path else f.note for f in figures]
    tables = write_tables(report, out, notes)
    tables.update(write_wide_tables(report, out))
    return ReportOutput(report=report, tables=tables, figures=figures)
