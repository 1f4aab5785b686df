"""Per-run rows and per-config summaries (mean ± population std over seeds), written as CSV and Markdown."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from opskit.results.artifacts import RunArtifacts
from opskit.states import DONE

RUNS_CSV = "runs.csv"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
# results.json's tokens_per_s: the whole run's tokens over its training time (status shows the last
# interval's instead: "tok/s last")
RUN_AVG_TPS = "tokens/s (run avg)"


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # population std (ddof=0), as the earlier studies printed it
    n: int


def stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return Stat(mean=mean, std=math.sqrt(var), n=len(values))


def length_label(length: int) -> str:
    """2048 -> 2K, 16384 -> 16K, 128 -> 128."""
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


@dataclass
class ConfigSummary:
    phase: str
    config: str
    seeds: list[int]  # seeds with results
    ppl: dict[int, Stat] = field(default_factory=dict)
    final_loss: Stat | None = None
    tokens_per_s: Stat | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass
class Report:
    runs: list[RunArtifacts]
    summaries: list[ConfigSummary]
    lengths: list[int]
    costs: dict[str, float | None] = field(default_factory=dict)  # run -> cost (opskit cost); {}: no price

    def cost_of(self, phase: str, config: str) -> float | None:
        """What every run of a config cost (those that ran; failed ones count too)."""
        known = [c for r in self.runs if r.phase == phase and r.config == config
                 if (c := self.costs.get(r.name)) is not None]
        return round(sum(known), 2) if known else None

    @property
    def done(self) -> list[RunArtifacts]:
        return [r for r in self.runs if r.state == DONE]

    @property
    def not_done(self) -> list[RunArtifacts]:
        return [r for r in self.runs if r.state != DONE]

    @property
    def multi_phase(self) -> bool:
        return len({s.phase for s in self.summaries}) > 1

    def label(self, phase: str, config: str) -> str:
        return f"{phase}/{config}" if self.multi_phase else config

    def summary(self, phase: str, config: str) -> ConfigSummary:
        return next(s for s in self.summaries if s.phase == phase and s.config == config)


def tokens_per_s(results: dict) -> float | None:
    """A run's throughput: the steady figure (compile and warm-up left out) of results.json, or
    `tokens_per_s` of results written before it had one (and of imported studies)."""
    value = results.get("tokens_per_s_steady")
    return value if value is not None else results.get("tokens_per_s")


def build_report(runs: list[RunArtifacts]) -> Report:
    """Summaries over the runs that finished; the others stay in `runs` with their state."""
    lengths = sorted({length for r in runs if r.state == DONE for length in r.ppl})
    keys = sorted({(r.phase, r.config) for r in runs})
    summaries = []
    for phase, config in keys:
        done = [r for r in runs if r.phase == phase and r.config == config and r.state == DONE]
        summaries.append(ConfigSummary(
            phase=phase, config=config, seeds=[r.seed for r in done],
            ppl={length: st for length in lengths if (st := stat([r.ppl[length] for r in done if length in r.ppl]))},
            final_loss=stat([r.results["final_train_loss"] for r in done
                             if (r.results or {}).get("final_train_loss") is not None]),
            tokens_per_s=stat([v for r in done if (v := tokens_per_s(r.results or {})) is not None]),
        ))
    return Report(runs=runs, summaries=summaries, lengths=lengths)


# ---------------------------------------------------------------- tables


def run_rows(report: Report) -> list[dict]:
    rows = []
    for r in report.runs:
        res = r.results or {}
        row = {"phase": r.phase, "config": r.config, "seed": r.seed, "state": r.state}
        row.update({f"ppl@{length}": r.ppl.get(length) for length in report.lengths})
        row.update({"final_loss": res.get("final_train_loss"), "tokens": res.get("tokens_seen"),
                    "tokens_per_s": tokens_per_s(res), "params": res.get("params"),
                    "imported_from": res.get("imported_from")})
        if report.costs:
            row["cost"] = report.costs.get(r.name)
        rows.append(row)
    return rows


def summary_rows(report: Report) -> list[dict]:
    rows = []
    for s in report.summaries:
        row = {"phase": s.phase, "config": s.config, "n_seeds": s.n}
        metrics = {f"ppl@{length}": s.ppl.get(length) for length in report.lengths}
        metrics.update({"final_loss": s.final_loss, "tokens_per_s": s.tokens_per_s})
        for name, st in metrics.items():
            row[f"{name}_mean"] = st.mean if st else None
            row[f"{name}_std"] = st.std if st else None
            row[f"{name}_n"] = st.n if st else 0
        if report.costs:
            row["cost"] = report.cost_of(s.phase, s.config)
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])


def _fmt(st: Stat | None, n_seeds: int, digits: int = 2) -> str:
    if st is None:
        return "–"
    if st.n == 1:  # one seed: no spread to show
        return f"{st.mean:.{digits}f}" if n_seeds == 1 else f"{st.mean:.{digits}f} (n=1)"
    text = f"{st.mean:.{digits}f} ± {st.std:.{digits}f}"
    return text if st.n == n_seeds else f"{text} (n={st.n})"


def summary_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-config table, as printed and written to Markdown."""
    first = ["phase", "config"] if report.multi_phase else ["config"]
    header = first + ["seeds"] + [f"PPL@{length_label(x)}" for x in report.lengths] + ["final loss", RUN_AVG_TPS]
    header += ["cost"] if report.costs else []
    rows = []
    for s in report.summaries:
        rows.append(([s.phase, s.config] if report.multi_phase else [s.config]) + [str(s.n)]
                    + [_fmt(s.ppl.get(x), s.n) for x in report.lengths]
                    + [_fmt(s.final_loss, s.n, 3), _fmt(s.tokens_per_s, s.n, 0)]
                    + ([_num(report.cost_of(s.phase, s.config), 2)] if report.costs else []))
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: Report, figure_notes: list[str] | None = None) -> str:
    header, rows = summary_table(report)
    run_header = ["run", "state"] + [f"PPL@{length_label(x)}" for x in report.lengths] + ["final loss", "tokens", RUN_AVG_TPS]
    run_header += ["cost"] if report.costs else []
    run_table = []
    for r in report.runs:
        res = r.results or {}
        run_table.append([r.name, r.state] + [f"{r.ppl[x]:.2f}" if x in r.ppl else "–" for x in report.lengths]
                         + [_num(res.get("final_train_loss"), 3), _num(res.get("tokens_seen"), 0), _num(tokens_per_s(res), 0)]
                         + ([_num(report.costs.get(r.name), 2)] if report.costs else []))
    phases = sorted({s.phase for s in report.summaries})
    parts = [f"# Results summary: phase{'s' if len(phases) > 1 else ''} {', '.join(phases)}", "",
             "Mean ± population std over seeds; `(n=k)` marks a metric that fewer seeds reported.", "",
             "## Per config", "", _md_table(header, rows), "", "## Per run", "", _md_table(run_header, run_table), ""]
    missing = report.not_done
    parts += ["## Missing or failed runs", ""]
    parts += [f"- `{r.name}`: {r.state}" for r in missing] if missing else ["None."]
    if figure_notes:
        parts += ["", "## Figures", ""] + [f"- {note}" for note in figure_notes]
    return "\n".join(parts) + "\n"


def _num(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_tables(report: Report, out_dir: Path, figure_notes: list[str] | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"runs_csv": out_dir / RUNS_CSV, "summary_csv": out_dir / SUMMARY_CSV, "summary_md": out_dir / SUMMARY_MD}
    _write_csv(paths["runs_csv"], run_rows(report))
    _write_csv(paths["summary_csv"], summary_rows(report))
    paths["summary_md"].write_text(markdown(report, figure_notes))
    return paths
