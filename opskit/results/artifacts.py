"""Read pulled runs from results/raw/<phase>/<config>/seed<k>/ (formats: docs/run-directory.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from opskit.errors import OpsError
from opskit.states import DONE
from train import contract
from train.contract import DOWNSTREAM, PASSKEY


NOT_PULLED = "done, not pulled"  # `opskit pull` brings its results


class ArtifactError(OpsError):
    pass


@dataclass
class RunArtifacts:
    """One pulled run. `results` is None until the run finished (or was imported)."""

    phase: str
    config: str
    seed: int
    path: Path | None
    results: dict | None = None
    spec: dict | None = None
    status: dict | None = None
    eval_per_length: dict | None = None
    downstream: dict | None = None
    passkey: dict | None = None
    loss_curve: list[dict] = field(default_factory=list)
    store_state: str | None = None  # the store's view of the run (its state now, pulled or not)
    warnings: list[str] = field(default_factory=list)  # what was skipped while reading it

    @property
    def name(self) -> str:
        return contract.run_name(self.phase, self.config, self.seed)

    @property
    def state(self) -> str:
        """done, or why the run has no results: done but not pulled yet, failed, interrupted,
        training, ..., missing."""
        if self.results is not None or self.downstream is not None:  # downstream phases write no results.json
            return DONE
        if self.store_state == DONE:  # finished on its target since the last pull (or never pulled)
            return NOT_PULLED
        if self.status and self.status.get("state"):
            return self.status["state"]
        if self.store_state:
            return self.store_state
        return "missing" if self.path is None else "no-results"

    @property
    def ppl(self) -> dict[int, float]:
        """Perplexity by evaluation length (int keys), from results.json."""
        raw = (self.results or {}).get("ppl") or {}
        return {int(k): float(v) for k, v in raw.items() if v is not None}

    @property
    def train_len(self) -> int | None:
        results = self.results or {}
        for source in (self.spec, results, results.get("legacy", {}).get("train_cfg")):
            for key in ("seq_len", "max_seq_len", "seq_length", "block_size"):
                if source and source.get(key):
                    return int(source[key])
        return None


def _read_json(path: Path):
    try:
        return contract.read_json(path)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_loss_curve(path: Path, warnings: list[str] | None = None) -> list[dict]:
    """Lines of loss_curve.jsonl. A line that is not a JSON object is skipped and named in `warnings`
    (a torn last line of a run still writing is dropped silently): one bad line costs that point only."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    points = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            point = json.loads(line)
        except json.JSONDecodeError:
            point = None
        if isinstance(point, dict) and all(isinstance(point.get(k), (int, float)) and not isinstance(point[k], bool)
                                           for k in ("tokens", "loss")):
            points.append(point)
        elif i < len(lines) - 1 and warnings is not None:
            warnings.append(f"{path}:{i + 1}: skipped, not a loss-curve point: {line[:60]!r}")
    return points


def _seed_of(dirname: str) -> int | None:
    if dirname.startswith("seed") and dirname[4:].isdigit():
        return int(dirname[4:])
    return None


def read_run(path: Path, phase: str, config: str, seed: int) -> RunArtifacts:
    warnings: list[str] = []
    return RunArtifacts(
        phase=phase, config=config, seed=seed, path=path,
        results=_read_json(path / contract.RESULTS),
        spec=_read_json(path / contract.SPEC),
        status=_read_json(path / contract.STATUS),
        eval_per_length=_read_json(path / contract.EVAL_PER_LENGTH),
        downstream=_read_json(path / DOWNSTREAM),
        passkey=_read_json(path / PASSKEY),
        loss_curve=read_loss_curve(path / contract.LOSS_CURVE, warnings),
        warnings=warnings,
    )


RAW_DIR = "raw"  # results/raw/<phase>/<config>/seed<k>/: pulled and imported runs


def run_path(raw_dir: Path, phase: str, config: str, seed: int) -> Path:
    """A run's folder under results/raw/ (or any raw_dir)."""
    return Path(raw_dir) / phase / config / f"seed{seed}"


def phases_in(raw_dir: Path) -> list[str]:
    raw_dir = Path(raw_dir)
    return sorted(p.name for p in raw_dir.iterdir() if p.is_dir()) if raw_dir.is_dir() else []


def load_runs(raw_dir: Path, phase: str | None = None) -> list[RunArtifacts]:
    """Every run directory under raw_dir (one phase, or all), sorted by phase, config, seed."""
    raw_dir = Path(raw_dir)
    phases = [phase] if phase else phases_in(raw_dir)
    runs = []
    for ph in phases:
        phase_dir = raw_dir / ph
        if not phase_dir.is_dir():
            continue
        for config_dir in sorted(p for p in phase_dir.iterdir() if p.is_dir()):
            for seed_dir in sorted(p for p in config_dir.iterdir() if p.is_dir()):
                seed = _seed_of(seed_dir.name)
                if seed is not None:
                    runs.append(read_run(seed_dir, ph, config_dir.name, seed))
    return sorted(runs, key=lambda r: (r.phase, r.config, r.seed))


def add_expected(runs: list[RunArtifacts], expected: list[tuple[str, str, int]],
                 store_states: dict[str, str] | None = None) -> list[RunArtifacts]:
    """Add a placeholder for every expected (phase, config, seed) that was never pulled; every run
    gets the store's state of it."""
    have = {(r.phase, r.config, r.seed) for r in runs}
    store_states = store_states or {}
    for r in runs:
        r.store_state = store_states.get(r.name, r.store_state)
    extra = [RunArtifacts(phase=p, config=c, seed=s, path=None, store_state=store_states.get(contract.run_name(p, c, s)))
             for p, c, s in expected if (p, c, s) not in have]
    return sorted(runs + extra, key=lambda r: (r.phase, r.config, r.seed))
