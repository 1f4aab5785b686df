"""The experiment catalog: shipped matrices, phase expansion, validation errors with file and line."""
import textwrap

import pytest

from opskit import catalog
from opskit.errors import OpsError
from opskit.store import Store


def test_shipped_matrices_load_with_the_plans_numbers():
    ms = catalog.load_all()
    assert set(ms) >= {"1p5b", "50m", "350m", "demo"}
    m = ms["1p5b"]
    assert m.preset == "1.5B" and m.train["seq_len"] == 2048 and m.train["dtype"] == "bf16"
    assert (m.train["micro_batch"], m.train["grad_accum"], m.train["lr"], m.train["warmup_frac"]) == (4, 8, 3e-4, 0.02)
    assert [(s["dataset"], s["weight"]) for s in m.data["train"]] == [("fineweb", 0.70), ("slimpajama", 0.25), ("pg19", 0.05)]
    assert m.data["validation"] == {"dataset": "tinystories", "split": "validation", "max_tokens": 5_000_000}
    assert m.eval["lengths"] == [2048, 4096, 8192, 12288, 16384, 32768]
    assert m.configs["core"] == ("geo_500k", "hybrid_a0.2_t100k", "anchpoly_p3.9_omf0.3_t500k")
    assert m.configs["optional"] == ("geo_100k", "hybrid_a0.1_t100k", "hybrid_a0.3_t100k")
    assert m.seeds == (42, 123, 7)
    assert m.phases["p0"].gate == {"metric_length": 2048, "max_rel_above_best": 0.15}
    assert m.phases["p1"].from_gate == "p0" and m.phases["p2"].kind == "downstream"


def test_p0_expands_to_core_configs_at_a_tenth_of_the_budget():
    m, ph = catalog.resolve_phase("p0")
    runs = catalog.expand(m, ph)
    assert [r.name for r in runs] == ["p0/geo_500k/s42", "p0/hybrid_a0.2_t100k/s42", "p0/anchpoly_p3.9_omf0.3_t500k/s42"]
    assert all(r.settings["train_tokens"] == m.train["tokens"] // 10 for r in runs)
    assert runs[0].settings["eval"]["lengths"] == [2048, 16384]
    assert runs[1].settings["rope"] == {"spectrum": "hybrid_a0.2_t100k", "scaling": None}
    assert runs[0].settings["compile"] == "auto"  # the matrix is silent: compiled on CUDA, not on a CPU


def test_compile_setting_is_true_false_or_auto(tmp_path):
    src = (catalog.CONFIG_DIR / "demo.yaml").read_text()
    path = tmp_path / "c.yaml"
    path.write_text(src.replace("  log_every: 10", "  log_every: 10\n  compile: false"))
    m = catalog.load_matrix(str(path))
    assert catalog.expand(m, m.phases["demo"])[0].settings["compile"] is False
    bad = src.replace("  log_every: 10", "  log_every: 10\n  compile: 1")
    path.write_text(bad)
    with pytest.raises(OpsError, match=r"train.compile: must be true, false or auto"):
        catalog.load_matrix(str(path))


def test_p1_is_configs_times_all_seeds_and_demo_takes_config_and_seed():
    m, ph = catalog.resolve_phase("p1")
    runs = catalog.expand(m, ph, configs=["geo_500k", "hybrid_a0.2_t100k"])
    assert [r.name for r in runs] == [f"p1/{c}/s{s}" for c in ("geo_500k", "hybrid_a0.2_t100k") for s in (42, 123, 7)]
    m, ph = catalog.resolve_phase("demo")
    runs = catalog.expand(m, ph, configs=["hybrid_a0.2_t100k"], seeds=[42])
    assert [r.name for r in runs] == ["demo/hybrid_a0.2_t100k/s42"]
    assert runs[0].settings["preset"] == "tiny" and runs[0].settings["tokenizer"] == "opskit-demo-bpe"


def test_unknown_config_and_phase_name_the_closest_match():
    m, ph = catalog.resolve_phase("demo")
    with pytest.raises(OpsError, match=r"did you mean hybrid_a0.2_t100k\?"):
        catalog.expand(m, ph, configs=["hybrid_a0.2"])
    with pytest.raises(OpsError, match=r"unknown phase 'p3'.*valid: .*demo"):
        catalog.resolve_phase("p3")
    with pytest.raises(OpsError, match="did you mean 1p5b"):
        catalog.resolve_phase("p0", matrix="1p5")


def test_validation_error_names_file_and_line(tmp_path):
    src = (catalog.CONFIG_DIR / "demo.yaml").read_text()
    bad = src.replace("seq_len: 128", "seq_len: long")
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    line = bad.splitlines().index("  seq_len: long") + 1
    with pytest.raises(OpsError, match=rf"bad.yaml:{line}: train.seq_len: expected int, got str 'long'"):
        catalog.load_matrix(str(path))


def test_missing_field_and_bad_spectrum_are_reported(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent("""\
        name: x
        model: {preset: tiny}
        tokenizer: opskit-demo-bpe
        """))
    with pytest.raises(OpsError, match=r"m.yaml:1: .*missing required field 'data'"):
        catalog.load_matrix(str(path))
    src = (catalog.CONFIG_DIR / "demo.yaml").read_text().replace("geo_500k,", "geo_fast,")
    path.write_text(src)
    line = next(i for i, l in enumerate(src.splitlines(), 1) if "geo_fast" in l)
    with pytest.raises(OpsError, match=rf"m.yaml:{line}: configs.core\[0\]"):
        catalog.load_matrix(str(path))


def test_run_names_round_trip():
    assert catalog.parse_run_name(catalog.run_name("demo", "geo_500k", 42)) == ("demo", "geo_500k", 42)
    with pytest.raises(OpsError, match="expected <phase>/<config>/s<seed>"):
        catalog.parse_run_name("demo/geo_500k/42")


def test_launch_of_a_gated_phase_uses_the_survivors(tmp_path):
    from opskit import operations
    store = Store(tmp_path / "state.db")
    with pytest.raises(OpsError, match="gate of p0, which was never applied"):
        operations.launch(store, "p1", dry_run=True)
    store.record_gate("1p5b", "p0", {"survivors": [], "dropped": ["geo_500k"]})
    with pytest.raises(OpsError, match="passed no config"):
        operations.launch(store, "p1", dry_run=True)
    store.record_gate("1p5b", "p0", {"survivors": ["hybrid_a0.2_t100k"], "dropped": ["geo_500k"]})
    plan = operations.launch(store, "p1", dry_run=True)
    assert [p["run"] for p in plan] == ["p1/hybrid_a0.2_t100k/s42", "p1/hybrid_a0.2_t100k/s123", "p1/hybrid_a0.2_t100k/s7"]
    assert plan[0]["spec"]["train_tokens"] == 10_000_000_000


def test_downstream_phase_waits_for_the_run_it_evaluates(tmp_path):
    from opskit import operations
    store = Store(tmp_path / "state.db")
    with pytest.raises(OpsError, match="evaluates demo/geo_500k/s42, which was never launched"):
        operations.launch(store, "demo_p2", configs=["geo_500k"], dry_run=True)
    store.upsert_run({"name": "demo/geo_500k/s42", "phase": "demo", "config": "geo_500k", "seed": 42,
                      "target": "local", "state": "training"}, reason="test")
    plan = operations.launch(store, "demo_p2", configs=["geo_500k"], dry_run=True)
    assert plan[0]["run"] == "demo_p2/geo_500k/s42" and plan[0]["after"] == ["demo/geo_500k/s42"]
    assert plan[0]["command"][1:4] == ["-m", "train.p2", "--spec"]
    assert plan[0]["spec"]["downstream"]["after"] == "demo"
    assert plan[0]["spec"]["downstream"]["tasks"] == ["opskit_demo_recall"]
    store.update_run("demo/geo_500k/s42", state="done")  # a finished source is nothing to wait for
    assert operations.launch(store, "demo_p2", configs=["geo_500k"], dry_run=True)[0]["after"] == []


def test_a_bad_spec_fails_on_the_laptop_with_the_field_named(tmp_path):
    """The catalog checks types; the trainer's own schema (train/spec.py) checks the rest, here, before
    any target is touched: nothing is recorded and no workdir is made."""
    from opskit import operations
    demo = (catalog.CONFIG_DIR / "demo.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(demo.replace("name: demo", "name: demo_bad", 1).replace("lr: 3.0e-3", "lr: -3.0e-3", 1))
    assert "lr: -3.0e-3" in bad.read_text()
    store = Store(tmp_path / "state.db")
    for dry_run in (True, False):
        with pytest.raises(OpsError, match=r"demo/\S+/s42: spec field 'lr' must be > 0, got -0.003"):
            operations.launch(store, "demo", matrix=str(bad), dry_run=dry_run)
    assert store.list_runs() == []
    assert not (tmp_path / ".opskit").exists()
