"""DCP checkpoints of an FSDP2 model: save/load round trip, pruning, and a SIGKILL mid-save.

Each case runs in a child process (its own one-rank gloo group), so the kill is a real kill.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from train.checkpoint import complete_steps, latest_complete
from train.contract import CKPT_COMPLETE_MARKER

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from torch import nn
    from train import checkpoint
    from train.distributed import init_distributed, parallelize, shutdown

    ckpt_dir, mode, kill_at = sys.argv[1], sys.argv[2], sys.argv[3]

    class Net(nn.Module):  # a real (small) model with the .blocks layout the trainer shards
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3))
            self.head = nn.Linear(16, 1)
        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return self.head(x)

    def train_steps(model, opt, start, n):
        for step in range(start, start + n):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(8, 16, generator=g)
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()

    def fingerprint(model):
        return [p.full_tensor().double().sum().item() for p in model.parameters()]

    def kill_hook(frame, event, arg):
        # SIGKILL ourselves at a chosen point of the save of step 4
        hit = (
            (kill_at == "dcp" and event == "call" and frame.f_code.co_name == "save"
             and "state_dict_saver" in frame.f_code.co_filename)
            or (kill_at == "meta" and event == "call" and frame.f_code.co_name == "atomic_write_json")
            or (kill_at == "rename" and event == "c_call" and getattr(arg, "__name__", "") == "replace"
                and frame.f_code.co_name == "_finalize")
        )
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)

    info = init_distributed()
    torch.manual_seed(0)
    model = parallelize(Net(), torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if mode == "save":
        for step in (2, 4, 6):
            train_steps(model, opt, step - 2, 2)
            if step == 4 and kill_at != "none":
                print(json.dumps(fingerprint(model)), flush=True)
                sys.setprofile(kill_hook)
            checkpoint.save(ckpt_dir, step, model, opt, {"tokens": step * 8}, keep=2)
            sys.setprofile(None)
            if step == 2:
                print(json.dumps(fingerprint(model)), flush=True)
    elif mode == "async_save":  # training goes on while each checkpoint is written
        saver = checkpoint.AsyncSaver(ckpt_dir, keep=2)
        for step in (2, 4, 6):
            train_steps(model, opt, step - 2, 2)
            fp = fingerprint(model)
            saver.start(step, model, opt, {"tokens": step * 8})
            print(json.dumps({"step": step, "complete_after_start": checkpoint.complete_steps(ckpt_dir),
                              "fp": fp}), flush=True)
            if kill_at == "async" and step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        train_steps(model, opt, 6, 2)  # changes the weights before step 6's save is waited for
        print(json.dumps({"waited": saver.wait(), "complete": checkpoint.complete_steps(ckpt_dir)}), flush=True)
    else:
        checkpoint.remove_partial(ckpt_dir)
        latest = checkpoint.latest_complete(ckpt_dir)
        meta = checkpoint.load(latest, model, opt)
        print(json.dumps({"step": meta["step"], "tokens": meta["tokens"], "fp": fingerprint(model)}), flush=True)
        train_steps(model, opt, meta["step"], 2)  # the optimizer state came back too: training goes on
        print(json.dumps(fingerprint(model)), flush=True)
    shutdown()
""")


def run_child(ckpt_dir, mode, kill_at="none"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-c", CHILD, str(ckpt_dir), mode, kill_at], capture_output=True,
                          text=True, env=env, timeout=120)


def lines(out: str) -> list:
    return [json.loads(line) for line in out.splitlines() if line.startswith(("[", "{"))]


def test_save_prunes_to_keep_and_load_restores_model_and_optimizer(tmp_path):
    ckpt = tmp_path / "ckpt"
    saved = run_child(ckpt, "save")
    assert saved.returncode == 0, saved.stderr
    assert complete_steps(ckpt) == [4, 6]  # step 2 pruned (keep=2)
    meta = json.loads((ckpt / "step_6" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["tokens"] == 48 and meta["world_size"] == 1
    assert not list(ckpt.glob(".tmp_*"))

    loaded = run_child(ckpt, "load")
    assert loaded.returncode == 0, loaded.stderr
    state, after = lines(loaded.stdout)
    assert state["step"] == 6
    # Loading twice and training on gives bitwise the same weights: optimizer state and RNG restored.
    again = lines(run_child(ckpt, "load").stdout)
    assert again == [state, after] and after != state["fp"]


@pytest.mark.parametrize("kill_at", ["dcp", "meta", "rename"])
def test_kill_during_save_leaves_previous_checkpoint_usable(tmp_path, kill_at):
    ckpt = tmp_path / "ckpt"
    killed = run_child(ckpt, "save", kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    fp_step2, _fp_step4 = lines(killed.stdout)
    assert complete_steps(ckpt) == [2]
    assert latest_complete(ckpt) == ckpt / "step_2"
    assert (ckpt / ".tmp_step_4").is_dir()  # the torn save is there, but never counts
    assert not (ckpt / "step_4").exists()
    assert (ckpt / "step_2" / CKPT_COMPLETE_MARKER).exists()

    loaded = run_child(ckpt, "load")
    assert loaded.returncode == 0, loaded.stderr
    state, _ = lines(loaded.stdout)
    assert state["step"] == 2 and state["fp"] == fp_step2
    assert not (ckpt / ".tmp_step_4").exists()  # cleaned before loading


def test_async_save_completes_in_the_background_and_holds_the_state_at_start(tmp_path):
    ckpt = tmp_path / "ckpt"
    saved = run_child(ckpt, "async_save")
    assert saved.returncode == 0, saved.stderr
    *starts, end = lines(saved.stdout)
    # `.complete` only once waited for: each start first finishes the previous save, never its own.
    assert [s["complete_after_start"] for s in starts] == [[], [2], [2, 4]]
    assert end == {"waited": 6, "complete": [4, 6]}
    loaded = run_child(ckpt, "load")
    state, _ = lines(loaded.stdout)
    assert state["step"] == 6 and state["fp"] == starts[-1]["fp"]  # not the weights trained after start


def test_kill_during_async_save_leaves_previous_checkpoint_usable(tmp_path):
    ckpt = tmp_path / "ckpt"
    killed = run_child(ckpt, "async_save", "async")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert complete_steps(ckpt) == [2] and not (ckpt / "step_4").exists()
    state, _ = lines(run_child(ckpt, "load").stdout)
    assert state["step"] == 2 and state["fp"] == lines(killed.stdout)[0]["fp"]
