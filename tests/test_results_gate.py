"""Gate decisions on crafted runs just inside and just outside 15 %, recorded in a real store."""
import json
from pathlib import Path

import pytest

from opskit.results.gate import GateError, apply_gate, phase_configs
from opskit.store import Store

CONFIGS = Path(__file__).parent / "fixtures" / "results" / "configs"
GEO, HYB, ANCH = "geo_500k", "hybrid_a0.2_t100k", "anchpoly_p3.9_omf0.3_t500k"


def write_run(results: Path, phase: str, config: str, seed: int, ppl_2k: float) -> None:
    d = results / "raw" / phase / config / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({
        "run": f"{phase}/{config}/s{seed}", "phase": phase, "config": config, "seed": seed, "preset": "1.5B",
        "params": 1_543_000_000, "tokens_seen": 1_000_000_000, "steps": 100, "final_train_loss": 2.5,
        "ppl": {"2048": ppl_2k, "16384": ppl_2k * 3}, "tokens_per_s": 90000.0}))


def crafted(results: Path, anch: tuple[float, float]) -> None:
    # best: hybrid, mean 10.0; geo mean 11.0 (+10 %); anchpoly as given
    for seed, (geo, hyb, an) in zip((42, 123), ((10.8, 9.9, anch[0]), (11.2, 10.1, anch[1]))):
        write_run(results, "g0", GEO, seed, geo)
        write_run(results, "g0", HYB, seed, hyb)
        write_run(results, "g0", ANCH, seed, an)


def test_just_inside_15_percent_goes_on(tmp_path):
    crafted(tmp_path, (11.48, 11.50))  # mean 11.49: +14.9 %
    store = Store(tmp_path / "state.db")
    decision = apply_gate(store, tmp_path / "raw", "g0", config_dir=CONFIGS)
    assert decision["best"] == HYB and decision["best_mean"] == pytest.approx(10.0)
    assert decision["threshold"] == pytest.approx(11.5)
    assert decision["survivors"] == [GEO, HYB, ANCH] and decision["dropped"] == []
    assert decision["configs"][ANCH]["rel_above_best"] == pytest.approx(0.149)
    assert store.latest_gate("fx", "g0")["survivors"] == [GEO, HYB, ANCH]


def test_just_outside_15_percent_is_dropped(tmp_path):
    crafted(tmp_path, (11.50, 11.52))  # mean 11.51: +15.1 %
    store = Store(tmp_path / "state.db")
    decision = apply_gate(store, tmp_path / "raw", "g0", config_dir=CONFIGS)
    assert decision["survivors"] == [GEO, HYB] and decision["dropped"] == [ANCH]
    assert decision["configs"][ANCH]["keep"] is False
    assert decision["configs"][ANCH]["mean"] == pytest.approx(11.51)
    recorded = store.latest_gate("fx", "g0")
    assert recorded["dropped"] == [ANCH] and recorded["configs"][GEO]["rel_above_best"] == pytest.approx(0.10)
    # the next phase runs the survivors
    assert phase_configs(store, "g1", "fx", config_dir=CONFIGS) == [GEO, HYB]


def test_exactly_15_percent_is_kept(tmp_path):
    crafted(tmp_path, (11.5, 11.5))
    decision = apply_gate(Store(tmp_path / "state.db"), tmp_path / "raw", "g0", config_dir=CONFIGS)
    assert ANCH in decision["survivors"]


def test_latest_decision_wins(tmp_path):
    crafted(tmp_path, (11.50, 11.52))
    store = Store(tmp_path / "state.db")
    apply_gate(store, tmp_path / "raw", "g0", config_dir=CONFIGS)
    for seed in (42, 123):  # the anchpoly runs are redone and pulled again, now within 15 %
        (tmp_path / "raw" / "g0" / ANCH / f"seed{seed}" / "results.json").unlink()
        (tmp_path / "raw" / "g0" / ANCH / f"seed{seed}").rmdir()
        write_run(tmp_path, "g0", ANCH, seed, 11.0)
    apply_gate(store, tmp_path / "raw", "g0", config_dir=CONFIGS)
    assert phase_configs(store, "g1", "fx", config_dir=CONFIGS) == [GEO, HYB, ANCH]


def test_missing_runs_refuse_the_gate(tmp_path):
    crafted(tmp_path, (11.0, 11.0))
    (tmp_path / "raw" / "g0" / ANCH / "seed123" / "results.json").unlink()
    store = Store(tmp_path / "state.db")
    with pytest.raises(GateError, match=rf"g0/{ANCH}/s123 \(no-results\)"):
        apply_gate(store, tmp_path / "raw", "g0", config_dir=CONFIGS)
    assert store.latest_gate("fx", "g0") is None
    decision = apply_gate(store, tmp_path / "raw", "g0", allow_incomplete=True, config_dir=CONFIGS)
    assert decision["incomplete"] == [f"g0/{ANCH}/s123 (no-results)"]
    assert decision["configs"][ANCH]["n"] == 1


def test_gated_phase_before_its_gate_is_an_error(tmp_path):
    with pytest.raises(GateError, match="opskit gate g0"):
        phase_configs(Store(tmp_path / "state.db"), "g1", "fx", config_dir=CONFIGS)
    assert phase_configs(Store(tmp_path / "state.db"), "g0", "fx", config_dir=CONFIGS) == [GEO, HYB, ANCH]


def test_phase_without_gate_rule(tmp_path):
    with pytest.raises(GateError, match="has no gate rule"):
        apply_gate(Store(tmp_path / "state.db"), tmp_path / "raw", "fx", config_dir=CONFIGS)
