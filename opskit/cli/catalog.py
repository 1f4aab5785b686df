"""Commands on the catalog and what it names: matrix show, models, rope show, datasets."""
from __future__ import annotations

from typing import Optional

import typer

from opskit.cli.app import app, matrix_app, rope_app
from opskit.cli.output import JSON, console, emit, fmt_num, key_values, table
from opskit.errors import OpsError


@matrix_app.command("show")
def matrix_show(matrix: Optional[str] = typer.Option(None, "--matrix", "-m", help="Matrix name or YAML file.", metavar="MATRIX"),
                phase: Optional[str] = typer.Option(None, "--phase", "-p", help="Only this phase.", metavar="PHASE"),
                as_json: bool = JSON):
    """The matrices and the runs each phase expands to.

    \b
    Example: opskit matrix show --matrix 1p5b --phase p0
    """
    from opskit import catalog
    emit(catalog.describe(matrix, phase), as_json, _print_phases)


def _print_phases(phases: list[dict]) -> None:
    for p in phases:
        typer.echo(f"{p['matrix']} / {p['phase']} ({p['kind']}, preset {p['preset']}, "
                   f"{fmt_num(p['tokens'])} tokens per run)" + (f", gate {p['gate']}" if p["gate"] else ""))
        for r in p["runs"]:
            typer.echo(f"  {r}")


@app.command()
def models(as_json: bool = JSON):
    """Model presets with their parameter counts (computed from the shapes).

    \b
    Example: opskit models --json
    """
    from train.presets import list_presets
    cols = ("hidden", "layers", "heads", "head_dim", "intermediate", "vocab")
    emit(list_presets(), as_json, lambda rows: console().print(table(
        ["name", *cols, "params"], [[r["name"], *(str(r[k]) for k in cols), f"{r['params'] / 1e6:,.1f}M"]
                                    for r in rows], left=("name",))))


DEFAULT_HEAD_DIM = 64


def _spectrum_names() -> str:
    from train.spectra import GRAMMAR
    return "\b\n" + GRAMMAR


@rope_app.command("show", epilog=_spectrum_names())
def rope_show(name: str = typer.Argument(..., help="Spectrum, e.g. geo_500k, hybrid_a0.2_t100k.", metavar="NAME"),
              preset: Optional[str] = typer.Option(None, "--preset", metavar="PRESET",
                                                   help="Take head_dim from this model preset (opskit models)."),
              head_dim: Optional[int] = typer.Option(None, "--head-dim", metavar="D",
                                                     help=f"Frequencies for this head_dim (default: the preset's, "
                                                          f"else {DEFAULT_HEAD_DIM})."),
              scaling: Optional[str] = typer.Option(None, "--scaling", help="pi, ntk, yarn or dynamic.",
                                                    metavar="pi|ntk|yarn|dynamic"),
              factor: Optional[float] = typer.Option(None, "--factor", help="Scaling factor s (>= 1).", metavar="S"),
              original_max: Optional[int] = typer.Option(None, "--original-max", help="Original (training) length.",
                                                         metavar="LENGTH"),
              length: Optional[int] = typer.Option(None, "--length", metavar="LENGTH",
                                                   help="Sequence length a dynamic scaling is computed at (HF "
                                                        "dynamic NTK)."),
              as_json: bool = JSON):
    """Frequencies, wavelengths and attention factor of a spectrum (with an optional scaling).

    \b
    Example: opskit rope show hybrid_a0.2_t100k --preset 1.5B
    Example: opskit rope show geo_500k --preset tiny --scaling yarn --factor 4 --original-max 2048
    """
    from train import presets, spectra
    if preset and head_dim is not None:
        raise OpsError("give --preset or --head-dim, not both")
    try:
        if preset:
            head_dim, source = presets.get_preset(preset).head_dim, f"preset {preset}"
        elif head_dim is None:
            head_dim, source = DEFAULT_HEAD_DIM, "the default; --preset or --head-dim choose another"
        else:
            source = "--head-dim"
        sc = None
        if scaling:
            if factor is None or original_max is None:
                raise OpsError("--scaling needs --factor and --original-max")
            sc = spectra.Scaling(scaling, factor, original_max)
        d = spectra.describe(name, head_dim=head_dim, scaling=sc, length=length)
    except ValueError as e:  # a spectrum, preset or scaling mistake: its first line is the message
        lines = str(e).splitlines()
        more = " (`opskit rope show --help` lists the spectrum names)" if len(lines) > 1 else ""
        raise OpsError(lines[0] + more) from None
    emit({**d, "head_dim_from": source}, as_json, _print_spectrum)


def _print_spectrum(d: dict) -> None:
    typer.echo(f"{d['name']}  head_dim {d['head_dim']} ({d['head_dim_from']})  "
               f"attention factor {d['attention_factor']:.4f}")
    typer.echo(f"{'k':>4}  {'inv_freq':>14}  {'wavelength':>14}")
    for k, (w, lam) in enumerate(zip(d["inv_freq"], d["wavelengths"])):
        typer.echo(f"{k:>4}  {w:>14.6e}  {lam:>14.1f}")


@app.command()
def datasets(info: Optional[str] = typer.Option(None, "--info", help="Details of one dataset.", metavar="NAME"),
             as_json: bool = JSON):
    """Datasets the trainer knows (Hugging Face ids, local:PATH, the offline demo corpus).

    \b
    Example: opskit datasets --info fineweb-edu
    """
    from train.data import registry
    try:
        result = registry.dataset_info(info) if info else registry.list_datasets()
    except ValueError as e:
        raise OpsError(str(e)) from None
    cols = ("name", "hf_id", "config", "size", "use")
    emit(result, as_json, (lambda d: key_values(d, width=12)) if info else lambda rows: console().print(table(
        list(cols), [[str(r.get(k) or "-") for k in cols] for r in rows], left=cols)))
