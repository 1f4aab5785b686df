"""cost: what runs, configs, phases and targets cost (docs/cost-and-notifications.md), from each
box's own ledger (local and SSH targets: the supervisor's record of busy and idle time,
opskit/ledger.py) and SLURM's accounting (elapsed x GPUs). What a target answered is kept in the
store, so a box that went away still counts; `status` shows each watched box's idle time from it.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from opskit import ledger as L
from opskit.errors import OpsError, TargetUnreachable
from opskit.ledger import watched
from opskit.operations.targets import get_target, list_targets
from opskit.store import Store

LEDGER_KEY = "ledger:"  # + the ledger's id: its text as far as opskit read it
BOX_KEY = "box"  # the box's last answer: supervisor, idle action, notifications, its clock
SACCT_KEY = "sacct"  # a SLURM target's jobs: {"runs": {run: [job id]}, "jobs": {job id: {...}}}


# ------------------------------------------------------------------ reading the targets


def read_targets(store: Store, names: list[str]) -> dict[str, str | None]:
    """Bring each target's new ledger lines (SLURM: its jobs' accounting) into the store, targets in
    parallel; {target: None, or why it did not answer}."""
    work, errors = {}, {}
    for name in names:  # in this thread: the store's connection belongs to it
        try:
            tgt = get_target(store, name)
        except OpsError as e:
            errors[name] = str(e)
            continue
        records = {r["key"]: r["data"] for r in store.box_records(name)}
        runs = [r["name"] for r in store.list_runs(target=name)] if tgt.kind == "slurm" else []
        work[name] = (tgt, records, runs)

    def fetch(name: str):
        tgt, records, runs = work[name]
        try:
            if tgt.kind == "slurm":
                return tgt.job_accounting(runs) if runs else None, None
            current = (records.get(BOX_KEY) or {}).get("ledger_id")
            size = (records.get(LEDGER_KEY + current) or {}).get("size", 0) if current else 0
            return tgt.box_state(size, current), None
        except (TargetUnreachable, OpsError) as e:
            return None, str(e)
        except Exception as e:  # one broken target must not take the others down
            return None, f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(work)))) as pool:
        answers = dict(zip(work, pool.map(fetch, work)))
    for name, (answer, error) in answers.items():
        errors[name] = error
        if answer is not None:
            _keep(store, name, work[name][0].kind, work[name][1], answer)
    return errors


def _keep(store: Store, name: str, kind: str, records: dict, answer: dict) -> None:
    if kind == "slurm":
        old = records.get(SACCT_KEY) or {"runs": {}, "jobs": {}}
        store.put_box_record(name, SACCT_KEY, {"runs": {**old["runs"], **answer["runs"]},
                                               "jobs": {**old["jobs"], **answer["jobs"]}})
        return
    led = answer["ledger"]
    if led["id"]:
        prev = records.get(LEDGER_KEY + led["id"])
        text = (prev["text"] if prev and led["offset"] and prev.get("size") == led["offset"] else "") + led["text"]
        store.put_box_record(name, LEDGER_KEY + led["id"], {"text": text, "size": led["size"], "seen": led["seen"]})
    store.put_box_record(name, BOX_KEY, {"ledger_id": led["id"], "now": answer["now"], "seen": led["seen"],
                                         "supervisor": answer["supervisor"], "idle_action": answer["idle_action"],
                                         "notify": answer["notify"]})


# ------------------------------------------------------------------ from the store


def box_usage(records: list[dict]) -> tuple[L.Usage, dict]:
    """A local/SSH target's Usage over every ledger opskit kept of it, and its box's last answer."""
    box = next((r["data"] for r in records if r["key"] == BOX_KEY), {})
    alive = bool((box.get("supervisor") or {}).get("alive"))
    total = L.Usage()
    for r in records:
        if not r["key"].startswith(LEDGER_KEY):
            continue
        current = r["key"] == LEDGER_KEY + str(box.get("ledger_id"))
        until = box.get("now") if current and alive else r["data"].get("seen")
        spans = L.intervals(L.parse(r["data"]["text"]), until)
        total = total.add(L.usage(spans, watching=current and alive))
    return total, box


def _slurm_run(row: dict, acct: dict, config: dict, now: float) -> tuple[float, float]:
    """(wall seconds, billed unit-seconds) of a SLURM run: its jobs' elapsed time x GPUs (a job without
    GPUs: x nodes); without accounting, the run's own start and end x the target's GPUs."""
    jobs = [acct["jobs"][j] for j in acct.get("runs", {}).get(row["name"], []) if j in acct.get("jobs", {})]
    if jobs:
        return (sum(j["elapsed_s"] for j in jobs),
                sum(j["elapsed_s"] * (j.get("gpus") or j.get("nodes") or 1) for j in jobs))
    if not row.get("started_at"):
        return 0.0, 0.0
    wall = max(0.0, (row.get("ended_at") or now) - row["started_at"])
    nodes = int(config.get("nodes") or 1)
    return wall, wall * nodes * (int(config.get("gpus_per_node") or 0) or 1)


def _sum(values) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known), 4) if known else None


def summarize(store: Store, phase: str | None = None, target: str | None = None,
              errors: dict | None = None) -> dict:
    """The cost report from what the store holds: runs, configs, phases, targets, total."""
    errors = errors or {}
    now = time.time()
    targets = {t["name"]: t for t in list_targets(store)}
    records = {name: store.box_records(name) for name in targets}
    usages = {n: box_usage(records[n]) for n, t in targets.items() if t["kind"] != "slurm"}
    acct = {n: next((r["data"] for r in records[n] if r["key"] == SACCT_KEY), {}) for n, t in targets.items()
            if t["kind"] == "slurm"}
    rows = store.list_runs(phase=phase, target=target)
    runs, slurm_busy = [], {}
    for r in rows:
        busy, parts = 0.0, []
        for name, (u, _box) in usages.items():  # a run resumed elsewhere has time on both boxes
            if r["name"] in u.run_s:
                busy += u.run_s[r["name"]]
                parts.append(L.money(u.run_share_s[r["name"]], targets[name]["config"].get("price_per_hour")))
        if r["target"] in acct:
            wall, units_s = _slurm_run(r, acct[r["target"]], targets[r["target"]]["config"], now)
            busy += wall
            slurm_busy[r["target"]] = slurm_busy.get(r["target"], 0.0) + units_s
            parts.append(L.money(units_s, targets[r["target"]]["config"].get("price_per_hour")))
        priced = (targets.get(r["target"]) or {"config": {}})["config"].get("price_per_hour") is not None
        runs.append({"run": r["name"], "phase": r["phase"], "config": r["config"], "seed": r["seed"],
                     "target": r["target"], "state": r["state"], "busy_s": round(busy, 1),
                     "cost": _sum(parts) if busy else (0.0 if priced else None)})  # never ran: nothing
    scope = [target] if target else sorted({r["target"] for r in rows} | {n for n, t in targets.items()
                                                                         if t["config"].get("price_per_hour") is not None
                                                                         and not phase})
    out_targets = [_target_row(n, targets[n], usages.get(n), slurm_busy.get(n, 0.0), errors.get(n), records[n])
                   for n in scope if n in targets]
    return {"runs": runs, "configs": _grouped(runs, ("phase", "config")), "phases": _grouped(runs, ("phase",)),
            "targets": out_targets, "total": _sum(t["held_cost"] for t in out_targets)}


def _grouped(runs: list[dict], keys: tuple[str, ...]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return [{**dict(zip(keys, key)), "runs": len(g), "busy_s": round(sum(r["busy_s"] for r in g), 1),
             "cost": _sum(r["cost"] for r in g)} for key, g in sorted(groups.items())]


def _target_row(name: str, rec: dict, usage, slurm_units_s: float, error: str | None, records: list[dict]) -> dict:
    price = rec["config"].get("price_per_hour")
    fetched = max((r["fetched_at"] for r in records), default=None)
    if rec["kind"] == "slurm":  # SLURM bills its jobs; nothing is held between them
        u, box = L.Usage(held_s=slurm_units_s, busy_s=slurm_units_s), {}
    else:
        u, box = usage
    return {"target": name, "kind": rec["kind"], "price_per_hour": price, "held_s": round(u.held_s, 1),
            "busy_s": round(u.busy_s, 1), "idle_s": round(u.idle_s, 1), "held_cost": L.money(u.held_s, price),
            "busy_cost": L.money(u.busy_s, price), "idle_cost": L.money(u.idle_s, price),
            "idle_since": u.idle_since, "idle_now_s": round(u.idle_now_s, 1),
            "idle_now_cost": L.money(u.idle_now_s, price) if u.idle_since else None,
            "supervisor_alive": (box.get("supervisor") or {}).get("alive"), "idle_action": box.get("idle_action"),
            "notify": box.get("notify"), "read_at": fetched, "error": error}


# ------------------------------------------------------------------ the operations


def cost(store: Store, phase: str | None = None, target: str | None = None) -> dict:
    """`opskit cost`: read the targets concerned (new ledger lines, SLURM accounting), then report."""
    names = [target] if target else sorted({r["target"] for r in store.list_runs(phase=phase)}
                                           | {t["name"] for t in list_targets(store) if watched(t["config"])})
    errors = read_targets(store, names)
    return summarize(store, phase, target, errors)


def box_views(store: Store) -> list[dict]:
    """`status`: each watched box (a price or an idle action; not SLURM) with its idle time, what that
    idle time cost, and its idle action."""
    names = [t["name"] for t in list_targets(store) if t["kind"] != "slurm" and watched(t["config"])]
    if not names:
        return []
    errors = read_targets(store, names)
    return [t for t in summarize(store, errors=errors)["targets"] if t["target"] in names]


def run_costs(store: Store) -> dict[str, float | None]:
    """Each run's cost from what the store already holds (no target is asked): `report`."""
    return {r["run"]: r["cost"] for r in summarize(store)["runs"]}


__all__ = ["box_views", "cost", "read_targets", "run_costs", "summarize"]
