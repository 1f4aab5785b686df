"""The six figures of the 1.5B plan, as PNG. Each function returns the numbers it plotted, so the
figures can be checked against the tables. matplotlib is imported lazily (Agg, no pyplot)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opskit.results.aggregate import Report, length_label, stat
from opskit.results.spectrum_risk import run_risk

SHORT_LENGTH = 2048
LONG_LENGTH = 16384
DOWNSTREAM_METRIC = "acc"


@dataclass
class FigureResult:
    name: str
    path: Path | None  # None: skipped, `note` says why
    note: str = ""
    data: dict = field(default_factory=dict)


def _figure(nrows: int = 1, ncols: int = 1, size=(7.0, 4.5)):
    from matplotlib.figure import Figure  # Agg canvas; no pyplot global state

    fig = Figure(figsize=size, dpi=120, layout="constrained")
    return fig, fig.subplots(nrows, ncols)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _colors(report: Report) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    labels = [report.label(s.phase, s.config) for s in report.summaries]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def short_length(report: Report) -> int | None:
    return SHORT_LENGTH if SHORT_LENGTH in report.lengths else (min(report.lengths) if report.lengths else None)


def long_length(report: Report) -> int | None:
    return LONG_LENGTH if LONG_LENGTH in report.lengths else (max(report.lengths) if report.lengths else None)


def _skip(name: str, why: str) -> FigureResult:
    return FigureResult(name=name, path=None, note=f"{name}: skipped, {why}")


# ---------------------------------------------------------------- (1) train loss vs tokens


def loss_curves(report: Report, out_dir: Path) -> FigureResult:
    name = "fig1_train_loss"
    colors, data = _colors(report), {}
    fig, ax = _figure()
    for s in report.summaries:
        curves = [r.loss_curve for r in report.done if (r.phase, r.config) == (s.phase, s.config) and r.loss_curve]
        if not curves:
            continue
        label = report.label(s.phase, s.config)
        end = min(c[-1]["tokens"] for c in curves)
        grid = np.array([p["tokens"] for p in curves[0] if p["tokens"] <= end], dtype=float)
        ys = np.array([np.interp(grid, [p["tokens"] for p in c], [p["loss"] for p in c]) for c in curves])
        mean, std = ys.mean(axis=0), ys.std(axis=0)
        ax.plot(grid, mean, color=colors[label], label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(grid, mean - std, mean + std, color=colors[label], alpha=0.25, linewidth=0)
        data[label] = {"tokens": grid.tolist(), "mean": mean.tolist(), "n": len(curves)}
    if not data:
        return _skip(name, "no run has a loss curve (imported runs record PPL only)")
    ax.set(xlabel="training tokens", ylabel="train loss (nats/token)", title="Train loss vs tokens (band: ±1 std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return FigureResult(name, _save(fig, out_dir / f"{name}.png"), data=data)


# ---------------------------------------------------------------- (2) PPL vs eval length


def ppl_vs_length(report: Report, out_dir: Path) -> FigureResult:
    name = "fig2_ppl_vs_length"
    colors, data = _colors(report), {}
    fig, ax = _figure()
    for s in report.summaries:
        if not s.ppl:
            continue
        label = report.label(s.phase, s.config)
        xs = sorted(s.ppl)
        ax.errorbar(xs, [s.ppl[x].mean for x in xs], yerr=[s.ppl[x].std for x in xs], marker="o", capsize=3,
                    color=colors[label], label=f"{label} (n={s.n})")
        data[label] = {x: s.ppl[x].mean for x in xs}
    if not data:
        return _skip(name, "no run has perplexities")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xticks(report.lengths, [length_label(x) for x in report.lengths])
    ax.set(xlabel="evaluation length (tokens)", ylabel="perplexity (log scale)", title="Perplexity vs evaluation length (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return FigureResult(name, _save(fig, out_dir / f"{name}.png"), data=data)


# ---------------------------------------------------------------- (3) PPL@16K bars


def long_ppl_bars(report: Report, out_dir: Path) -> FigureResult:
    length = long_length(report)
    name = "fig3_ppl_long_bars"
    if length is None:
        return _skip(name, "no run has perplexities")
    colors = _colors(report)
    rows = [(report.label(s.phase, s.config), s.ppl[length]) for s in report.summaries if length in s.ppl]
    fig, ax = _figure()
    xs = np.arange(len(rows))
    ax.bar(xs, [st.mean for _, st in rows], yerr=[st.std for _, st in rows], capsize=4,
           color=[colors[label] for label, _ in rows])
    ax.set_xticks(xs, [f"{label}\n(n={st.n})" for label, st in rows], fontsize=8, rotation=15)
    ax.set(ylabel=f"perplexity at {length_label(length)} tokens", title=f"PPL@{length_label(length)} (mean ± std over seeds)")
    ax.grid(alpha=0.3, axis="y")
    data = {"length": length, **{label: {"mean": st.mean, "std": st.std, "n": st.n} for label, st in rows}}
    return FigureResult(name, _save(fig, out_dir / f"{name}.png"), data=data)


# ---------------------------------------------------------------- (4) short vs long scatter


def short_vs_long(report: Report, out_dir: Path) -> FigureResult:
    name = "fig4_short_vs_long"
    short, long = short_length(report), long_length(report)
    if short is None or short == long:
        return _skip(name, "needs perplexities at two evaluation lengths")
    colors, data = _colors(report), {}
    fig, ax = _figure(size=(6.0, 5.0))
    for s in report.summaries:
        if short not in s.ppl or long not in s.ppl:
            continue
        label = report.label(s.phase, s.config)
        x, y = s.ppl[short], s.ppl[long]
        ax.errorbar(x.mean, y.mean, xerr=x.std, yerr=y.std, marker="o", capsize=3, color=colors[label], label=label)
        data[label] = {"x": x.mean, "y": y.mean}
    if not data:
        return _skip(name, f"no config has both PPL@{length_label(short)} and PPL@{length_label(long)}")
    ax.set(xlabel=f"PPL@{length_label(short)} (short context)", ylabel=f"PPL@{length_label(long)} (long context)",
           title="Short- vs long-context perplexity (lower-left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return FigureResult(name, _save(fig, out_dir / f"{name}.png"), data={"short": short, "long": long, **data})


# ---------------------------------------------------------------- (5) downstream grouped bars


def downstream_bars(report: Report, out_dir: Path) -> FigureResult:
    name = "fig5_downstream"
    scores: dict[str, dict[str, list[float]]] = {}
    for r in report.runs:
        for task, metrics in ((r.downstream or {}).get("tasks") or {}).items():
            if metrics.get(DOWNSTREAM_METRIC) is not None:
                scores.setdefault(report.label(r.phase, r.config), {}).setdefault(task, []).append(float(metrics[DOWNSTREAM_METRIC]))
    if not scores:
        return _skip(name, "no downstream.json (p2 results) among these runs")
    tasks = sorted({t for per in scores.values() for t in per})
    colors = _colors(report)
    fig, ax = _figure(size=(8.0, 4.5))
    width = 0.8 / len(scores)
    data = {}
    for i, (label, per) in enumerate(sorted(scores.items())):
        stats = [stat(per.get(t, [])) for t in tasks]
        xs = np.arange(len(tasks)) + (i - (len(scores) - 1) / 2) * width
        ax.bar(xs, [st.mean if st else 0 for st in stats], width, yerr=[st.std if st else 0 for st in stats],
               capsize=3, color=colors.get(label), label=label)
        data[label] = {t: st.mean for t, st in zip(tasks, stats) if st}
    ax.set_xticks(np.arange(len(tasks)), tasks, fontsize=8, rotation=15)
    ax.set(ylabel=f"{DOWNSTREAM_METRIC} (0–1)", title="Downstream scores (mean ± std over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return FigureResult(name, _save(fig, out_dir / f"{name}.png"), data=data)


# ---------------------------------------------------------------- (6) frequency risk vs PPL@16K


def risk_vs_long_ppl(report: Report, out_dir: Path) -> FigureResult:
    name = "fig6_frequency_risk"
    length = long_length(report)
    if length is None:
        return _skip(name, "no run has perplexities")
    colors, data, unknown = _colors(report), {}, []
    fig, ax = _figure(size=(6.0, 5.0))
    for s in report.summaries:
        runs = [r for r in report.done if (r.phase, r.config) == (s.phase, s.config)]
        if length not in s.ppl or not runs:
            continue
        label = report.label(s.phase, s.config)
        risk = run_risk(runs[0])
        if risk is None:
            unknown.append(label)
            continue
        st = s.ppl[length]
        ax.errorbar(risk, st.mean, yerr=st.std, marker="o", capsize=3, color=colors[label], label=label)
        data[label] = {"risk": risk, "ppl": st.mean}
    if not data:
        return _skip(name, "no config with a known spectrum, head_dim and training length")
    ax.set(xlabel="frequency risk: share of frequencies with wavelength > training length",
           ylabel=f"PPL@{length_label(length)}", title="Frequency-risk surrogate vs long-context perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    note = f"{name}: no spectrum info for {', '.join(unknown)}" if unknown else ""
    return FigureResult(name, _save(fig, out_dir / f"{name}.png"), note=note, data={"length": length, **data})


ALL = (loss_curves, ppl_vs_length, long_ppl_bars, short_vs_long, downstream_bars, risk_vs_long_ppl)


def make_figures(report: Report, out_dir: Path) -> list[FigureResult]:
    return [make(report, Path(out_dir)) for make in ALL]
