"""RoPE frequency spectra named by config strings, and position scalings on top of them.

Pure Python (math only): opskit imports it for `opskit rope show`. A config name fully determines
inv_freq; see docs/spectra.md for the formulas and the choices behind ntk and yarn.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

GRAMMAR = """\
spectrum names (K = head_dim/2 frequencies, k = 0..K-1, THETA like 10000, 100k, 500k, 1m):
  geo_THETA                              w_k = THETA^(-k/K)
  anchpoly_pP_omfOMF_tTHETA              log w_k = t^P * log(w_min), t = k/(K-1)
  sigmoid_sSTEEP_mMID_omfOMF_tTHETA      like anchpoly with t^P -> 1/(1+exp(-STEEP (t-MID)))
  sig_sSTEEP_mMID_omfOMF_tTHETA          (older spelling of sigmoid_...)
  hybrid_aALPHA_tTHETA                   (1-ALPHA) geo_THETA + ALPHA anchpoly_p3.9_omf0.3_tTHETA
  where w_min = OMF * THETA^(-(K-1)/K); e.g. geo_500k, anchpoly_p3.9_omf0.3_t100k, hybrid_a0.2_t100k"""

SCALING_TYPES = ("pi", "ntk", "yarn", "dynamic")
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0
HYBRID_ANCHPOLY = (3.9, 0.3)  # (p, omf) of the anchpoly half of hybrid_*

_NUM = r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)"
_THETA = r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?[km]?)"
_PATTERNS = {
    "geo": re.compile(rf"geo_{_THETA}"),
    "anchpoly": re.compile(rf"anchpoly_p{_NUM}_omf{_NUM}_t{_THETA}"),
    "sigmoid": re.compile(rf"(?:sigmoid|sig)_s{_NUM}_m{_NUM}_omf{_NUM}_t{_THETA}"),
    "hybrid": re.compile(rf"hybrid_a{_NUM}_t{_THETA}"),
}


class SpectrumError(ValueError):
    """An invalid spectrum name or scaling; the message shows the grammar where it helps."""


def parse_theta(s: str) -> float:
    """'10000' -> 1e4, '100k' -> 1e5, '1m' -> 1e6, '1.5m' -> 1.5e6."""
    m = re.fullmatch(_THETA, s.strip().lower())
    if not m:
        raise SpectrumError(f"invalid theta {s!r}: expected a number with an optional k/m suffix")
    text = m.group(1)
    mult = {"k": 1e3, "m": 1e6}.get(text[-1], 1.0)
    value = float(text.rstrip("km")) * mult
    if value <= 1.0:
        raise SpectrumError(f"invalid theta {s!r}: must be > 1")
    return value


def _geo(theta: float, K: int) -> list[float]:
    return [theta ** (-k / K) for k in range(K)]


def _anchored(theta: float, omf: float, K: int, shape) -> list[float]:
    """log w_k = log w_max + shape(t) (log w_min - log w_max) with w_max = 1 (w_0 of geo)."""
    log_w_max = 0.0
    log_w_min = math.log(theta ** (-(K - 1) / K) * omf)
    return [math.exp(log_w_max + shape(k / (K - 1)) * (log_w_min - log_w_max)) for k in range(K)]


def _anchpoly(p: float, omf: float, theta: float, K: int) -> list[float]:
    return _anchored(theta, omf, K, lambda t: t**p)


def _sigmoid(steep: float, mid: float, omf: float, theta: float, K: int) -> list[float]:
    return _anchored(theta, omf, K, lambda t: 1.0 / (1.0 + math.exp(-steep * (t - mid))))


def inv_freq(name: str, head_dim: int) -> list[float]:
    """The K = head_dim/2 angular frequencies w_k (radians per position) of spectrum `name`."""
    if head_dim < 4 or head_dim % 2:
        raise SpectrumError(f"head_dim must be an even number >= 4, got {head_dim}")
    K = head_dim // 2
    kind, m = _match(name)
    if kind == "geo":
        return _geo(parse_theta(m.group(1)), K)
    if kind == "anchpoly":
        p, omf, theta = _positive(name, m.group(1), m.group(2)) + [parse_theta(m.group(3))]
        return _anchpoly(p, omf, theta, K)
    if kind == "sigmoid":
        steep, omf = _positive(name, m.group(1), m.group(3))
        mid, theta = float(m.group(2)), parse_theta(m.group(4))
        return _sigmoid(steep, mid, omf, theta, K)
    alpha, theta = float(m.group(1)), parse_theta(m.group(2))
    if not 0.0 <= alpha <= 1.0:
        raise SpectrumError(f"invalid spectrum {name!r}: alpha must be in [0, 1]")
    geo, poly = _geo(theta, K), _anchpoly(*HYBRID_ANCHPOLY, theta, K)
    return [(1 - alpha) * g + alpha * a for g, a in zip(geo, poly)]


def _match(name: str) -> tuple[str, re.Match]:
    for kind, pattern in _PATTERNS.items():
        m = pattern.fullmatch(name)
        if m:
            return kind, m
    raise SpectrumError(f"unknown spectrum {name!r}\n{GRAMMAR}")


def _positive(name: str, *texts: str) -> list[float]:
    values = [float(t) for t in texts]
    if any(v <= 0 for v in values):
        raise SpectrumError(f"invalid spectrum {name!r}: p, steepness and omf must be > 0")
    return values


@dataclass(frozen=True)
class Scaling:
    """A position scaling: `factor` s times the `original_max` training length."""

    type: str
    factor: float
    original_max: int

    def __post_init__(self):
        if self.type not in SCALING_TYPES:
            raise SpectrumError(f"unknown scaling {self.type!r}: expected one of {', '.join(SCALING_TYPES)}")
        if not self.factor >= 1.0:
            raise SpectrumError(f"scaling factor must be >= 1, got {self.factor}")
        if self.original_max <= 0:
            raise SpectrumError(f"scaling original_max must be > 0, got {self.original_max}")


def parse_scaling(obj: dict | None) -> Scaling | None:
    """spec.json's rope.scaling ({"type", "factor", "original_max"} or null) as a Scaling."""
    if obj is None:
        return None
    try:
        fields = str(obj["type"]), float(obj["factor"]), int(obj["original_max"])
    except (KeyError, TypeError, ValueError):
        raise SpectrumError(f"invalid rope scaling {obj!r}: need type, factor, original_max") from None
    return Scaling(*fields)


def apply_scaling(inv_freq: list[float], scaling: Scaling | None, head_dim: int,
                  length: int | None = None) -> tuple[list[float], float]:
    """(scaled inv_freq, attention_factor); attention_factor multiplies cos and sin (HF convention).

    `length` is the sequence length T the frequencies are for; only `dynamic` depends on it (None: the
    original length, where dynamic leaves the spectrum unchanged, as HF does at initialisation).
    """
    w = list(inv_freq)
    if scaling is None:
        return w, 1.0
    s, dim = scaling.factor, head_dim
    if scaling.type == "pi":
        return [x / s for x in w], 1.0
    if scaling.type == "ntk":
        return _ntk(w, s, dim), 1.0
    if scaling.type == "dynamic":
        return _ntk(w, dynamic_ratio(scaling, length), dim), 1.0
    return _yarn(w, s, scaling.original_max, dim)


def _ntk(w: list[float], ratio: float, dim: int) -> list[float]:
    """NTK-aware base change theta' = theta * ratio^(dim/(dim-2)), written per frequency so it applies
    to any spectrum: w_k * (theta'/theta)^(-2k/dim) = w_k * ratio^(-2k/(dim-2))."""
    return [x * ratio ** (-2 * k / (dim - 2)) for k, x in enumerate(w)]


def dynamic_ratio(scaling: Scaling, length: int | None) -> float:
    """HF `dynamic` (dynamic NTK): the base grows by (s T / L - (s - 1))^(dim/(dim-2)) at length
    T = max(length, L); 1 (no change) up to the original length L."""
    s, original = scaling.factor, scaling.original_max
    if length is not None and length <= 0:
        raise SpectrumError(f"length must be > 0, got {length}")
    t = max(length or original, original)
    return s * t / original - (s - 1)


def _yarn(w: list[float], s: float, original_max: int, dim: int) -> tuple[list[float], float]:
    """HF `_compute_yarn_parameters` (truncate=True) with the correction range found on w itself."""
    attention_factor = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    low = math.floor(_index_with_rotations(w, YARN_BETA_FAST, original_max))
    high = math.ceil(_index_with_rotations(w, YARN_BETA_SLOW, original_max))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    out = []
    for k, x in enumerate(w):
        ramp = min(max((k - low) / (high - low), 0.0), 1.0)  # 0: extrapolate (keep w), 1: interpolate (w/s)
        out.append(x / s * ramp + x * (1 - ramp))
    return out, attention_factor


def _index_with_rotations(w: list[float], rotations: float, length: int) -> float:
    """Continuous index k where frequency w_k turns `rotations` times over `length` positions.

    log(rotations_k) is interpolated linearly in k between neighbours (extrapolated from the end
    segments); for a geometric spectrum this is exactly HF's `find_correction_dim`.
    """
    logr = [math.log(length * x / (2 * math.pi)) for x in w]
    target = math.log(rotations)
    segments = list(zip(range(len(w) - 1), logr, logr[1:]))
    if target >= logr[0]:
        j, a, b = segments[0]
    elif target <= logr[-1]:
        j, a, b = segments[-1]
    else:
        j, a, b = next(seg for seg in segments if seg[1] >= target >= seg[2])
    if a == b:
        return float(j)
    return j + (a - target) / (a - b)


def rope_parameters(name: str, head_dim: int, scaling: Scaling | None = None,
                    length: int | None = None) -> tuple[list[float], float]:
    """(inv_freq, attention_factor) for spectrum `name` with an optional scaling: what the model takes
    (at sequence length `length` for a `dynamic` scaling)."""
    return apply_scaling(inv_freq(name, head_dim), scaling, head_dim, length)


def describe(name: str, head_dim: int = 64, scaling: Scaling | None = None, length: int | None = None) -> dict:
    """Plain data for `opskit rope show` (`length`: the sequence length a `dynamic` scaling is shown at)."""
    w, attention_factor = rope_parameters(name, head_dim, scaling, length)
    return {
        "name": name,
        "head_dim": head_dim,
        "inv_freq": w,
        "wavelengths": [2 * math.pi / x for x in w],
        "attention_factor": attention_factor,
        "scaling": asdict(scaling) if scaling else None,
        "length": length,
    }
