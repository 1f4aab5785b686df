"""The papers' wide tables: one row per run and one per config mean, one column per evaluated length.

The layout YaRN's eval scripts write (`eval/perplexity.py`, `eval/passkey.py`: a first column naming the
model, then one column per length, the lengths as the header), so numbers line up with the papers'
tables and their plotting code reads them:

- `ppl_wide.csv`: perplexity over contiguous chunks (results.json `ppl`);
- `ppl_sliding<S>_wide.csv`: sliding-window perplexity with stride S (eval_per_length.json "sliding"),
  one file per stride found;
- `passkey_wide.csv`: passkey accuracy by length from greedy generation (YaRN's measure), and
  `passkey_ll_wide.csv` by log-likelihood ranking (passkey.json `by_length`).

Runs without the metric are left out (summary.md lists them); a mean row `<phase>/<config>/mean`
averages the seeds that have each length.
"""
from __future__ import annotations

import csv
from pathlib import Path

from opskit.results.aggregate import Report
from opskit.results.artifacts import RunArtifacts

PPL_WIDE_CSV = "ppl_wide.csv"
PASSKEY_WIDE_CSV = "passkey_wide.csv"
PASSKEY_LL_WIDE_CSV = "passkey_ll_wide.csv"


def sliding_wide_csv(stride: int) -> str:
    return f"ppl_sliding{stride}_wide.csv"


def sliding_ppl(run: RunArtifacts, stride: int) -> dict[int, float]:
    section = (run.eval_per_length or {}).get("sliding") or {}
    if section.get("stride") != stride:
        return {}
    return {int(n): float(r["ppl"]) for n, r in (section.get("lengths") or {}).items() if not r.get("skipped")}


def passkey_accuracy(run: RunArtifacts, key: str) -> dict[int, float]:
    by_length = (run.passkey or {}).get("by_length") or {}
    return {int(n): float(r[key]) for n, r in by_length.items() if r.get(key) is not None}


def wide_rows(report: Report, values_of) -> tuple[list[int], list[list]]:
    """(lengths, rows): rows are [label, value per length or None], runs of a config then its mean."""
    per_run = [(r, values_of(r)) for r in report.runs]
    per_run = [(r, v) for r, v in per_run if v]
    lengths = sorted({n for _, v in per_run for n in v})
    rows = []
    for key in sorted({(r.phase, r.config) for r, _ in per_run}):
        group = [(r, v) for r, v in per_run if (r.phase, r.config) == key]
        rows += [[r.name] + [v.get(n) for n in lengths] for r, v in group]
        means = []
        for n in lengths:
            have = [v[n] for _, v in group if n in v]
            means.append(sum(have) / len(have) if have else None)
        rows.append([f"{key[0]}/{key[1]}/mean"] + means)
    return lengths, rows


def write_wide(path: Path, lengths: list[int], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run"] + [str(n) for n in lengths])
        writer.writerows([[row[0]] + ["" if x is None else repr(float(x)) for x in row[1:]] for row in rows])


def write_wide_tables(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write the wide CSVs that have data; {table name: path}. ppl_wide.csv is always written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {"ppl_wide_csv": (PPL_WIDE_CSV, lambda r: r.ppl if r.state == "done" else {})}
    strides = sorted({(r.eval_per_length or {}).get("sliding", {}).get("stride") for r in report.runs} - {None})
    for stride in strides:
        tables[f"ppl_sliding{stride}_wide_csv"] = (sliding_wide_csv(stride), lambda r, s=stride: sliding_ppl(r, s))
    tables["passkey_wide_csv"] = (PASSKEY_WIDE_CSV, lambda r: passkey_accuracy(r, "gen_acc"))
    tables["passkey_ll_wide_csv"] = (PASSKEY_LL_WIDE_CSV, lambda r: passkey_accuracy(r, "ll_acc"))
    paths = {}
    for name, (filename, values_of) in tables.items():
        lengths, rows = wide_rows(report, values_of)
        if rows or name == "ppl_wide_csv":
            write_wide(out_dir / filename, lengths, rows)
            paths[name] = out_dir / filename
    return paths
