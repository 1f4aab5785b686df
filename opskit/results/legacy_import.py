"""`opskit import`: bring the earlier studies' results files into results/raw/<phase>/ as runs.

Two schemas exist (docs/results.md):
  search: {"results": {config: {seed: {length: ppl}}}, "rows": [...]}          (3 configs x 3 seeds)
  final:  {"seed": S, "model_cfg": {...}, "train_cfg": {...},
           "experiments": {config: {length: {"ppl": x, "std": y, "n": 10}}}}    (the 350M final)
They record perplexities only (no loss curve); each imported run gets a results.json with
"imported_from" and an eval_per_length.json.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from opskit.errors import OpsError
from opskit.results.artifacts import run_path
from train import contract

_LENGTH = re.compile(r"(?:l|len|ctx)?_?(\d+(?:\.\d+)?)(k?)", re.IGNORECASE)
_SEED = re.compile(r"(?:seed|s)?_?(\d+)", re.IGNORECASE)
_TOKENS_KEYS = ("train_tokens", "tokens", "total_tokens", "max_tokens")
_SEQ_KEYS = ("seq_len", "max_seq_len", "seq_length", "block_size")


class ImportError_(OpsError):
    pass


def _length(key, where: str) -> int:
    m = _LENGTH.fullmatch(str(key).strip())
    if not m:
        raise ImportError_(f"{where}: '{key}' is not an evaluation length (expected e.g. 2048 or 2K)")
    value = float(m.group(1)) * (1024 if m.group(2) else 1)
    return int(value)


def _seed(key, where: str) -> int:
    m = _SEED.fullmatch(str(key).strip())
    if not m:
        raise ImportError_(f"{where}: '{key}' is not a seed (expected e.g. 42 or seed42)")
    return int(m.group(1))


def _number(value, where: str) -> float:
    if isinstance(value, dict) and "ppl" in value:
        value = value["ppl"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ImportError_(f"{where}: expected a perplexity number, got {value!r}")
    return float(value)


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ImportError_(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def detect_schema(data) -> str:
    if isinstance(data, dict) and isinstance(data.get("results"), dict) and "experiments" not in data:
        return "search"
    if isinstance(data, dict) and isinstance(data.get("experiments"), dict) and "seed" in data:
        return "final"
    keys = ", ".join(sorted(map(str, data))) if isinstance(data, dict) else type(data).__name__
    raise ImportError_(
        "unknown results schema: expected {results: {config: {seed: {length: ppl}}}, rows: [...]} "
        f"or {{seed, model_cfg, train_cfg, experiments: {{config: {{length: {{ppl, std, n}}}}}}}}; found: {keys}")


def parse_file(path: Path) -> list[dict]:
    """Imported runs as {config, seed, ppl: {length: x}, std, n, model_cfg, train_cfg, rows}."""
    path = Path(path)
    if not path.is_file():
        raise ImportError_(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ImportError_(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        schema = detect_schema(data)
    except ImportError_ as e:
        raise ImportError_(f"{path}: {e}") from None
    runs = []
    if schema == "search":
        rows = data.get("rows") or []
        for config, seeds in data["results"].items():
            for seed_key, lengths in _mapping(seeds, f"{path}: results.{config}").items():
                where = f"{path}: results.{config}.{seed_key}"
                seed = _seed(seed_key, where)
                ppl = {_length(k, where): _number(v, f"{where}.{k}") for k, v in _mapping(lengths, where).items()}
                mine = [r for r in rows if isinstance(r, dict) and r.get("config") == config
                        and str(r.get("seed")) in (str(seed), str(seed_key))]
                runs.append({"config": config, "seed": seed, "ppl": ppl, "std": {}, "n": {},
                             "model_cfg": {}, "train_cfg": {}, "rows": mine})
    else:
        seed = _seed(data["seed"], f"{path}: seed")
        model_cfg, train_cfg = data.get("model_cfg") or {}, data.get("train_cfg") or {}
        for config, lengths in data["experiments"].items():
            where = f"{path}: experiments.{config}"
            ppl, std, n = {}, {}, {}
            for key, entry in _mapping(lengths, where).items():
                length = _length(key, where)
                ppl[length] = _number(entry, f"{where}.{key}")
                if isinstance(entry, dict):
                    if entry.get("std") is not None:
                        std[length] = float(entry["std"])
                    if entry.get("n") is not None:
                        n[length] = int(entry["n"])
            runs.append({"config": config, "seed": seed, "ppl": ppl, "std": std, "n": n,
                         "model_cfg": model_cfg, "train_cfg": train_cfg, "rows": []})
    if not runs:
        raise ImportError_(f"{path}: holds no runs")
    return runs


def _first(cfg: dict, keys: tuple[str, ...]):
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


def import_file(path: Path, phase: str, results_dir: Path, matrix: str | None = None,
                config_dir: Path | None = None) -> list[str]:
    """Write each run of the file to results/raw/<phase>/<config>/seed<k>/; return the run names.

    Re-importing the same file replaces its runs; a directory holding a real (non-imported) run or
    one imported from another file is never overwritten."""
    path = Path(path)
    runs = parse_file(path)
    m = None
    if matrix:
        from opskit import catalog

        m = catalog.load_matrix(matrix, **({"config_dir": config_dir} if config_dir else {}))
    raw = Path(results_dir) / "raw"
    for run in runs:  # check every target first: all or nothing
        old = contract.read_json(run_path(raw, phase, run["config"], run["seed"]) / contract.RESULTS)
        if old is not None and old.get("imported_from") != str(path):
            origin = f"imported from {old['imported_from']}" if old.get("imported_from") else "a trained run"
            raise ImportError_(f"{contract.run_name(phase, run['config'], run['seed'])} already exists ({origin}); import under another --phase")
    names = []
    for run in runs:
        names.append(_write_run(raw, phase, run, path, m))
    return names


def _write_run(raw: Path, phase: str, run: dict, source: Path, m) -> str:
    config, seed = run["config"], run["seed"]
    name = contract.run_name(phase, config, seed)
    seq_len = _first(run["train_cfg"], _SEQ_KEYS) or (m.train["seq_len"] if m else None)
    row = run["rows"][0] if len(run["rows"]) == 1 else {}
    results = {
        "run": name, "phase": phase, "config": config, "seed": seed,
        "preset": m.preset if m else run["model_cfg"].get("preset"),
        "params": _first(run["model_cfg"], ("params", "n_params", "num_params")),
        "tokens_seen": _first(run["train_cfg"], _TOKENS_KEYS),
        "steps": run["train_cfg"].get("steps"),
        "final_train_loss": _first(row, ("final_train_loss", "final_loss", "train_loss")),
        "ppl": {str(k): v for k, v in sorted(run["ppl"].items())},
        "wall_time_s": None, "tokens_per_s": None, "mfu": None, "versions": None,
        "seq_len": seq_len, "matrix": m.name if m else None,
        "imported_from": str(source), "imported_at": time.time(),
        "legacy": {"model_cfg": run["model_cfg"], "train_cfg": run["train_cfg"], "rows": run["rows"]},
    }
    lengths = {}
    for length, ppl in sorted(run["ppl"].items()):
        entry = {"ppl": ppl, "loss": math.log(ppl)}
        if length in run["std"]:
            entry["std"] = run["std"][length]
        if length in run["n"]:
            entry["chunks"] = run["n"][length]
        lengths[str(length)] = entry
    out = run_path(raw, phase, config, seed)
    out.mkdir(parents=True, exist_ok=True)
    contract.atomic_write_json(out / contract.EVAL_PER_LENGTH, {"mode": "imported", "lengths": lengths})
    contract.atomic_write_json(out / contract.RESULTS, results)
    return name
