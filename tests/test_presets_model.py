"""Presets' parameter counts, and the torch model against a hand-written reference and HF Llama."""
import math

import pytest
import torch
import torch.nn.functional as F

import train.loss as loss_mod
import train.model as model_mod
from train.model import GPT, build_model
from train.presets import PRESETS, ModelConfig, PresetError, flops_per_token, get_preset, list_presets, param_count
from train.spectra import Scaling, inv_freq, rope_parameters

TINY = get_preset("tiny")


def meta_model(cfg: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(cfg, inv_freq("geo_10000", cfg.head_dim))


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_matches_built_model(name):
    cfg = get_preset(name)
    model = meta_model(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())


def hand_count(vocab, hidden, layers, intermediate):
    # tied embedding + per layer (q, k, v, o: 4 h^2; gate, up, down: 3 h i; two norms) + final norm
    return vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden


@pytest.mark.parametrize(
    "name, dims, approx",
    [
        ("50M", (50304, 512, 6, 2048), 50.9e6),
        ("100M", (50304, 768, 12, 3072), 151.9e6),
        ("350M", (50304, 1024, 24, 4096), 454e6),
        ("1.5B", (50304, 2048, 24, 5632), 1.34e9),
    ],
)
def test_param_count_hand_count(name, dims, approx):
    assert param_count(get_preset(name)) == hand_count(*dims)
    assert param_count(get_preset(name)) == pytest.approx(approx, rel=0.005)


def test_preset_dims_from_the_issue():
    for name, dims in {"50M": (512, 6, 8, 64, 2048), "100M": (768, 12, 12, 64, 3072),
                       "350M": (1024, 24, 16, 64, 4096), "1.5B": (2048, 24, 16, 128, 5632),
                       "tiny": (64, 2, 4, 16, 192)}.items():
        cfg = get_preset(name)
        assert (cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.intermediate) == dims
    assert all(cfg.vocab_size == 50304 for cfg in PRESETS.values() if cfg.name != "tiny")
    assert TINY.vocab_size == 4096 and TINY.norm_eps == 1e-6


def test_list_presets_and_unknown_name():
    rows = list_presets()
    assert [r["name"] for r in rows] == list(PRESETS)
    assert {r["name"]: r["params"] for r in rows}["350M"] == param_count(get_preset("350M"))
    assert set(rows[0]) == {"name", "hidden", "layers", "heads", "head_dim", "intermediate", "vocab", "params"}
    with pytest.raises(PresetError, match="choose one of tiny, 20M"):
        get_preset("7B")


def test_flops_per_token():
    cfg = get_preset("1.5B")
    assert flops_per_token(cfg, 2048) == 6 * param_count(cfg) + 12 * 24 * 16 * 128 * 2048


def test_presets_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, train.presets, train.spectra; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the torch model --------------------------------------------------------------------------


def tiny_model(spectrum="hybrid_a0.2_t100k", scaling=None, seed=0) -> GPT:
    torch.manual_seed(seed)
    return build_model(TINY, spectrum, scaling)


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The architecture written out with an explicit masked softmax (a T x T matrix, fine at T=32)."""
    cfg, T = model.cfg, idx.shape[1]
    w = model.inv_freq.double()
    angles = torch.arange(T, dtype=torch.float64)[:, None] * w[None, :]
    cos, sin = angles.cos().float() * model.attention_factor, angles.sin().float() * model.attention_factor

    def rope(x):  # x: (B, H, T, D); pairs (i, i + D/2) rotate by angle_i
        x1, x2 = x[..., : cfg.head_dim // 2], x[..., cfg.head_dim // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    x = model.embed.weight[idx]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for blk in model.blocks:
        h = rms(x, blk.attn_norm.weight)
        heads = lambda t: t.view(*idx.shape, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        q, k, v = rope(heads(h @ blk.attn.q.weight.T)), rope(heads(h @ blk.attn.k.weight.T)), heads(h @ blk.attn.v.weight.T)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim) + mask, dim=-1)
        x = x + (att @ v).transpose(1, 2).reshape(*idx.shape, -1) @ blk.attn.o.weight.T
        h = rms(x, blk.mlp_norm.weight)
        x = x + (F.silu(h @ blk.mlp.gate.weight.T) * (h @ blk.mlp.up.weight.T)) @ blk.mlp.down.weight.T
    return rms(x, model.norm.weight) @ model.embed.weight.T


@pytest.mark.parametrize("scaling", [None, Scaling("yarn", 4.0, 16)])
def test_model_matches_reference(scaling):
    model = tiny_model(scaling=scaling)
    for p in model.parameters():  # norms away from 1 so they are exercised
        p.data.add_(0.01 * torch.randn_like(p))
    idx = torch.randint(0, TINY.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference_forward(model, idx), rtol=1e-4, atol=1e-4)


def test_model_matches_hf_llama_with_yarn():
    from transformers import LlamaConfig, LlamaForCausalLM

    scaling = Scaling("yarn", 4.0, 16)
    model = tiny_model("geo_10000", scaling)
    config = LlamaConfig(
        vocab_size=TINY.vocab_size, hidden_size=TINY.hidden, intermediate_size=TINY.intermediate,
        num_hidden_layers=TINY.n_layers, num_attention_heads=TINY.n_heads, num_key_value_heads=TINY.n_heads,
        head_dim=TINY.head_dim, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=64,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    )
    config._attn_implementation = "eager"
    hf = LlamaForCausalLM(config).eval()
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, blk in enumerate(model.blocks):
        for ours, theirs in [("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
                             ("attn.o", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"),
                             ("mlp.down", "mlp.down_proj")]:
            state[f"model.layers.{i}.{theirs}.weight"] = blk.get_submodule(ours).weight
        state[f"model.layers.{i}.input_layernorm.weight"] = blk.attn_norm.weight
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = blk.mlp_norm.weight
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    idx = torch.randint(0, TINY.vocab_size, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_on_relative_position_only():
    model = tiny_model()
    T = 40
    q, k = torch.randn(1, 1, 1, TINY.head_dim), torch.randn(1, 1, 1, TINY.head_dim)
    cos, sin = model_mod.rope_tables(model.inv_freq, T)
    rq = model_mod.apply_rope(q.expand(1, T, 1, -1), cos, sin)[0, :, 0]
    rk = model_mod.apply_rope(k.expand(1, T, 1, -1), cos, sin)[0, :, 0]
    for offset in (0, 3, 17):
        scores = torch.stack([rq[i] @ rk[i - offset] for i in range(offset, T)])
        torch.testing.assert_close(scores, scores[:1].expand_as(scores), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", [loss_mod.CHUNKED, loss_mod.CHUNKED_COMPILED])
def test_fused_chunked_loss_equals_full_loss_with_gradients(impl):
    idx = torch.randint(0, TINY.vocab_size, (2, 40))
    targets = torch.randint(0, TINY.vocab_size, (2, 40))
    model = tiny_model()
    full = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.loss_impl = impl
    for chunk in (10**9, 16):  # one chunk, then 5 chunks of 16 rows (gradients computed in forward)
        model.loss_chunk = chunk
        model.zero_grad()
        loss = model(idx, targets)
        loss.backward()
        torch.testing.assert_close(loss, full)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2, 40) and per_token.mean().item() == pytest.approx(full.item(), rel=1e-5)
    with pytest.raises(ValueError, match="evaluation"):
        model(idx, targets, reduction="none")


def test_rope_angles_stay_exact_after_any_cast():
    """bf16 casts (p2's passkey path, the benchmarks) must not round the frequencies: the issue measured
    58.6 rad of error at position 32767 with geo_500k on the 1.5B head_dim when they were rounded."""
    cfg = ModelConfig("rope-1.5B", vocab_size=64, hidden=128, n_layers=1, n_heads=1, head_dim=128, intermediate=64)
    w, af = rope_parameters("geo_500k", cfg.head_dim)  # the 1.5B preset's head_dim
    exact = torch.arange(32768, dtype=torch.float64)[-1] * torch.tensor(w, dtype=torch.float64)
    with torch.device("meta"):
        model = GPT(cfg, w, af)
    model.to_empty(device="cpu")
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float(),
                 lambda m: m.to("cpu", torch.bfloat16), lambda m: m.to_empty(device="cpu")):
        cast(model)
        assert model.inv_freq.dtype == torch.float64 and model.inv_freq.device.type == "cpu"
        angles = torch.outer(torch.arange(32768, device="cpu", dtype=torch.float64), model.inv_freq)
        assert (angles[-1] - exact).abs().max().item() < 1e-9
    assert model.embed.weight.dtype == torch.bfloat16  # the weights were cast all along
    cos, _ = model_mod.rope_tables(model.inv_freq, 32768, model.attention_factor)
    torch.testing.assert_close(cos[-1, : cfg.head_dim // 2].double(), exact.cos() * af, rtol=0, atol=1e-6)


def test_init_is_deterministic_and_meta_init_works():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.blocks[0].attn.q.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(a.norm.weight, torch.ones(TINY.hidden))

    w, af = rope_parameters("hybrid_a0.2_t100k", TINY.head_dim)
    with torch.device("meta"):
        m = GPT(TINY, w, af)
    m.to_empty(device="cpu")
    m.init_weights(seed=7)
    n = tiny_model()
    n.init_weights(seed=7)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), n.parameters()))
    torch.testing.assert_close(m.inv_freq, torch.tensor(w, dtype=torch.float64), rtol=0, atol=0)
    assert "inv_freq" not in m.state_dict()  # derived from the config name, not checkpointed


def test_tiny_model_loss_falls_on_cpu():
    torch.manual_seed(0)
    model = tiny_model()
    # Learnable data: a fixed random sequence of 64 tokens repeated; the model must learn to copy.
    pattern = torch.randint(0, TINY.vocab_size, (64,))
    data = pattern.repeat(20)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        starts = torch.randint(0, len(data) - 129, (8,))
        batch = torch.stack([data[s : s + 129] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(TINY.vocab_size), abs=0.5)
    assert sum(losses[-5:]) / 5 < losses[0] - 3.0, losses


def test_wrong_inv_freq_length_is_rejected():
    with pytest.raises(ValueError, match="inv_freq has 4 entries"):
        GPT(TINY, [1.0, 0.1, 0.01, 0.001])
