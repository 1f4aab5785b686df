"""Scaling fits recover known exponents from noisy synthetic points; the report reads run results."""
import json
from pathlib import Path

import numpy as np
import pytest

from opskit.results.artifacts import load_runs
from opskit.results.scaling import ScalingError, fit_power_law, make_scaling_report

# tolerance: with 0.5 % multiplicative noise on 8 points over three decades, b within ±0.02 and c within ±0.15
B_TOL, C_TOL = 0.02, 0.15


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_parameter_exponent(seed):
    rng = np.random.default_rng(seed)
    n = np.geomspace(1e6, 1e9, 8)
    loss = (1.8 + 400.0 * n ** -0.30) * (1 + 0.005 * rng.standard_normal(n.size))
    fit = fit_power_law(n, loss)
    assert abs(fit.b - 0.30) < B_TOL and abs(fit.c - 1.8) < C_TOL
    assert fit.ci["b"][0] < fit.b < fit.ci["b"][1] and fit.r2 > 0.999
    assert fit.ci["a"][0] < fit.a < fit.ci["a"][1]


def test_fit_recovers_data_exponent_and_extrapolates():
    rng = np.random.default_rng(7)
    d = np.geomspace(1e7, 1e10, 8)
    law = lambda x: 1.9 + 1000.0 * x ** -0.28  # noqa: E731
    fit = fit_power_law(d, law(d) * (1 + 0.005 * rng.standard_normal(d.size)))
    assert abs(fit.b - 0.28) < B_TOL and abs(fit.c - 1.9) < C_TOL
    lo, hi = fit.interval([1e11])
    assert lo[0] < law(1e11) < hi[0]  # the truth lies in the band 10x past the data
    assert abs(fit.predict([1e11])[0] - law(1e11)) < 0.1


def test_too_few_points():
    with pytest.raises(ScalingError, match="at least 4 distinct sizes"):
        fit_power_law([1e6, 1e7, 1e8], [4.0, 3.0, 2.5])


def write_run(raw: Path, phase: str, config: str, seed: int, params: int, tokens: int, loss: float) -> None:
    d = raw / phase / config / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"phase": phase, "config": config, "seed": seed, "params": params,
                                                "tokens_seen": tokens, "final_train_loss": loss, "ppl": {}}))
    curve = [{"step": i, "tokens": tokens * i // 4, "loss": loss + 4.0 / (1 + i)} for i in range(5)]
    (d / "loss_curve.jsonl").write_text("\n".join(json.dumps(p) for p in curve) + "\n")


def test_scaling_report_from_runs(tmp_path):
    raw = tmp_path / "raw"
    rng = np.random.default_rng(3)
    sizes = [2e6, 5e6, 1.2e7, 3e7, 7e7, 1.5e8]
    for n in sizes:  # size series at 1e9 tokens, two seeds each
        for seed in (1, 2):
            write_run(raw, "size", f"n{int(n)}", seed, int(n), 1_000_000_000,
                      (2.0 + 300.0 * n ** -0.32) * (1 + 0.003 * rng.standard_normal()))
    for d in [1e7, 3e7, 1e8, 3e8, 1e9, 3e9]:  # data series at 5M params
        write_run(raw, "data", f"d{int(d)}", 1, 5_000_000, int(d), 2.4 + 800.0 * d ** -0.3 * (1 + 0.003 * rng.standard_normal()))
    rep = make_scaling_report(load_runs(raw), tmp_path / "processed", sizes=(1.5e9,), tokens=(3e10,))
    # the data run at 5M params and 1e9 tokens is also a point of the size series
    assert rep.size.x == sizes and rep.size.seeds == [2, 3, 2, 2, 2, 2]
    assert rep.data.fixed == 5e6 and len(rep.data.x) == 6
    assert abs(rep.size_fit.b - 0.32) < 0.05 and abs(rep.data_fit.b - 0.3) < 0.05
    assert [e["axis"] for e in rep.extrapolations] == ["params", "tokens"]
    png = tmp_path / "processed" / "figures" / "scaling_2x2.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20000
    saved = json.loads((tmp_path / "processed" / "scaling.json").read_text())
    assert saved["size_fit"]["b"] == pytest.approx(rep.size_fit.b)
    assert "L(N) =" in (tmp_path / "processed" / "scaling.md").read_text()


def test_scaling_report_without_series(tmp_path):
    write_run(tmp_path / "raw", "p", "a", 1, 1000, 1000, 3.0)
    with pytest.raises(ScalingError, match="no scaling series"):
        make_scaling_report(load_runs(tmp_path / "raw"), tmp_path / "processed")
