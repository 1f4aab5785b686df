"""Phase gates: which configs go on to the next phase (p0: drop a config whose mean PPL@2048 is more
than 15 % above the best). The decision and its numbers are recorded in the store."""
from __future__ import annotations

import time
from pathlib import Path

from opskit.errors import OpsError
from opskit.states import DONE
from opskit.results.aggregate import Stat, stat
from opskit.results.artifacts import add_expected, load_runs

REL_EPS = 1e-9  # "exactly 15 % above" keeps the config despite float rounding


class GateError(OpsError):
    pass


def decide(means: dict[str, Stat | None], metric_length: int, max_rel_above_best: float) -> dict:
    """Pure gate rule on per-config PPL stats; configs without a value are dropped and named."""
    scored = {c: s for c, s in means.items() if s is not None}
    if not scored:
        raise GateError(f"no config has PPL@{metric_length}; nothing to gate")
    best = min(scored, key=lambda c: scored[c].mean)
    best_mean = scored[best].mean
    configs, survivors, dropped = {}, [], []
    for config, s in means.items():
        if s is None:
            configs[config] = {"mean": None, "std": None, "n": 0, "rel_above_best": None, "keep": False,
                               "reason": f"no PPL@{metric_length}"}
            dropped.append(config)
            continue
        rel = s.mean / best_mean - 1.0
        keep = rel <= max_rel_above_best + REL_EPS
        configs[config] = {"mean": s.mean, "std": s.std, "n": s.n, "rel_above_best": rel, "keep": keep}
        (survivors if keep else dropped).append(config)
    return {"metric_length": metric_length, "max_rel_above_best": max_rel_above_best,
            "best": best, "best_mean": best_mean, "threshold": best_mean * (1 + max_rel_above_best),
            "configs": configs, "survivors": survivors, "dropped": dropped}


def apply_gate(store, raw_dir: Path, phase: str, matrix: str | None = None,
               allow_incomplete: bool = False, config_dir: Path | None = None) -> dict:
    """Gate `phase` on its pulled results, record the decision in the store, return it."""
    from opskit import catalog

    kw = {"config_dir": config_dir} if config_dir else {}
    m, ph = catalog.resolve_phase(phase, matrix, **kw)
    if not ph.gate:
        raise GateError(f"phase {ph.name} of matrix {m.name} has no gate rule")
    configs = phase_configs(store, ph.name, matrix, **kw)
    expected = [(ph.name, c, s) for c in configs for s in ph.seeds]
    runs = [r for r in add_expected(load_runs(raw_dir, ph.name), expected) if r.config in configs]
    incomplete = [f"{r.name} ({r.state})" for r in runs if r.state != DONE]
    if incomplete and not allow_incomplete:
        raise GateError(f"cannot gate {ph.name}: {len(incomplete)} run(s) without results: "
                        f"{', '.join(incomplete)} (pull them, or pass --allow-incomplete)")
    length = int(ph.gate["metric_length"])
    means = {c: stat([r.ppl[length] for r in runs if r.config == c and r.state == DONE and length in r.ppl])
             for c in configs}
    decision = decide(means, length, float(ph.gate["max_rel_above_best"]))
    decision.update({"matrix": m.name, "phase": ph.name, "incomplete": incomplete, "decided_at": time.time()})
    store.record_gate(m.name, ph.name, decision)
    return decision


def phase_configs(store, phase: str, matrix: str | None = None, config_dir: Path | None = None) -> list[str]:
    """The configs `phase` runs: the survivors of its `from_gate` phase's latest gate, else its own list.

    Raises GateError when the phase takes its configs from a gate that was never applied."""
    from opskit import catalog

    kw = {"config_dir": config_dir} if config_dir else {}
    m, ph = catalog.resolve_phase(phase, matrix, **kw)
    if not ph.from_gate:
        return list(ph.configs)
    decision = store.latest_gate(m.name, ph.from_gate)
    if decision is None:
        raise GateError(f"phase {ph.name} runs the configs that pass the gate of {ph.from_gate}, "
                        f"which was never applied: run `opskit gate {ph.from_gate}` (after pulling its "
                        f"results) or pass --config")
    if not decision["survivors"]:
        raise GateError(f"the gate of {ph.from_gate} passed no config; pass --config to launch anyway")
    return list(decision["survivors"])
