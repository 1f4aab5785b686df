"""The experiment catalog: `configs/*.yaml` matrices, validated on load, expanded into runs.

A matrix fixes the model, data, training and evaluation settings; its phases pick configs x seeds
and a fraction of the token budget. See docs/catalog.md for the file format.
Pure functions: nothing here touches the store or a target.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opskit.errors import OpsError, unknown_name
from train import contract
from train.spec import DTYPES, EVAL_MODES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_MATRIX = "1p5b"  # p0/p1/p2 mean the 1.5B matrix unless --matrix names another


class CatalogError(OpsError):
    pass


@dataclass(frozen=True)
class Phase:
    name: str
    configs: tuple[str, ...]
    seeds: tuple[int, ...]
    token_fraction: float = 1.0
    eval_lengths: tuple[int, ...] | None = None  # None: the matrix's
    gate: dict | None = None  # e.g. {"metric_length": 2048, "max_rel_above_best": 0.15}
    from_gate: str | None = None  # the phase whose gate decides which configs run here
    kind: str = "train"  # train | downstream
    after: str | None = None  # downstream phases evaluate this phase's runs
    preset: str | None = None  # overrides the matrix's model (scaling studies vary the size by phase)


@dataclass(frozen=True)
class Matrix:
    name: str
    path: Path
    description: str
    preset: str
    tokenizer: str
    data: dict
    train: dict
    eval: dict
    configs: dict[str, tuple[str, ...]]  # group -> names (core, optional)
    seeds: tuple[int, ...]
    phases: dict[str, Phase] = field(default_factory=dict)
    downstream: dict = field(default_factory=dict)  # p2 settings: tasks, limit, passkey, suites
    tracking: tuple[str, ...] = ()  # trackers every run of the matrix logs to (docs/trackers.md)

    @property
    def all_configs(self) -> list[str]:
        return [c for group in self.configs.values() for c in group]


@dataclass(frozen=True)
class PlannedRun:
    """One run a phase expands to; `settings` is everything the trainer's spec needs from the catalog."""

    matrix: str
    phase: str
    config: str
    seed: int
    settings: dict

    @property
    def name(self) -> str:
        return run_name(self.phase, self.config, self.seed)


run_name = contract.run_name


def parse_run_name(name: str) -> tuple[str, str, int]:
    try:
        return contract.parse_run_name(name)
    except ValueError as e:
        raise OpsError(str(e)) from None


# ---------------------------------------------------------------- loading with line numbers


def _plain(node: yaml.Node, path: str, lines: dict[str, int]) -> Any:
    """Turn a composed YAML node into plain data, remembering the line of every path."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = key_node.value
            out[key] = _plain(value_node, f"{path}.{key}" if path else key, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(v, f"{path}[{i}]", lines) for i, v in enumerate(node.value)]
    return yaml.SafeLoader(" ").construct_object(node)  # scalar, with YAML's typing


class _Validator:
    def __init__(self, path: Path, lines: dict[str, int]):
        self.path, self.lines = path, lines

    def fail(self, where: str, msg: str):
        line = self.lines.get(where) or self.lines.get(where.rsplit(".", 1)[0]) or 1
        raise CatalogError(f"{self.path}:{line}: {where}: {msg}")

    def get(self, data: dict, key: str, where: str, kind: type | tuple, required: bool = True, default=None):
        full = f"{where}.{key}" if where else key
        if key not in data:
            if required:
                self.fail(where or key, f"missing required field '{key}'")
            return default
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.fail(full, f"expected {names}, got {type(value).__name__} {value!r}")
        return value


_TRAIN_FIELDS = {  # field -> type; all required
    "tokens": int, "seq_len": int, "micro_batch": int, "grad_accum": int, "lr": float,
    "warmup_frac": float, "weight_decay": float, "grad_clip": float, "dtype": str,
    "checkpoint_every": int, "keep_checkpoints": int, "log_every": int,
}


def _load_file(path: Path) -> Matrix:
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise CatalogError(f"{path}:{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    lines: dict[str, int] = {}
    data = _plain(node, "", lines) if node is not None else None
    v = _Validator(path, lines)
    if not isinstance(data, dict):
        v.fail("(top)", "a matrix file must be a mapping")
    unknown = set(data) - {"name", "description", "default", "model", "tokenizer", "data", "train", "eval",
                           "configs", "seeds", "phases", "downstream", "tracking"}
    if unknown:
        v.fail(sorted(unknown)[0], "unknown field (valid: name, description, model, tokenizer, data, train, eval, "
                                   "configs, seeds, phases, downstream, tracking)")

    name = v.get(data, "name", "", str)
    model = v.get(data, "model", "", dict)
    preset = v.get(model, "preset", "model", str)
    tokenizer = v.get(data, "tokenizer", "", str)
    data_cfg = v.get(data, "data", "", dict)
    train_src = v.get(data_cfg, "train", "data", list)
    for i, src in enumerate(train_src):
        where = f"data.train[{i}]"
        if not isinstance(src, dict):
            v.fail(where, "expected {dataset: NAME, weight: W}")
        v.get(src, "dataset", where, str)
        if v.get(src, "weight", where, float) <= 0:
            v.fail(f"{where}.weight", "weight must be > 0")
    val = v.get(data_cfg, "validation", "data", dict)
    v.get(val, "dataset", "data.validation", str)
    v.get(val, "max_tokens", "data.validation", int)

    train = v.get(data, "train", "", dict)
    for key, kind in _TRAIN_FIELDS.items():
        train[key] = v.get(train, key, "train", kind)
    extra = set(train) - set(_TRAIN_FIELDS) - {"compile", "activation_checkpointing"}
    if extra:
        v.fail(f"train.{sorted(extra)[0]}", f"unknown training field (valid: {', '.join(_TRAIN_FIELDS)}, compile, activation_checkpointing)")
    if train["dtype"] not in DTYPES:
        v.fail("train.dtype", f"must be one of {', '.join(DTYPES)}")
    compile_setting = train.setdefault("compile", "auto")
    if not (isinstance(compile_setting, bool) or compile_setting == "auto"):
        v.fail("train.compile", "must be true, false or auto (on for CUDA, off for CPU)")

    ev = v.get(data, "eval", "", dict)
    lengths = v.get(ev, "lengths", "eval", list)
    if not lengths or not all(isinstance(x, int) and x > 0 for x in lengths):
        v.fail("eval.lengths", "expected a list of positive integers")
    v.get(ev, "chunks", "eval", int)
    if v.get(ev, "mode", "eval", str, required=False, default=EVAL_MODES[0]) not in EVAL_MODES:
        v.fail("eval.mode", f"must be one of {', '.join(EVAL_MODES)}")
    ev.setdefault("mode", EVAL_MODES[0])
    stride = v.get(ev, "stride", "eval", int, required=False)
    if stride is not None and stride <= 0:
        v.fail("eval.stride", "must be a positive number of tokens (sliding-window perplexity), e.g. 256")
    tracking = _tracking(v, data.get("tracking", []))

    groups = v.get(data, "configs", "", dict)
    configs: dict[str, tuple[str, ...]] = {}
    for group, names in groups.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            v.fail(f"configs.{group}", "expected a list of config names")
        for i, cfg in enumerate(names):
            _check_spectrum(v, f"configs.{group}[{i}]", cfg)
        configs[group] = tuple(names)
    seeds = v.get(data, "seeds", "", list)
    if not seeds or not all(isinstance(s, int) for s in seeds):
        v.fail("seeds", "expected a list of integers")

    downstream = v.get(data, "downstream", "", dict, required=False, default={})
    matrix = Matrix(name=name, path=path, description=data.get("description", ""), preset=preset,
                    tokenizer=tokenizer, data=data_cfg, train=train, eval=ev, configs=configs,
                    seeds=tuple(seeds), downstream=downstream, tracking=tracking)
    phases_src = v.get(data, "phases", "", dict)
    phases = {p: _load_phase(v, matrix, p, body) for p, body in phases_src.items()}
    for p in phases.values():
        for ref in (p.from_gate, p.after):
            if ref and ref not in phases:
                v.fail(f"phases.{p.name}", f"refers to unknown phase '{ref}'")
        if p.kind == "downstream" and not p.after:
            v.fail(f"phases.{p.name}", "a downstream phase needs `after: PHASE` (the runs it evaluates)")
    return dataclasses.replace(matrix, phases=phases)


def _tracking(v: _Validator, value: Any) -> tuple[str, ...]:
    from train.spec import tracking_problem  # pure Python: the spec's own rule
    problem = tracking_problem(value)
    if problem:
        v.fail(f"tracking{problem[0]}", problem[1])
    return tuple(value)


def _check_spectrum(v: _Validator, where: str, name: str) -> None:
    try:  # pure Python, no torch
        from train.spectra import inv_freq
    except ImportError:
        return
    try:
        inv_freq(name, 64)
    except ValueError as e:
        v.fail(where, str(e).splitlines()[0])


def _load_phase(v: _Validator, m: Matrix, name: str, body: Any) -> Phase:
    where = f"phases.{name}"
    if not isinstance(body, dict):
        v.fail(where, "a phase must be a mapping")
    kind = v.get(body, "kind", where, str, required=False, default="train")
    if kind not in ("train", "downstream"):
        v.fail(f"{where}.kind", "must be train or downstream")
    sel = body.get("configs", "all")
    from_gate = None
    if isinstance(sel, dict) and "from_gate" in sel:
        from_gate = sel["from_gate"]
        configs = tuple(m.configs.get("core", ())) or tuple(m.all_configs)
    elif sel == "all":
        configs = tuple(m.all_configs)
    elif isinstance(sel, str) and sel in m.configs:
        configs = m.configs[sel]
    elif isinstance(sel, list):
        for i, c in enumerate(sel):
            if c not in m.all_configs:
                v.fail(f"{where}.configs[{i}]", f"'{c}' is not in the matrix's configs")
        configs = tuple(sel)
    else:
        v.fail(f"{where}.configs", f"expected all, a group ({', '.join(m.configs)}), a list, or {{from_gate: PHASE}}")
    seeds = body.get("seeds", "all")
    seeds = m.seeds if seeds == "all" else seeds
    if not isinstance(seeds, (list, tuple)) or not all(isinstance(s, int) for s in seeds):
        v.fail(f"{where}.seeds", "expected all or a list of integers")
    fraction = v.get(body, "token_fraction", where, float, required=False, default=1.0)
    if not 0 < fraction <= 1:
        v.fail(f"{where}.token_fraction", "must be in (0, 1]")
    lengths = body.get("eval_lengths")
    if lengths is not None and not (isinstance(lengths, list) and all(isinstance(x, int) for x in lengths)):
        v.fail(f"{where}.eval_lengths", "expected a list of integers")
    gate = body.get("gate")
    if gate is not None:
        if not isinstance(gate, dict):
            v.fail(f"{where}.gate", "expected {metric_length: L, max_rel_above_best: F}")
        v.get(gate, "metric_length", f"{where}.gate", int)
        v.get(gate, "max_rel_above_best", f"{where}.gate", float)
    preset = v.get(body, "preset", where, str, required=False)
    return Phase(name=name, configs=tuple(configs), seeds=tuple(seeds), token_fraction=fraction,
                 eval_lengths=tuple(lengths) if lengths else None, gate=gate, from_gate=from_gate,
                 kind=kind, after=body.get("after"), preset=preset)


# ---------------------------------------------------------------- lookup


def matrix_files(config_dir: Path = CONFIG_DIR) -> list[Path]:
    return sorted(config_dir.glob("*.yaml"))


def load_all(config_dir: Path = CONFIG_DIR) -> dict[str, Matrix]:
    matrices = {}
    for path in matrix_files(config_dir):
        m = _load_file(path)
        if m.name in matrices:
            raise CatalogError(f"{path}:1: matrix name '{m.name}' also used by {matrices[m.name].path}")
        matrices[m.name] = m
    return matrices


def load_matrix(name_or_path: str, config_dir: Path = CONFIG_DIR) -> Matrix:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise CatalogError(f"matrix file not found: {path}")
        return _load_file(path)
    matrices = load_all(config_dir)
    if name_or_path not in matrices:
        raise unknown_name("matrix", name_or_path, sorted(matrices))
    return matrices[name_or_path]


def resolve_phase(phase: str, matrix: str | None = None, config_dir: Path = CONFIG_DIR) -> tuple[Matrix, Phase]:
    """Find the matrix that defines `phase`; p0/p1/p2 mean the 1.5B matrix unless `matrix` says otherwise."""
    if matrix:
        m = load_matrix(matrix, config_dir)
        if phase not in m.phases:
            raise unknown_name(f"phase of matrix {m.name}", phase, sorted(m.phases))
        return m, m.phases[phase]
    matrices = load_all(config_dir)
    owners = [m for m in matrices.values() if phase in m.phases]
    if not owners:
        every = sorted({p for m in matrices.values() for p in m.phases})
        raise unknown_name("phase", phase, every)
    if len(owners) > 1:
        owners = [m for m in owners if m.name == DEFAULT_MATRIX] or owners
        if len(owners) > 1:
            raise CatalogError(f"phase '{phase}' is in several matrices ({', '.join(m.name for m in owners)}); pass --matrix")
    return owners[0], owners[0].phases[phase]


# ---------------------------------------------------------------- expansion


def phase_tokens(m: Matrix, phase: Phase) -> int:
    """Training tokens per run of a phase: its fraction of the matrix's budget."""
    return int(m.train["tokens"] * phase.token_fraction)


def describe(matrix: str | None = None, phase: str | None = None, config_dir: Path = CONFIG_DIR) -> list[dict]:
    """Each (matrix, phase) with what it expands to: `opskit matrix show`."""
    if matrix:
        matrices = [load_matrix(matrix, config_dir)]
    elif phase:
        matrices = [resolve_phase(phase, config_dir=config_dir)[0]]
    else:
        matrices = list(load_all(config_dir).values())
    out = []
    for m in matrices:
        if phase and phase not in m.phases:
            raise unknown_name(f"phase of matrix {m.name}", phase, sorted(m.phases))
        for ph in [m.phases[phase]] if phase else list(m.phases.values()):
            if ph.from_gate:
                runs = [f"{ph.name}/<survivors of {ph.from_gate}>/s{s}" for s in ph.seeds]
            else:
                runs = [r.name for r in expand(m, ph)]
            out.append({"matrix": m.name, "phase": ph.name, "kind": ph.kind, "preset": ph.preset or m.preset,
                        "tokens": phase_tokens(m, ph), "configs": list(ph.configs), "seeds": list(ph.seeds),
                        "gate": ph.gate, "from_gate": ph.from_gate, "runs": runs})
    return out


def expand(m: Matrix, phase: Phase, configs: list[str] | None = None, seeds: list[int] | None = None) -> list[PlannedRun]:
    """The runs a phase expands to: (chosen or phase) configs x (chosen or phase) seeds."""
    chosen = list(configs) if configs else list(phase.configs)
    for c in chosen:
        if c not in m.all_configs:
            raise unknown_name(f"config of matrix {m.name}", c, m.all_configs)
    chosen_seeds = list(seeds) if seeds else list(phase.seeds)
    tokens = phase_tokens(m, phase)
    runs = []
    for config in chosen:
        for seed in chosen_seeds:
            settings = {
                "matrix": m.name, "preset": phase.preset or m.preset, "tokenizer": m.tokenizer,
                "rope": {"spectrum": config, "scaling": None},
                "data": {"train": [dict(s) for s in m.data["train"]], "validation": dict(m.data["validation"])},
                "train_tokens": tokens,
                **{k: m.train[k] for k in ("seq_len", "micro_batch", "grad_accum", "lr", "warmup_frac",
                                           "weight_decay", "grad_clip", "dtype")},
                "compile": m.train.get("compile", "auto"),
                "activation_checkpointing": bool(m.train.get("activation_checkpointing", False)),
                "eval": {"lengths": list(phase.eval_lengths or m.eval["lengths"]), "chunks": m.eval["chunks"],
                         "mode": m.eval["mode"], **({"stride": m.eval["stride"]} if m.eval.get("stride") else {})},
                "tracking": list(m.tracking),
                "checkpoint_every": m.train["checkpoint_every"], "keep_checkpoints": m.train["keep_checkpoints"],
                "log_every": m.train["log_every"],
            }
            if phase.kind == "downstream":  # train.p2 evaluates the run of phase.after (docs/p2.md)
                settings["downstream"] = {**m.downstream, "after": phase.after}
            runs.append(PlannedRun(matrix=m.name, phase=phase.name, config=config, seed=seed, settings=settings))
    return runs
