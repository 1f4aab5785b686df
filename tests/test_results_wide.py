"""The wide CSVs of `report` (YaRN's layout) on the hand-made fixture runs, numbers checked by hand."""
import csv
import json
import shutil
from pathlib import Path

import pytest

from opskit.results.report import collect, make_report
from opskit.results.wide import write_wide_tables
from opskit.store import Store

FIXTURES = Path(__file__).parent / "fixtures" / "results"
GEO, HYB = "geo_500k", "hybrid_a0.2_t100k"


def read(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    rows = list(csv.reader(path.open()))
    return rows[0], {r[0]: r[1:] for r in rows[1:]}


@pytest.fixture
def raw(tmp_path):
    shutil.copytree(FIXTURES / "raw", tmp_path / "raw")
    return tmp_path


def report(tmp_path):
    return make_report(tmp_path, "fx", Store(tmp_path / "state.db"), FIXTURES / "configs")


def test_ppl_wide_one_row_per_run_and_config_mean(raw):
    out = report(raw)
    header, rows = read(out.tables["ppl_wide_csv"])
    assert header == ["run", "2048", "4096", "16384", "32768"]
    assert list(rows) == [f"fx/{GEO}/s42", f"fx/{GEO}/s123", f"fx/{GEO}/mean",
                          f"fx/{HYB}/s7", f"fx/{HYB}/s42", f"fx/{HYB}/s123", f"fx/{HYB}/mean"]
    assert [float(x) for x in rows[f"fx/{GEO}/s123"]] == [12.0, 13.0, 34.0, 70.0]
    assert [float(x) for x in rows[f"fx/{GEO}/mean"]] == [11.0, 12.0, 32.0, 65.0]
    assert rows[f"fx/{HYB}/s7"][3] == ""  # 32K was skipped for seed 7
    assert float(rows[f"fx/{HYB}/mean"][3]) == pytest.approx(32.0)  # the mean of the seeds that have it
    assert float(rows[f"fx/{HYB}/mean"][0]) == pytest.approx((10.8 + 10.2 + 10.5) / 3)
    # failed and missing runs have no row; the long-format tables are still there
    assert not any("anchpoly" in name for name in rows)
    assert out.tables["runs_csv"].exists() and "passkey_wide_csv" not in out.tables
    assert json.dumps(out.to_json())  # the new tables are listed in --json


def test_sliding_and_passkey_wide_tables(raw):
    geo42 = raw / "raw" / "fx" / GEO / "seed42"
    evals = json.loads((geo42 / "eval_per_length.json").read_text())
    evals["sliding"] = {"stride": 256, "lengths": {"2048": {"loss": 2.2, "ppl": 9.0, "stride": 256, "windows": 73,
                                                            "tokens": 20480},
                                                   "32768": {"skipped": True, "reason": "need more"}}}
    (geo42 / "eval_per_length.json").write_text(json.dumps(evals))
    for seed, gen, ll in ((42, (1.0, 0.5), (1.0, 1.0)), (123, (0.5, 0.0), (1.0, 0.5))):
        d = raw / "raw" / "fx" / GEO / f"seed{seed}"
        (d / "passkey.json").write_text(json.dumps({
            "lengths": [2048, 8192], "by_length": {"2048": {"gen_acc": gen[0], "ll_acc": ll[0]},
                                                    "8192": {"gen_acc": gen[1], "ll_acc": ll[1]}}}))
    tables = write_wide_tables(collect(raw, "fx", None, FIXTURES / "configs"), raw / "processed")

    header, rows = read(tables["ppl_sliding256_wide_csv"])
    assert tables["ppl_sliding256_wide_csv"].name == "ppl_sliding256_wide.csv"
    assert header == ["run", "2048"] and rows == {f"fx/{GEO}/s42": ["9.0"], f"fx/{GEO}/mean": ["9.0"]}

    header, rows = read(tables["passkey_wide_csv"])
    assert header == ["run", "2048", "8192"]
    assert rows == {f"fx/{GEO}/s42": ["1.0", "0.5"], f"fx/{GEO}/s123": ["0.5", "0.0"], f"fx/{GEO}/mean": ["0.75", "0.25"]}
    _, rows = read(tables["passkey_ll_wide_csv"])
    assert rows[f"fx/{GEO}/mean"] == ["1.0", "0.75"]
