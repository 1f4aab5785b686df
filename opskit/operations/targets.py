"""The targets the store knows: the built-in `local` one, those added by hand, and their Target objects."""
from __future__ import annotations

from opskit.errors import OpsError, unknown_name
from opskit.store import Store
from opskit.targets import Target, open_target, target_class

MIN_STALL_AFTER_S = 30  # the trainer beats every 10-30 s


def workdir_beside_store(store: Store, target: str) -> str:
    """A target on this machine keeps its runs in .opskit/<target>/ beside state.db."""
    return str(store.path.resolve().parent / ".opskit" / target)


def local_target_record(store: Store) -> dict:
    """The `local` target, created on first use with its workdir beside state.db."""
    rec = store.get_target("local")
    if rec is None:
        store.add_target("local", "local", {"workdir": workdir_beside_store(store, "local"), "gpus": 0}, replace=True)
        rec = store.get_target("local")
    return rec


def target_names(store: Store) -> list[str]:
    return ["local", *[t["name"] for t in store.list_targets() if t["name"] != "local"]]


def list_targets(store: Store) -> list[dict]:
    local_target_record(store)
    return store.list_targets()


def add_target(store: Store, name: str, kind: str, options: dict, replace: bool = False) -> dict:
    """Validate a target's options through its kind's class and store it (no secrets: keys by path)."""
    if name == "local":
        raise OpsError("'local' is the built-in local target; pick another name")
    options = dict(options)
    if kind == "slurm" and not options.get("login") and not options.get("workdir"):
        options["workdir"] = workdir_beside_store(store, name)  # this machine is the cluster's
    stall_after_s = options.pop("stall_after_s", None)
    config = target_class(kind).config_from_options({**options, "name": name})
    if stall_after_s is not None:  # every kind: when a live run counts as stalled (docs/states.md)
        if float(stall_after_s) < MIN_STALL_AFTER_S:
            raise OpsError(f"--stall-after {stall_after_s}: at least {MIN_STALL_AFTER_S} s "
                           f"(the trainer beats every 10-30 s)")
        config["stall_after_s"] = float(stall_after_s)
    store.add_target(name, kind, config, replace=replace)
    return store.get_target(name)


def remove_target(store: Store, name: str) -> dict:
    store.remove_target(name)
    return {"removed": name}


def get_target(store: Store, name: str) -> Target:
    if name == "local":
        return open_target(local_target_record(store))
    rec = store.get_target(name)
    if rec is None:
        raise unknown_name("target", name, target_names(store))
    return open_target(rec)


def check_target(store: Store, name: str) -> dict:
    """Is it reachable, with python, GPUs and free disk? An unreachable one answers reachable: False."""
    from opskit.errors import TargetUnreachable
    try:
        return get_target(store, name).check()
    except TargetUnreachable as e:
        return {"reachable": False, "error": str(e)}


def prepare_target(store: Store, name: str, on_line=print) -> dict:
    """Provision the target, sync the code, and restart its queue's supervisor if it died with work left."""
    tgt = get_target(store, name)
    tgt.prepare(on_line=on_line)
    tgt.sync()
    tgt.ensure_supervisor()
    return {"target": name, "ready": True}
