"""Import of the earlier studies' two results schemas into results/raw/, and a report over both."""
import json
from pathlib import Path

import pytest

from opskit.results.artifacts import load_runs
from opskit.results.legacy_import import ImportError_, import_file
from opskit.results.report import make_report

FIXTURES = Path(__file__).parent / "fixtures" / "results"
SEARCH, FINAL = FIXTURES / "legacy_search.json", FIXTURES / "legacy_350m_final.json"


def test_search_schema(tmp_path):
    names = import_file(SEARCH, "search50m", tmp_path)
    assert len(names) == 9 and "search50m/geo_500k/s123" in names
    res = json.loads((tmp_path / "raw/search50m/geo_500k/seed123/results.json").read_text())
    assert res["imported_from"] == str(SEARCH)
    assert res["ppl"] == {"2048": 6.18, "4096": 7.21, "8192": 12.6}
    assert res["final_train_loss"] == 1.72  # from the matching row
    runs = load_runs(tmp_path / "raw", "search50m")
    assert all(r.state == "done" and not r.loss_curve for r in runs)


def test_final_schema_with_matrix(tmp_path):
    names = import_file(FINAL, "final350m", tmp_path, matrix="350m")
    assert names == ["final350m/geo_500k/s42", "final350m/hybrid_a0.2_t100k/s42",
                     "final350m/anchpoly_p3.9_omf0.3_t500k/s42"]
    d = tmp_path / "raw/final350m/hybrid_a0.2_t100k/seed42"
    res = json.loads((d / "results.json").read_text())
    assert res["ppl"]["16384"] == 8.95 and res["tokens_seen"] == 500_000_000 and res["seq_len"] == 2048
    assert res["preset"] == "350M" and res["imported_from"] == str(FINAL)
    ev = json.loads((d / "eval_per_length.json").read_text())
    assert ev["lengths"]["16384"] == pytest.approx({"ppl": 8.95, "loss": 2.19165, "std": 0.60, "chunks": 10}, abs=1e-4)


def test_old_and_new_in_one_report(tmp_path):
    import_file(SEARCH, "search50m", tmp_path)
    import_file(FINAL, "final350m", tmp_path, matrix="350m")
    out = make_report(tmp_path)
    s = out.report.summary("search50m", "hybrid_a0.2_t100k")
    assert s.n == 3 and s.ppl[2048].mean == pytest.approx((6.10 + 6.14 + 6.09) / 3)
    assert out.report.summary("final350m", "geo_500k").ppl[16384].mean == 19.4
    assert out.report.not_done == []
    figs = {f.name: f for f in out.figures}
    assert figs["fig1_train_loss"].path is None and "PPL only" in figs["fig1_train_loss"].note
    # head_dim 1024/16 = 64 from the imported model_cfg... via the 350M preset, trained at 2048
    assert set(figs["fig6_frequency_risk"].data) >= {"final350m/geo_500k", "final350m/hybrid_a0.2_t100k"}


def test_reimport_replaces_but_never_overwrites_others(tmp_path):
    import_file(SEARCH, "search50m", tmp_path)
    import_file(SEARCH, "search50m", tmp_path)  # same file again: fine
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"results": {"geo_500k": {"42": {"2048": 7.0}}}, "rows": []}))
    with pytest.raises(ImportError_, match="already exists \\(imported from .*legacy_search.json\\)"):
        import_file(other, "search50m", tmp_path)
    assert json.loads((tmp_path / "raw/search50m/geo_500k/seed42/results.json").read_text())["ppl"]["2048"] == 6.12


@pytest.mark.parametrize("content, match", [
    ({"runs": []}, "unknown results schema.*found: runs"),
    ([1, 2], "unknown results schema.*found: list"),
    ({"results": {"geo_500k": {"42": {"long": 5.0}}}, "rows": []}, "'long' is not an evaluation length"),
    ({"seed": 42, "experiments": {"geo_500k": {"2048": {"ppl": "n/a"}}}}, "expected a perplexity number"),
])
def test_unknown_shapes_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "weird.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ImportError_, match=match):
        import_file(path, "old", tmp_path)
    assert not (tmp_path / "raw").exists()
