"""lm-eval-harness on an exported run: tasks -> downstream.json.

The model is `load_exported(dir)` (our exact spectrum) handed to lm_eval's HF model (`HFLM`); task
data comes from the harness's own loading. `train/tasks/` holds an offline task (a YAML over a local
JSONL) that the tests and the demo use; it is found by name like the harness's own tasks.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

DEFAULT_TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEMO_TASK = "opskit_demo_recall"
METRICS = ("acc", "acc_norm")


class DownstreamError(Exception):
    """lm-eval missing, a task that cannot be loaded, or a model that cannot be evaluated; one line."""


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise DownstreamError("lm-eval is not installed: pip install -e '.[eval]' (lm-eval-harness)") from None
    return lm_eval


def local_tasks() -> list[str]:
    """Tasks defined in train/tasks/ (one YAML per task, named like its file)."""
    return sorted(p.stem for p in LOCAL_TASKS_DIR.glob("*.yaml"))


def task_manager(names: list[str]):
    """lm_eval's TaskManager; indexing the harness's ~10k task files takes ~30 s, so skipped when every
    task is one of ours."""
    from lm_eval.tasks import TaskManager

    only_local = set(names) <= set(local_tasks())
    return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=not only_local)


def load_tasks(names: list[str], manager) -> dict:
    """lm_eval's task objects by name, loading each one's data; a clear error naming the task that fails."""
    known = set(manager.all_tasks)
    tasks = {}
    for name in names:
        if name not in known:
            raise DownstreamError(f"unknown lm-eval task {name!r} (not in lm_eval nor {LOCAL_TASKS_DIR})")
        try:
            tasks.update(manager.load([name])["tasks"])
        except Exception as e:  # datasets raises many types when the hub is unreachable
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
            hint = ("HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" if offline else "no hub access?")
            raise DownstreamError(
                f"cannot load the data of task {name!r} ({hint}: {type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                f"Run once on a machine with internet so the datasets cache holds it, or evaluate "
                f"offline tasks only (e.g. {DEMO_TASK})") from None
    return tasks


def summarize(results: dict, names: list[str]) -> dict:
    """downstream.json's "tasks" from lm_eval's results: {task: {"acc", "acc_norm"?, "acc_stderr"?, "n"}}."""
    out = {}
    for name in names:
        metrics = results.get("results", {}).get(name)
        if metrics is None:
            raise DownstreamError(f"lm-eval returned no results for task {name!r}")
        row = {}
        for key in METRICS:
            if metrics.get(f"{key},none") is not None:
                row[key] = float(metrics[f"{key},none"])
                stderr = metrics.get(f"{key}_stderr,none")
                if isinstance(stderr, (int, float)):
                    row[f"{key}_stderr"] = float(stderr)
        n = (results.get("n-samples", {}).get(name) or {}).get("effective")
        row["n"] = int(n) if n is not None else None
        out[name] = row
    return out


def evaluate_tasks(hf_dir: str | os.PathLike, tasks: list[str] | None = None, batch_size: int = 8,
                   limit: int | None = None, device: str = "cpu", dtype=None, num_fewshot: int | None = None,
                   seed: int = 1234) -> dict:
    """Run lm-eval `tasks` on an exported model; returns the content of downstream.json."""
    import torch

    from train.export_hf import load_exported

    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    names = list(tasks or DEFAULT_TASKS)
    manager = task_manager(names)
    task_objects = load_tasks(names, manager)
    started = time.time()
    model = load_exported(hf_dir, device=device, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
              max_length=model.config.max_position_embeddings)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(task_objects.values()), num_fewshot=num_fewshot, limit=limit,
        task_manager=manager, log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=1000)
    if results is None:
        raise DownstreamError("lm-eval returned nothing (not rank 0?)")
    return {
        "tasks": summarize(results, names),
        "model": str(hf_dir),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "time_s": round(time.time() - started, 2),
    }
