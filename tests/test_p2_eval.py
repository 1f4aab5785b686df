"""p2 evaluation on the tiny model: passkey grid, LongBench/v2/RULER adapters, the offline lm-eval task,
and `python -m train.p2` end to end (export -> lm-eval -> passkey -> downstream.json, passkey.json)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_p2_export import REPO, make_trained_run, p2_cache  # noqa: E402,F401  (fixture re-export)
from train import longbench  # noqa: E402
from train.passkey import ModelRunner, PasskeyError, build_prompt, draw_keys, evaluate_passkey  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
needs_lm_eval = pytest.mark.skipif(
    __import__("importlib").util.find_spec("lm_eval") is None,
    reason="lm-eval not installed (pip install -e '.[eval]')")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, p2_cache):
    """One trained tiny run (hybrid spectrum) shared by this module's tests."""
    work = tmp_path_factory.mktemp("p2work")
    return make_trained_run(work, p2_cache, "hybrid_a0.2_t100k", steps=10)


@pytest.fixture(scope="module")
def tok(p2_cache):
    from train.data.tokenizer import DEMO_BPE, load_tokenizer

    return load_tokenizer(DEMO_BPE, p2_cache)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    torch.set_num_threads(1)


# ---------------------------------------------------------------- passkey

def test_prompt_has_exact_length_and_needle_at_depth(tok):
    from train.passkey import FILLER, INTRO, NEEDLE, QUESTION

    intro, unit = len(tok.encode(INTRO)), len(tok.encode(FILLER))
    for length in (300, 777):
        n_fill = length - intro - len(tok.encode(NEEDLE.format(key=123456))) - len(tok.encode(QUESTION))
        for depth in (0.1, 0.5, 0.9):
            p = build_prompt(tok.encode, length, depth, 123456)
            assert len(p.context) == length
            needle = tok.encode(" The pass key is 123456.")
            assert p.context[p.needle_at:p.needle_at + len(needle)] == needle
            assert abs((p.needle_at - intro) - depth * n_fill) <= unit / 2  # depth within the filler
            assert tok.decode(p.answer).strip() == "123456"
    with pytest.raises(PasskeyError, match="too short"):
        build_prompt(tok.encode, 50, 0.5, 12345)


def test_keys_are_five_or_six_digits_and_distinct():
    import random

    for seed in range(20):
        keys = draw_keys(random.Random(seed), 6)
        assert len(set(keys)) == 6 and len({len(str(k)) for k in keys}) == 1 and len(str(keys[0])) in (5, 6)


def test_passkey_grid_two_lengths_two_depths(trained, tok):
    from train.export_hf import load_run_model

    model = load_run_model(trained).model
    result = evaluate_passkey(ModelRunner(model), tok, [160, 320], [0.1, 0.9], trials=2, candidates=3, seed=1)
    assert set(result["ll_accuracy"]) == set(result["gen_accuracy"]) == {"160", "320"}
    for grid in (result["ll_accuracy"], result["gen_accuracy"]):
        for row in grid.values():
            assert set(row) == {"0.1", "0.9"} and all(0.0 <= v <= 1.0 for v in row.values())
    assert len(result["cells"]) == 4
    for cell in result["cells"]:
        assert result["ll_accuracy"][str(cell["length"])][f"{cell['depth']:g}"] == cell["ll_correct"] / 2
    again = evaluate_passkey(ModelRunner(model), tok, [160, 320], [0.1, 0.9], trials=2, candidates=3, seed=1)
    assert again["cells"] == result["cells"]  # seeded: same keys, same scores


def test_loglik_matches_full_forward(trained, tok):
    """The runner's sliced scoring equals log-softmax over the model's full logits."""
    from train.export_hf import load_run_model

    model = load_run_model(trained).model
    context, conts = tok.encode("Mia had a dog."), [tok.encode(" Buddy"), tok.encode(" a red ball")]
    got = ModelRunner(model, batch_size=2).loglik(context, conts)
    for c, score in zip(conts, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([context + c])), -1)[0]
        want = sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(c))
        assert score == pytest.approx(want, abs=1e-4)


# ---------------------------------------------------------------- long-context suites

def test_missing_longbench_path_is_a_clear_error(tmp_path):
    for suite in longbench.SUITES:
        with pytest.raises(longbench.LongBenchError, match=f"{suite} data not found at .*download it once"):
            longbench.evaluate_suite(suite, None, None, tmp_path / "nowhere", 4096)
    with pytest.raises(longbench.LongBenchError, match="unknown suite"):
        longbench.require_path("zeroscrolls", tmp_path)


def test_longbench_metrics():
    assert longbench.qa_f1("The red ball.", "a red ball") == 1.0
    assert longbench.qa_f1("blue", "red") == 0.0
    assert longbench.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert longbench.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert longbench.count_score("there are 7 and 8", "7") == 0.5
    assert longbench.classification_score("Type: Location", "Location", all_classes=["Location", "Person"]) == 1.0
    assert longbench.string_match_all("keys 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert longbench.truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]


def test_suites_run_on_local_files(tmp_path, trained, tok):
    """Small files in each suite's layout, scored through the exported HF model (KV-cache generation)."""
    from train.export_hf import export_run, load_exported

    story = "Mia had a dog named Buddy. " * 20
    lb = tmp_path / "LongBench" / "data"
    lb.mkdir(parents=True)
    rows = [{"input": "What was the dog's name?", "context": story, "answers": ["Buddy"], "all_classes": None}] * 2
    (lb / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    v2 = tmp_path / "LongBench-v2"
    v2.mkdir()
    (v2 / "data.json").write_text(json.dumps([{
        "_id": "x", "difficulty": "easy", "length": "short", "question": "Who is the dog?", "context": story,
        "choice_A": "Buddy", "choice_B": "Mia", "choice_C": "Tom", "choice_D": "Spot", "answer": "A"}] * 3))
    ruler = tmp_path / "ruler" / "512" / "data" / "niah_single_1"
    ruler.mkdir(parents=True)
    (ruler / "validation.jsonl").write_text(json.dumps(
        {"index": 0, "input": story + "The special number is 4321. What is the special number?",
         "outputs": ["4321"], "length": 300}) + "\n")

    hf_dir = export_run(trained, tmp_path / "hf")
    runner = longbench.HFRunner(load_exported(hf_dir))
    lb_res = longbench.evaluate_suite("longbench", runner, tok, tmp_path / "LongBench", 512)
    assert lb_res["hotpotqa"]["n"] == 2 and 0.0 <= lb_res["hotpotqa"]["score"] <= 1.0
    v2_res = longbench.evaluate_suite("longbench_v2", runner, tok, v2, 512)
    assert v2_res["overall"]["n"] == 3 and v2_res["difficulty=easy"]["n"] == 3
    r_res = longbench.evaluate_suite("ruler", runner, tok, tmp_path / "ruler", 1024)
    assert r_res["512/niah_single_1"]["n"] == 1 and r_res["512/niah_single_1"]["metric"] == "string_match_all"


def test_hf_runner_greedy_equals_ours(trained, tok):
    """KV-cache generation on the export continues exactly like our model's greedy decoding."""
    from train.export_hf import export_run, load_exported, load_run_model

    hf_dir = export_run(trained, trained.parent / "hf_greedy")
    context = tok.encode("Mia had a dog named Buddy. Every day Mia")
    ours = ModelRunner(load_run_model(trained).model).greedy(context, 12)
    theirs = longbench.HFRunner(load_exported(hf_dir)).greedy(context, 12)
    assert ours == theirs


# ---------------------------------------------------------------- lm-eval and the p2 job

@needs_lm_eval
def test_offline_lm_eval_task_writes_scores(trained, tmp_path):
    from train.downstream import DEMO_TASK, DownstreamError, evaluate_tasks, load_tasks, task_manager
    from train.export_hf import export_run

    hf_dir = export_run(trained, tmp_path / "hf")
    result = evaluate_tasks(hf_dir, [DEMO_TASK], batch_size=8)
    row = result["tasks"][DEMO_TASK]
    assert row["n"] == 30 and 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
    assert result["lm_eval_version"]
    with pytest.raises(DownstreamError, match="unknown lm-eval task"):
        load_tasks(["no_such_task"], task_manager([DEMO_TASK]))


@needs_lm_eval
def test_p2_job_end_to_end(trained, tmp_path):
    spec = json.loads((trained / "spec.json").read_text())
    workdir = Path(spec["out_dir"]).parents[3]
    out = workdir / "runs" / "p2" / spec["config"] / f"s{spec['seed']}"
    out.mkdir(parents=True)
    spec.update(run=f"p2/{spec['config']}/s{spec['seed']}", phase="p2", out_dir=str(out),
                downstream={"after": "p1", "tasks": ["opskit_demo_recall"], "limit": 12,
                            "passkey": {"lengths": [160, 256], "depths": [0.2, 0.8], "trials": 2}})
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    proc = subprocess.run([sys.executable, "-m", "train.p2", "--spec", str(out / "spec.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    downstream = json.loads((out / "downstream.json").read_text())
    assert downstream["tasks"]["opskit_demo_recall"]["n"] == 12
    assert downstream["source_run_dir"] == str(trained)
    passkey = json.loads((out / "passkey.json").read_text())
    assert set(passkey["ll_accuracy"]) == {"160", "256"} and passkey["source_step"] == 10
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    # The artifacts reader of opskit sees the p2 run as done and figure 5 reads tasks.<task>.acc.
    from opskit.results.artifacts import read_run
    art = read_run(out, "p2", spec["config"], spec["seed"])
    assert art.state == "done" and "acc" in art.downstream["tasks"]["opskit_demo_recall"]


def test_p2_job_errors_are_one_line(tmp_path, p2_cache):
    out = tmp_path / "runs" / "p2" / "geo_10k" / "s1"
    out.mkdir(parents=True)
    spec = {"run": "p2/geo_10k/s1", "phase": "p2", "config": "geo_10k", "seed": 1, "attempt": 1,
            "preset": "tiny", "rope": {"spectrum": "geo_10k", "scaling": None}, "tokenizer": "opskit-demo-bpe",
            "cache_dir": str(p2_cache), "out_dir": str(out)}
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "train.p2", "--spec", str(out / "spec.json")]
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "downstream" in bad.stderr
    spec["downstream"] = {"after": "p1", "tasks": [], "passkey": None}  # p1 run never trained
    (out / "spec.json").write_text(json.dumps(spec))
    missing = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "no complete checkpoint" in missing.stderr
    assert "Traceback" not in missing.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "no complete checkpoint" in status["message"]


@needs_lm_eval
def test_hub_task_offline_is_a_clear_error():
    from train.downstream import DownstreamError, load_tasks, task_manager

    with pytest.raises(DownstreamError, match=r"cannot load the data of task 'piqa' \(HF_HUB_OFFLINE"):
        load_tasks(["piqa"], task_manager(["piqa"]))
