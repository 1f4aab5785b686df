"""export: a trained run as a Hugging Face Llama checkpoint, by the trainer's own exporter in a
subprocess (the control plane never imports torch)."""
from __future__ import annotations

import os
import subprocess
import sys

from opskit import states
from opskit.errors import OpsError
from opskit.operations.targets import get_target
from opskit.store import Store


def export_run(store: Store, run: str, out_dir: str, step: int | None = None, dtype: str = "fp32") -> dict:
    row = store.require_run(run)
    if row["state"] not in states.ENDED and step is None:  # its newest checkpoint is not what it will end as
        ckpt = row.get("checkpoint_step")
        have = (f"its newest checkpoint is step {ckpt}; pass --step {ckpt} to export that one now"
                if ckpt is not None else "it has no checkpoint yet")
        raise OpsError(f"{run} is still {row['state']}: export it once it is done ({have})")
    tgt = get_target(store, row["target"])
    if not tgt.in_place:
        raise OpsError(f"{run} lives on {tgt.kind} target {row['target']}; export it there: "
                       f"python -m train.export_hf --run-dir {row['run_dir']} --out DIR")
    cmd = [sys.executable, "-m", "train.export_hf", "--run-dir", row["run_dir"], "--out", os.path.abspath(out_dir),
           "--dtype", dtype] + (["--step", str(step)] if step is not None else [])
    done = subprocess.run(cmd)  # its progress and errors go to the terminal
    if done.returncode != 0:
        raise OpsError(f"export of {run} failed (exit {done.returncode}; its message is above)")
    return {"run": run, "out": os.path.abspath(out_dir)}
