"""Spectra and scalings against values computed here from the issue's formulas (numpy) and,
for scalings of a geometric spectrum, against Hugging Face transformers' rope utilities."""
import json
import math

import numpy as np
import pytest

from train.spectra import (
    Scaling,
    SpectrumError,
    apply_scaling,
    describe,
    dynamic_ratio,
    inv_freq,
    parse_scaling,
    parse_theta,
    rope_parameters,
)

HEAD_DIMS = (64, 128)


def geo_ref(theta, head_dim):
    K = head_dim // 2
    return theta ** (-np.arange(K) / K)


def anchored_ref(shape_values, theta, omf, head_dim):
    K = head_dim // 2
    log_w_min = np.log(geo_ref(theta, head_dim)[-1] * omf)
    log_w_max = np.log(geo_ref(theta, head_dim)[0])
    return np.exp(log_w_max + shape_values * (log_w_min - log_w_max))


def anchpoly_ref(p, omf, theta, head_dim):
    t = np.arange(head_dim // 2) / (head_dim // 2 - 1)
    return anchored_ref(t**p, theta, omf, head_dim)


def sigmoid_ref(steep, mid, omf, theta, head_dim):
    t = np.arange(head_dim // 2) / (head_dim // 2 - 1)
    return anchored_ref(1 / (1 + np.exp(-steep * (t - mid))), theta, omf, head_dim)


@pytest.mark.parametrize("text, value", [("10000", 1e4), ("100k", 1e5), ("500k", 5e5), ("1m", 1e6), ("1.5m", 1.5e6)])
def test_parse_theta(text, value):
    assert parse_theta(text) == value


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("theta_name, theta", [("10000", 1e4), ("100k", 1e5), ("500k", 5e5), ("1m", 1e6)])
def test_geo(head_dim, theta_name, theta):
    np.testing.assert_allclose(inv_freq(f"geo_{theta_name}", head_dim), geo_ref(theta, head_dim), rtol=1e-12)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("p, omf, theta_name, theta", [(3.9, 0.3, "100k", 1e5), (2.0, 1.0, "10000", 1e4), (1.5, 0.5, "1m", 1e6)])
def test_anchpoly(head_dim, p, omf, theta_name, theta):
    got = inv_freq(f"anchpoly_p{p}_omf{omf}_t{theta_name}", head_dim)
    np.testing.assert_allclose(got, anchpoly_ref(p, omf, theta, head_dim), rtol=1e-12)
    assert got[0] == pytest.approx(1.0)  # anchored at geo's w_max ...
    assert got[-1] == pytest.approx(theta ** (-(head_dim // 2 - 1) / (head_dim // 2)) * omf)  # ... and omf * geo's w_min


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("prefix", ["sigmoid", "sig"])
def test_sigmoid_both_spellings(head_dim, prefix):
    got = inv_freq(f"{prefix}_s8_m0.5_omf0.3_t500k", head_dim)
    want = sigmoid_ref(8.0, 0.5, 0.3, 5e5, head_dim)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] < 1.0  # not renormalised: the end points are not hit exactly


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_hybrid(head_dim, alpha):
    want = (1 - alpha) * geo_ref(1e5, head_dim) + alpha * anchpoly_ref(3.9, 0.3, 1e5, head_dim)
    np.testing.assert_allclose(inv_freq(f"hybrid_a{alpha}_t100k", head_dim), want, rtol=1e-12)


def test_hybrid_is_mix_of_named_spectra():
    geo, poly = np.array(inv_freq("geo_100k", 64)), np.array(inv_freq("anchpoly_p3.9_omf0.3_t100k", 64))
    np.testing.assert_allclose(inv_freq("hybrid_a0.2_t100k", 64), 0.8 * geo + 0.2 * poly, rtol=1e-12)


@pytest.mark.parametrize("name", ["geo", "geo_", "geo_abc", "anchpoly_p3_t100k", "cosine_t10k", "GEO_10000"])
def test_unknown_names_show_grammar(name):
    with pytest.raises(SpectrumError, match="unknown spectrum") as err:
        inv_freq(name, 64)
    assert "anchpoly_pP_omfOMF_tTHETA" in str(err.value) and "hybrid_aALPHA_tTHETA" in str(err.value)


@pytest.mark.parametrize("name, message", [("hybrid_a2_t100k", "alpha"), ("geo_1", "theta"), ("anchpoly_p0_omf0.3_t100k", "> 0")])
def test_invalid_values(name, message):
    with pytest.raises(SpectrumError, match=message):
        inv_freq(name, 64)


def test_invalid_head_dim():
    with pytest.raises(SpectrumError, match="head_dim"):
        inv_freq("geo_10000", 63)


# --- scalings -------------------------------------------------------------------------------


def hf_rope(rope_type, head_dim, theta, factor, original_max, seq_len=None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": rope_type, "rope_theta": theta, "factor": factor}
    if rope_type == "yarn":
        params["original_max_position_embeddings"] = original_max
    config = LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
        max_position_embeddings=original_max, rope_parameters=params,
    )
    freqs, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    return freqs.double().numpy(), attention_factor


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("theta_name, theta", [("10000", 1e4), ("500k", 5e5)])
@pytest.mark.parametrize("factor, original_max", [(4.0, 2048), (8.0, 4096), (2.0, 1024)])
def test_scalings_match_transformers_on_geometric(head_dim, theta_name, theta, factor, original_max):
    base = inv_freq(f"geo_{theta_name}", head_dim)

    got, af = apply_scaling(base, Scaling("pi", factor, original_max), head_dim)
    want, hf_af = hf_rope("linear", head_dim, theta, factor, original_max)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert af == hf_af == 1.0

    # Static NTK-aware base change = HF "dynamic" at the sequence length where its
    # (factor * seq_len / original_max - (factor - 1)) equals the factor.
    got, af = apply_scaling(base, Scaling("ntk", factor, original_max), head_dim)
    seq_len = original_max * (2 * factor - 1) / factor
    want, _ = hf_rope("dynamic", head_dim, theta, factor, original_max, seq_len=seq_len)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # ... and HF "dynamic" with factor 1 at seq_len = factor * original_max.
    want, _ = hf_rope("dynamic", head_dim, theta, 1.0, original_max, seq_len=factor * original_max)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert af == 1.0

    got, af = apply_scaling(base, Scaling("yarn", factor, original_max), head_dim)
    want, hf_af = hf_rope("yarn", head_dim, theta, factor, original_max)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert af == pytest.approx(hf_af) and af == pytest.approx(0.1 * math.log(factor) + 1)


def yarn_ref(w, factor, original_max, head_dim):
    """YaRN with the correction range found on the spectrum's own rotation counts (docs/spectra.md)."""
    w = np.asarray(w)
    k = np.arange(len(w))
    log_rot = np.log(original_max * w / (2 * np.pi))  # decreasing in k

    def index_at(rotations):
        x = np.log(rotations)
        if x >= log_rot[0]:
            a, b, j = log_rot[0], log_rot[1], 0
        elif x <= log_rot[-1]:
            a, b, j = log_rot[-2], log_rot[-1], len(w) - 2
        else:
            return float(np.interp(x, log_rot[::-1], k[::-1]))
        return j + (a - x) / (a - b)

    low = max(math.floor(index_at(32)), 0)
    high = min(math.ceil(index_at(1)), head_dim - 1)
    ramp = np.clip((k - low) / (high - low), 0, 1)
    return w / factor * ramp + w * (1 - ramp)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("name", ["anchpoly_p3.9_omf0.3_t100k", "sigmoid_s8_m0.5_omf0.3_t500k", "hybrid_a0.2_t100k"])
def test_scalings_on_non_geometric_spectra(head_dim, name):
    w = np.array(inv_freq(name, head_dim))
    s, L = 4.0, 2048
    got, _ = apply_scaling(list(w), Scaling("pi", s, L), head_dim)
    np.testing.assert_allclose(got, w / s, rtol=1e-12)

    got, _ = apply_scaling(list(w), Scaling("ntk", s, L), head_dim)
    K = head_dim // 2
    theta_ratio = s ** (head_dim / (head_dim - 2))
    np.testing.assert_allclose(got, w * theta_ratio ** (-2 * np.arange(K) / head_dim), rtol=1e-12)
    assert got[0] == w[0] and got[-1] == pytest.approx(w[-1] / s)

    got, af = apply_scaling(list(w), Scaling("yarn", s, L), head_dim)
    np.testing.assert_allclose(got, yarn_ref(w, s, L, head_dim), rtol=1e-12)
    rotations = L * w / (2 * np.pi)
    fast, slow = rotations > 64, rotations < 0.5  # well outside the ramp after floor/ceil
    np.testing.assert_allclose(np.array(got)[fast], w[fast])
    np.testing.assert_allclose(np.array(got)[slow], w[slow] / s)
    assert af == pytest.approx(0.1 * math.log(s) + 1)


def test_scaling_factor_one_and_none_are_identity():
    w = inv_freq("geo_10000", 64)
    assert apply_scaling(w, None, 64) == (w, 1.0)
    got, af = apply_scaling(w, Scaling("yarn", 1.0, 2048), 64)
    np.testing.assert_allclose(got, w)
    assert af == 1.0


def test_parse_scaling():
    assert parse_scaling(None) is None
    assert parse_scaling({"type": "yarn", "factor": 4, "original_max": 2048}) == Scaling("yarn", 4.0, 2048)
    with pytest.raises(SpectrumError, match="unknown scaling"):
        parse_scaling({"type": "rope2", "factor": 4, "original_max": 2048})
    with pytest.raises(SpectrumError, match="need type"):
        parse_scaling({"type": "pi", "factor": 4})


def test_describe_is_plain_json():
    d = describe("hybrid_a0.2_t100k", 64, Scaling("yarn", 4.0, 2048))
    assert set(d) == {"name", "head_dim", "inv_freq", "wavelengths", "attention_factor", "scaling", "length"}
    json.dumps(d)
    assert d["scaling"] == {"type": "yarn", "factor": 4.0, "original_max": 2048}
    np.testing.assert_allclose(d["wavelengths"], 2 * np.pi / np.array(d["inv_freq"]))
    assert (d["inv_freq"], d["attention_factor"]) == rope_parameters("hybrid_a0.2_t100k", 64, Scaling("yarn", 4.0, 2048))
    assert describe("geo_10000")["attention_factor"] == 1.0 and describe("geo_10000")["scaling"] is None


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("theta_name, theta", [("10000", 1e4), ("500k", 5e5)])
@pytest.mark.parametrize("factor, original_max", [(4.0, 2048), (8.0, 4096), (2.0, 1024)])
def test_dynamic_matches_transformers_dynamic_ntk_at_each_length(head_dim, theta_name, theta, factor, original_max):
    base = inv_freq(f"geo_{theta_name}", head_dim)
    sc = Scaling("dynamic", factor, original_max)
    for length in (original_max // 2, original_max, original_max + 1, 3 * original_max, int(factor * original_max)):
        got, af = apply_scaling(base, sc, head_dim, length=length)
        want, hf_af = hf_rope("dynamic", head_dim, theta, factor, original_max, seq_len=length)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert af == hf_af == 1.0
        assert (got, af) == rope_parameters(f"geo_{theta_name}", head_dim, sc, length=length)
    # At initialisation (no length) HF uses max_position_embeddings: the spectrum is unchanged.
    want, _ = hf_rope("dynamic", head_dim, theta, factor, original_max)
    np.testing.assert_allclose(apply_scaling(base, sc, head_dim)[0], want, rtol=1e-5)
    np.testing.assert_allclose(apply_scaling(base, sc, head_dim)[0], base, rtol=1e-12)


def test_dynamic_on_any_spectrum_is_ntk_with_the_length_ratio():
    """ntk stays static; dynamic at T is the same per-frequency base change with ratio s T / L - (s - 1)."""
    w = inv_freq("hybrid_a0.2_t100k", 64)
    s, L, T = 4.0, 2048, 8192
    ratio = dynamic_ratio(Scaling("dynamic", s, L), T)
    assert ratio == pytest.approx(s * T / L - (s - 1)) == 13.0
    got, _ = apply_scaling(w, Scaling("dynamic", s, L), 64, length=T)
    np.testing.assert_allclose(got, apply_scaling(w, Scaling("ntk", ratio, L), 64)[0], rtol=1e-12)
    # ntk ignores the length
    assert apply_scaling(w, Scaling("ntk", s, L), 64, length=T) == apply_scaling(w, Scaling("ntk", s, L), 64)
    d = describe("geo_10000", 64, Scaling("dynamic", s, L), length=T)
    assert d["length"] == T and d["scaling"]["type"] == "dynamic"
    with pytest.raises(SpectrumError, match="length"):
        apply_scaling(w, Scaling("dynamic", s, L), 64, length=0)
