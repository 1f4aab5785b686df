"""Aggregation, tables and figures on the hand-made fixture runs under tests/fixtures/results/raw/fx."""
import csv
import math
import shutil
from pathlib import Path

import pytest

from opskit.results.aggregate import stat
from opskit.results.report import make_report
from opskit.results.spectrum_risk import frequency_risk
from opskit.store import Store

FIXTURES = Path(__file__).parent / "fixtures" / "results"
CONFIGS = FIXTURES / "configs"
GEO, HYB, ANCH = "geo_500k", "hybrid_a0.2_t100k", "anchpoly_p3.9_omf0.3_t500k"


@pytest.fixture
def out(tmp_path):
    shutil.copytree(FIXTURES / "raw", tmp_path / "raw")
    return make_report(tmp_path, "fx", Store(tmp_path / "state.db"), CONFIGS)


def test_population_std_by_hand():
    s = stat([10.2, 10.5, 10.8])
    assert s.mean == pytest.approx(10.5)
    assert s.std == pytest.approx(math.sqrt((0.09 + 0 + 0.09) / 3))  # ddof=0, not the sample std
    assert s.n == 3


def test_summary_numbers_checked_by_hand(out):
    geo, hyb = out.report.summary("fx", GEO), out.report.summary("fx", HYB)
    assert geo.seeds == [42, 123] and hyb.seeds == [7, 42, 123]
    # geo: PPL@2K 10, 12 -> 11 ± 1; PPL@16K 30, 34 -> 32 ± 2; final loss 2.30, 2.40 -> 2.35 ± 0.05
    assert (geo.ppl[2048].mean, geo.ppl[2048].std) == pytest.approx((11.0, 1.0))
    assert (geo.ppl[16384].mean, geo.ppl[16384].std) == pytest.approx((32.0, 2.0))
    assert (geo.final_loss.mean, geo.final_loss.std) == pytest.approx((2.35, 0.05))
    # hybrid: PPL@16K 20, 22, 27 -> 23 ± sqrt(26/3); seed 7 skipped 32K -> 32 ± 1 over n=2
    assert (hyb.ppl[16384].mean, hyb.ppl[16384].std) == pytest.approx((23.0, math.sqrt(26 / 3)))
    assert (hyb.ppl[32768].mean, hyb.ppl[32768].std, hyb.ppl[32768].n) == pytest.approx((32.0, 1.0, 2))
    assert out.report.summary("fx", ANCH).n == 0


def test_missing_and_failed_runs_are_listed(out):
    states = {r.name: r.state for r in out.report.not_done}
    assert states == {f"fx/{ANCH}/s42": "failed", f"fx/{ANCH}/s123": "missing", f"fx/{ANCH}/s7": "missing",
                      f"fx/{GEO}/s7": "missing"}
    md = out.tables["summary_md"].read_text()
    for name, state in states.items():
        assert f"- `{name}`: {state}" in md
    assert "32.00 ± 1.00 (n=2)" in md  # a metric fewer seeds reported is marked, not hidden


def test_csv_tables(out):
    runs = list(csv.DictReader(out.tables["runs_csv"].open()))
    assert len(runs) == 9
    row = next(r for r in runs if r["config"] == GEO and r["seed"] == "123")
    # This run's results.json has tokens_per_s_steady (1100) and _wall (700): the steady figure is reported.
    assert (row["state"], float(row["ppl@2048"]), float(row["final_loss"]), int(row["tokens"]), float(row["tokens_per_s"])) == \
        ("done", 12.0, 2.4, 16384, 1100.0)
    assert next(r for r in runs if r["config"] == ANCH and r["seed"] == "42")["ppl@2048"] == ""
    summary = {r["config"]: r for r in csv.DictReader(out.tables["summary_csv"].open())}
    assert float(summary[GEO]["ppl@16384_mean"]) == pytest.approx(32.0)
    assert float(summary[GEO]["ppl@16384_std"]) == pytest.approx(2.0)
    assert summary[HYB]["n_seeds"] == "3" and summary[HYB]["ppl@32768_n"] == "2"


def _png(path: Path) -> bool:
    return path.stat().st_size > 5000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_six_figures_match_the_tables(out):
    figs = {f.name: f for f in out.figures}
    assert len(figs) == 6 and all(f.path and _png(f.path) for f in figs.values())
    geo, hyb = out.report.summary("fx", GEO), out.report.summary("fx", HYB)
    # (1) the curve ends at the mean final loss of the seeds
    assert figs["fig1_train_loss"].data[GEO]["mean"][-1] == pytest.approx(geo.final_loss.mean)
    assert figs["fig1_train_loss"].data[HYB]["n"] == 3
    # (2) every point is the table's mean
    assert figs["fig2_ppl_vs_length"].data[HYB] == pytest.approx({x: st.mean for x, st in hyb.ppl.items()})
    # (3) bars at 16K
    bars = figs["fig3_ppl_long_bars"].data
    assert bars["length"] == 16384 and (bars[GEO]["mean"], bars[GEO]["std"], bars[GEO]["n"]) == pytest.approx((32.0, 2.0, 2))
    # (4) short-vs-long
    assert figs["fig4_short_vs_long"].data[HYB] == pytest.approx({"x": 10.5, "y": 23.0})
    # (5) downstream: geo hellaswag 0.30, 0.32 -> 0.31
    assert figs["fig5_downstream"].data[GEO]["hellaswag"] == pytest.approx(0.31)
    assert figs["fig5_downstream"].data[HYB] == pytest.approx({"hellaswag": 0.31, "arc_easy": 0.45})
    # (6) the surrogate from the spectrum (1.5B preset: head_dim 128, trained at 2048)
    risk = figs["fig6_frequency_risk"].data
    assert risk[GEO] == pytest.approx({"risk": frequency_risk(GEO, 128, 2048), "ppl": 32.0})
    assert 0 < risk[HYB]["risk"] < risk[GEO]["risk"] < 1


def test_frequency_risk_by_hand():
    # geo_THETA: w_k = THETA^(-k/K); wavelength 2*pi/w_k > L  <=>  k > K * ln(L / 2pi) / ln(THETA)
    K, theta, L = 64, 500_000.0, 2048
    expected = sum(k > K * math.log(L / (2 * math.pi)) / math.log(theta) for k in range(K)) / K
    assert frequency_risk("geo_500k", 2 * K, L) == pytest.approx(expected)
    assert frequency_risk("geo_500k", 128, 10**9) == 0.0


def test_skipped_figure_is_noted(tmp_path):
    shutil.copytree(FIXTURES / "raw", tmp_path / "raw")
    for p in (tmp_path / "raw").rglob("downstream.json"):
        p.unlink()
    out = make_report(tmp_path, "fx", None, CONFIGS)
    fig5 = next(f for f in out.figures if f.name == "fig5_downstream")
    assert fig5.path is None and "skipped" in fig5.note
    assert not (tmp_path / "processed" / "figures" / "fig5_downstream.png").exists()
    assert "fig5_downstream: skipped" in out.tables["summary_md"].read_text()


def test_report_without_runs_is_a_clear_error(tmp_path):
    from opskit.results.report import ReportError

    with pytest.raises(ReportError, match="no runs under"):
        make_report(tmp_path, None, None, CONFIGS)


def test_report_never_imports_torch(tmp_path):
    import subprocess
    import sys

    shutil.copytree(FIXTURES / "raw", tmp_path / "raw")
    code = ("import sys; from pathlib import Path; from opskit.results.report import make_report; "
            "import opskit.results.publish, opskit.results.scaling, opskit.results.legacy_import; "
            f"make_report(Path({str(tmp_path)!r}), 'fx', None, Path({str(CONFIGS)!r})); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_store_runs_never_pulled_are_listed(tmp_path):
    shutil.copytree(FIXTURES / "raw", tmp_path / "raw")
    store = Store(tmp_path / "state.db")
    store.upsert_run({"name": "fx/geo_500k/s7", "phase": "fx", "config": "geo_500k", "seed": 7,
                      "target": "local", "state": "training"}, reason="test")
    out = make_report(tmp_path, "fx", store, CONFIGS)
    assert {r.name: r.state for r in out.report.not_done}["fx/geo_500k/s7"] == "training"
