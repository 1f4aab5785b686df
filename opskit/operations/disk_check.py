"""Does a run fit on its target's disk? launch refuses a run whose estimated checkpoints and token
cache need more than the target's free space (`--force` overrides), before anything is queued.

The estimate (docs/run-directory.md): a checkpoint holds the fp32 weights and AdamW's two moments,
12 bytes per parameter of the preset, and `keep_checkpoints` of them stay, plus the one being written
before the oldest is pruned; the token cache holds the training and validation tokens at 2 bytes each
(4 for a vocabulary over 65,536 ids), minus what the target's cache folder already holds.
"""
from __future__ import annotations

import dataclasses
import json
import shlex

from opskit.errors import OpsError
from opskit.planning import LaunchDecision
from opskit.targets import Target

BYTES_PER_PARAM_CHECKPOINT = 12  # fp32 weights + AdamW exp_avg + exp_avg_sq


def estimate(spec: dict) -> dict:
    """{"checkpoints": bytes, "cache": bytes, "cache_key": str} for one run's spec."""
    from train.presets import get_preset, param_count
    if "downstream" in spec:  # a p2 job writes an HF export of its source run and small results
        return {"checkpoints": 0, "cache": 0, "cache_key": ""}
    cfg = get_preset(spec["preset"])
    keep = int(spec.get("keep_checkpoints") or 1)
    checkpoints = param_count(cfg) * BYTES_PER_PARAM_CHECKPOINT * (keep + 1)
    itemsize = 2 if cfg.vocab_size <= 2**16 else 4
    validation = (spec.get("data") or {}).get("validation") or {}
    tokens = int(spec.get("train_tokens") or 0) + int(validation.get("max_tokens") or 0)
    key = json.dumps([spec.get("tokenizer"), spec.get("data")], sort_keys=True)
    return {"checkpoints": checkpoints, "cache": tokens * itemsize, "cache_key": key}


def target_disk(tgt: Target) -> dict | None:
    """{"free": bytes, "cache": bytes in <workdir>/cache} on the target, one round trip; None when
    it cannot tell (unreachable: launch reports that itself when it prepares the target)."""
    wd, cache = shlex.quote(tgt.workdir), shlex.quote(f"{tgt.workdir}/cache")
    script = (f"d={wd}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done\n"
              "df -Pk \"$d\" | awk 'NR==2 {print \"free_kb=\" $4}'\n"
              f"test -d {cache} && du -sk {cache} | awk '{{print \"cache_kb=\" $1}}'\n")
    try:
        res = tgt.shell.run(script, timeout=30)
    except OpsError:
        return None
    facts = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    if not facts.get("free_kb", "").isdigit():
        return None
    return {"free": int(facts["free_kb"]) * 1024, "cache": int(facts.get("cache_kb") or 0) * 1024}


def refuse_what_does_not_fit(tgt: Target, decisions: list[LaunchDecision], specs: dict[str, dict],
                             disk: dict | None) -> list[LaunchDecision]:
    """The decisions with each run that would not fit (in launch order, counting the runs before it
    in the same launch) turned into a refusal that says how much it needs and how much is free."""
    if disk is None:
        return decisions
    left, cache_left, caches = disk["free"], disk["cache"], set()
    out = []
    for d in decisions:
        if not d.start:
            out.append(d)
            continue
        need = estimate(specs[d.run.name])
        cache = 0 if need["cache_key"] in caches else max(0, need["cache"] - cache_left)
        total = need["checkpoints"] + cache
        if total > left:
            out.append(dataclasses.replace(d, start=False, reason=(
                f"needs ~{_size(total)} on {tgt.name}:{tgt.workdir} (checkpoints {_size(need['checkpoints'])}, "
                f"token cache {_size(cache)}), {_size(left)} free: free some space, or pass --force")))
            continue
        left -= total
        if need["cache_key"] not in caches:
            cache_left = max(0, cache_left - need["cache"])
            caches.add(need["cache_key"])
        out.append(d)
    return out


def _size(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n / 1e6:.2f} MB"
