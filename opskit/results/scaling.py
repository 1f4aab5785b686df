"""Scaling-law fits: L(N) = c + a / N^b over model size and L(D) = c + a / D^b over training tokens,
with R^2, confidence intervals, extrapolation and the 2x2 figure (`opskit report --scaling`).

A run's loss is the validation loss at its training length (ln PPL@seq_len) when evaluated there,
else its final train loss; seeds of one point are averaged. The size series is the largest set of
runs that share a token count and differ in params; the data series shares params and varies tokens.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from opskit.errors import OpsError
from opskit.results.aggregate import stat
from opskit.results.artifacts import RunArtifacts
from opskit.states import DONE

MIN_POINTS = 4  # 3 parameters + at least one degree of freedom for the intervals
DEFAULT_SIZES = (1.5e9, 7e9)
DEFAULT_TOKENS = (3e10, 1e11)


class ScalingError(OpsError):
    pass


@dataclass
class PowerLawFit:
    """y = c + a * x^-b, fitted as c + A * (x/x0)^-b for conditioning (a = A * x0^b)."""

    c: float
    a: float
    b: float
    r2: float
    n: int
    level: float
    ci: dict[str, tuple[float, float]]
    x0: float
    cov: list[list[float]]  # covariance of (c, ln A, b)

    def predict(self, x) -> np.ndarray:
        return self.c + self.a * np.asarray(x, dtype=float) ** (-self.b)

    def interval(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Confidence band of the fitted curve at x (delta method)."""
        x = np.asarray(x, dtype=float)
        big_a = self.a / self.x0 ** self.b
        term = big_a * (x / self.x0) ** (-self.b)
        grad = np.stack([np.ones_like(x), term, -term * np.log(x / self.x0)], axis=-1)
        se = np.sqrt(np.einsum("...i,ij,...j->...", grad, np.array(self.cov), grad))
        t = _t_quantile(self.level, self.n - 3)
        y = self.predict(x)
        return y - t * se, y + t * se

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "cov"}


def _t_quantile(level: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, max(dof, 1)))


def fit_power_law(x, y, level: float = 0.95) -> PowerLawFit:
    """Least-squares fit of y = c + a x^-b (0 <= c < min y), starting from the best log-linear fit over a grid of c."""
    from scipy.optimize import curve_fit

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(x)) < MIN_POINTS:
        raise ScalingError(f"a power-law fit needs at least {MIN_POINTS} distinct sizes, got {len(np.unique(x))}")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ScalingError("scaling fits need positive sizes and losses")
    x0 = float(np.exp(np.log(x).mean()))
    lx = np.log(x / x0)

    def model(lx_, c, log_a, b):
        return c + np.exp(log_a - b * lx_)

    best = None
    for c in np.linspace(0.0, y.min() * 0.999, 200):
        slope, intercept = np.polyfit(lx, np.log(y - c), 1)
        sse = float(np.sum((model(lx, c, intercept, -slope) - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, (c, intercept, -slope))
    try:
        params, cov = curve_fit(model, lx, y, p0=best[1], maxfev=20000)
    except RuntimeError as e:
        raise ScalingError(f"power-law fit did not converge: {e}") from None
    c, log_a, b = (float(p) for p in params)
    resid = y - model(lx, *params)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else 1.0
    t = _t_quantile(level, len(x) - 3)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    a = math.exp(log_a) * x0 ** b
    # ln a = ln A + b ln x0
    var_ln_a = cov[1, 1] + math.log(x0) ** 2 * cov[2, 2] + 2 * math.log(x0) * cov[1, 2]
    se_ln_a = math.sqrt(max(var_ln_a, 0.0))
    ci = {"c": (float(c - t * se[0]), float(c + t * se[0])), "b": (float(b - t * se[2]), float(b + t * se[2])),
          "a": (a * math.exp(-t * se_ln_a), a * math.exp(t * se_ln_a))}
    return PowerLawFit(c=c, a=a, b=b, r2=r2, n=len(x), level=level, ci=ci, x0=x0, cov=cov.tolist())


# ---------------------------------------------------------------- runs -> points


def run_loss(run: RunArtifacts) -> float | None:
    if run.train_len and run.train_len in run.ppl:
        return math.log(run.ppl[run.train_len])
    loss = (run.results or {}).get("final_train_loss")
    return float(loss) if loss is not None else None


def _key(value: float) -> float:
    """Round to 3 significant digits, so token counts that differ by a partial batch group together."""
    return float(f"{value:.3g}")


@dataclass
class Series:
    axis: str  # "params" or "tokens"
    fixed: float  # the other axis's value
    x: list[float]
    loss_mean: list[float]
    loss_std: list[float]
    seeds: list[int]
    runs: dict[float, list[RunArtifacts]]


def _series(runs: list[RunArtifacts], axis: str) -> Series | None:
    other = "tokens_seen" if axis == "params" else "params"
    field = "params" if axis == "params" else "tokens_seen"
    groups: dict[float, dict[float, list[RunArtifacts]]] = {}
    for r in runs:
        groups.setdefault(_key(r.results[other]), {}).setdefault(_key(r.results[field]), []).append(r)
    if not groups:
        return None
    fixed, points = max(groups.items(), key=lambda kv: (len(kv[1]), kv[0]))
    if len(points) < 2:
        return None
    xs = sorted(points)
    stats = [stat([run_loss(r) for r in points[x]]) for x in xs]
    return Series(axis=axis, fixed=fixed, x=xs, loss_mean=[s.mean for s in stats], loss_std=[s.std for s in stats],
                  seeds=[s.n for s in stats], runs=points)


def scaling_series(runs: list[RunArtifacts]) -> tuple[Series | None, Series | None]:
    usable = [r for r in runs if r.state == DONE and (r.results or {}).get("params")
              and (r.results or {}).get("tokens_seen") and run_loss(r) is not None]
    return _series(usable, "params"), _series(usable, "tokens")


# ---------------------------------------------------------------- report


@dataclass
class ScalingReport:
    size: Series | None
    data: Series | None
    size_fit: PowerLawFit | None
    data_fit: PowerLawFit | None
    extrapolations: list[dict]
    notes: list[str]
    figure: Path | None = None

    def to_json(self) -> dict:
        def series(s):
            return None if s is None else {"axis": s.axis, "fixed": s.fixed, "x": s.x, "loss_mean": s.loss_mean,
                                           "loss_std": s.loss_std, "seeds": s.seeds}
        return {"size_series": series(self.size), "data_series": series(self.data),
                "size_fit": self.size_fit.to_json() if self.size_fit else None,
                "data_fit": self.data_fit.to_json() if self.data_fit else None,
                "extrapolations": self.extrapolations, "notes": self.notes,
                "figure": str(self.figure) if self.figure else None}


def analyse(runs: list[RunArtifacts], sizes=DEFAULT_SIZES, tokens=DEFAULT_TOKENS, level: float = 0.95) -> ScalingReport:
    size, data = scaling_series(runs)
    notes, fits = [], {}
    for name, series in (("size", size), ("data", data)):
        if series is None:
            notes.append(f"{name} series: no runs that vary {'params' if name == 'size' else 'tokens'} at a fixed "
                         f"{'token count' if name == 'size' else 'model size'}")
            continue
        try:
            fits[name] = fit_power_law(series.x, series.loss_mean, level)
        except ScalingError as e:
            notes.append(f"{name} series: {e}")
    extrapolations = []
    for name, targets, axis in (("size", sizes, "params"), ("data", tokens, "tokens")):
        fit = fits.get(name)
        for x in targets if fit else ():
            lo, hi = fit.interval([x])
            extrapolations.append({"axis": axis, "x": x, "loss": float(fit.predict([x])[0]), "lo": float(lo[0]), "hi": float(hi[0])})
    return ScalingReport(size, data, fits.get("size"), fits.get("data"), extrapolations, notes)


def _fmt_fit(name: str, fit: PowerLawFit | None, var: str) -> str:
    if fit is None:
        return f"- {name}: no fit"
    pct = int(round(fit.level * 100))
    return (f"- {name}: L({var}) = {fit.c:.3f} + {fit.a:.4g} / {var}^{fit.b:.3f};  R² = {fit.r2:.4f};  n = {fit.n};  "
            f"{pct}% CI: c [{fit.ci['c'][0]:.3f}, {fit.ci['c'][1]:.3f}], b [{fit.ci['b'][0]:.3f}, {fit.ci['b'][1]:.3f}], "
            f"a [{fit.ci['a'][0]:.4g}, {fit.ci['a'][1]:.4g}]")


def markdown(rep: ScalingReport) -> str:
    lines = ["# Scaling laws", "", "Loss: ln PPL at the training length (else final train loss), mean over seeds.", "",
             "## Fits", "", _fmt_fit("parameters", rep.size_fit, "N"), _fmt_fit("data", rep.data_fit, "D"), ""]
    if rep.extrapolations:
        lines += ["## Extrapolations", "", "| axis | at | loss | CI |", "|---|---|---|---|"]
        lines += [f"| {e['axis']} | {e['x']:.3g} | {e['loss']:.3f} | [{e['lo']:.3f}, {e['hi']:.3f}] |" for e in rep.extrapolations]
        lines.append("")
    if rep.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in rep.notes] + [""]
    return "\n".join(lines)


def draw(rep: ScalingReport, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8.5), dpi=110, layout="constrained")
    axes = fig.subplots(2, 2)
    panels = ((axes[0, 0], rep.size, rep.size_fit, "params", "parameters N", f"tokens D = {rep.size.fixed:.3g}" if rep.size else ""),
              (axes[0, 1], rep.data, rep.data_fit, "tokens", "training tokens D", f"params N = {rep.data.fixed:.3g}" if rep.data else ""))
    for ax, series, fit, axis, xlabel, fixed in panels:
        ax.set(xscale="log", xlabel=xlabel, ylabel="loss (nats/token)")
        ax.grid(alpha=0.3, which="both")
        if series is None:
            ax.set_title(f"{xlabel}: no series")
            continue
        ax.errorbar(series.x, series.loss_mean, yerr=series.loss_std, fmt="o", color="C0", capsize=3, label="runs (mean ± std)")
        if fit:
            targets = [e["x"] for e in rep.extrapolations if e["axis"] == axis]
            grid = np.geomspace(min(series.x), max(series.x + targets), 200)
            lo, hi = fit.interval(grid)
            ax.plot(grid, fit.predict(grid), color="C1", label=f"fit: {fit.c:.2f} + {fit.a:.3g}/x^{fit.b:.3f} (R²={fit.r2:.3f})")
            ax.fill_between(grid, lo, hi, color="C1", alpha=0.2, linewidth=0, label=f"{int(fit.level * 100)}% CI")
            ext = [e for e in rep.extrapolations if e["axis"] == axis]
            if ext:
                ax.errorbar([e["x"] for e in ext], [e["loss"] for e in ext],
                            yerr=[[e["loss"] - e["lo"] for e in ext], [e["hi"] - e["loss"] for e in ext]],
                            fmt="s", color="C3", capsize=3, label="extrapolation")
        ax.set_title(f"Loss vs {xlabel} ({fixed})")
        ax.legend(fontsize=7)
    curve_panels = ((axes[1, 0], rep.size, "N"), (axes[1, 1], rep.data, "D"))
    for ax, series, var in curve_panels:
        ax.set(xlabel="training tokens", ylabel="train loss (nats/token)", xscale="log",
               title=f"Loss curves by {'model size' if var == 'N' else 'data'}")
        ax.grid(alpha=0.3, which="both")
        for i, x in enumerate(series.x if series else []):
            curve = next((r.loss_curve for r in series.runs[x] if r.loss_curve), None)
            if curve:
                pts = [p for p in curve if p["tokens"] > 0]
                ax.plot([p["tokens"] for p in pts], [p["loss"] for p in pts], color=f"C{i % 10}", label=f"{var} = {x:.3g}")
        if ax.lines:
            ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def make_scaling_report(runs: list[RunArtifacts], out_dir: Path, sizes=DEFAULT_SIZES, tokens=DEFAULT_TOKENS) -> ScalingReport:
    """Fit both laws, write scaling.md, scaling.json and figures/scaling_2x2.png under out_dir."""
    import json

    rep = analyse(runs, sizes, tokens)
    if rep.size is None and rep.data is None:
        raise ScalingError("no scaling series: need finished runs whose results.json have params and tokens_seen, "
                           "varying one at a fixed value of the other")
    out_dir = Path(out_dir)
    rep.figure = draw(rep, out_dir / "figures" / "scaling_2x2.png")
    (out_dir / "scaling.md").write_text(markdown(rep))
    (out_dir / "scaling.json").write_text(json.dumps(rep.to_json(), indent=1) + "\n")
    return rep
