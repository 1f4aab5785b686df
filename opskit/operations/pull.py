"""pull: each run's allowed artifacts into results/raw/<phase>/<config>/seed<k>/ with a manifest."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from opskit import states
from opskit.errors import OpsError, TargetUnreachable
from opskit.operations import staging as staging_area
from opskit.operations.launch import Notify, quiet
from opskit.operations.targets import get_target
from opskit.results.artifacts import RAW_DIR, run_path
from opskit.results.content_guard import credential_warnings
from opskit.store import Store
from train import contract as C

MANIFEST = "manifest.json"


def pull(store: Store, runs: list[str] | None = None, results_dir: str = "results",
         on_event: Notify = quiet) -> list[dict]:
    """Fetch every (or each named) run's pullable files. A file an earlier attempt's pull brought that
    the run no longer has (a rerun started afresh) is removed, so no report reads an earlier attempt's
    results; one the box lost within the same attempt (cleaned up after a pull) is kept."""
    rows = ([store.require_run(r) for r in runs] if runs else
            store.select_runs(columns=("name", "phase", "config", "seed", "target", "attempt", "state", "stale")))
    out = []
    for r in rows:
        try:
            if not runs and _pulled_since_it_ended(r, results_dir):  # its files cannot have changed
                out.append({"run": r["name"], "pulled": 0, "up_to_date": True})
                continue
            out.append(_pull_one(store, r, results_dir, on_event))
        except (TargetUnreachable, OpsError, OSError) as e:  # one run's failure must not stop the others
            out.append({"run": r["name"], "pulled": 0, "error": str(e)})
    return out


def _pull_one(store: Store, r: dict, results_dir: str, on_event: Notify) -> dict:
    tgt = get_target(store, r["target"])
    files, as_of = tgt.manifest_at(r["name"])
    dest = run_path(Path(results_dir) / RAW_DIR, r["phase"], r["config"], r["seed"])
    staging = staging_area.begin(dest)  # dest and its manifest change together, at the end, or not at all
    wanted = [f for f in files if _needs_fetch(staging / f["path"], f)]
    if wanted:
        tgt.fetch(r["name"], [f["path"] for f in wanted], staging)
    recorded = []
    for f in files:
        got = sha256(staging / f["path"])
        if got is None:
            raise OpsError(f"{r['name']}: {f['path']} did not arrive")
        if got != f["sha256"]:  # the file changed between manifest and copy (a live log): record what we have
            f = {**f, "sha256": got, "size": (staging / f["path"]).stat().st_size}
        recorded.append(f)
    previous_attempt, previous = _previously_pulled(dest)
    missing = [f for f in previous if f["path"] not in {g["path"] for g in files}]
    gone, kept = [], []
    for f in missing:
        if previous_attempt != r["attempt"]:  # superseded by a new attempt (a rerun started afresh)
            (staging / f["path"]).unlink(missing_ok=True)
            gone.append(f["path"])
        elif (staging / f["path"]).exists():  # same attempt, gone from the box (cleaned up): ours to keep
            kept.append(f)
    manifest = {"run": r["name"], "target": r["target"], "attempt": r["attempt"], "state": r["state"],
                "files": recorded + kept}
    if manifest != _without_time(_read_manifest(dest)):  # unchanged: results/ shows no diff
        C.atomic_write_json(staging / MANIFEST, {**manifest, "pulled_at": time.time()})
    staging_area.commit(staging, dest)
    with store.transaction():
        for f in recorded:
            store.record_artifact(r["name"], f["path"], f["size"], f["sha256"])
        store.forget_artifacts(r["name"], gone)
    marked = _mark_pulled(tgt, r, as_of)
    removed = f", {len(gone)} of an earlier attempt removed" if gone else ""
    if wanted or gone:
        on_event(f"pulled {r['name']}: {len(wanted)} new of {len(files)} files{removed} -> {dest}")
    warnings = [f"{r['name']}: {w}; do not publish it as is" for w in credential_warnings(dest, [f["path"] for f in wanted])]
    for w in warnings:
        on_event(f"warning: {w}")
    return {"run": r["name"], "pulled": len(wanted), "files": [f["path"] for f in files], "removed": gone,
            "dest": str(dest), "credential_warnings": warnings, "marked_on_box": marked}


def _mark_pulled(tgt, r: dict, as_of: float | None) -> bool:
    """Leave the box a marker that this attempt came home (its idle action waits for one per run);
    a box whose code predates the marker only misses it."""
    if as_of is None:
        return False
    try:
        return bool(tgt.mark_pulled(r["name"], r["attempt"], as_of).get("marked"))
    except OpsError:
        return False


def _read_manifest(dest: Path) -> dict | None:
    """The last pull's manifest.json in `dest`, or None (none, or not one opskit wrote)."""
    try:
        manifest = C.read_json(dest / MANIFEST)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _without_time(manifest: dict | None) -> dict | None:
    return None if manifest is None else {k: v for k, v in manifest.items() if k != "pulled_at"}


def _pulled_since_it_ended(r: dict, results_dir: str) -> bool:
    """The run ended and its manifest is of that ended attempt: nothing more can come from its target."""
    if r["state"] not in states.ENDED or r["stale"]:
        return False
    manifest = _read_manifest(run_path(Path(results_dir) / RAW_DIR, r["phase"], r["config"], r["seed"])) or {}
    return manifest.get("attempt") == r["attempt"] and manifest.get("state") == r["state"]


def _previously_pulled(dest: Path) -> tuple[int | None, list[dict]]:
    """Attempt and files of the last pull into `dest` (its manifest.json), files confined to `dest`."""
    manifest = _read_manifest(dest)
    try:
        files, attempt = list(manifest["files"]), manifest.get("attempt")
    except (KeyError, TypeError):
        return None, []
    root = dest.resolve()
    return attempt, [f for f in files if (dest / f["path"]).resolve().is_relative_to(root)]


def sha256(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _needs_fetch(local: Path, remote: dict) -> bool:
    return not local.exists() or local.stat().st_size != remote["size"] or sha256(local) != remote["sha256"]
