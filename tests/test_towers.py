"""Towers and the dual encoder: parameter tree, numpy reference forward, pooling, causal mask,
bf16 compute, remat, Encoders wrapper and input validation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetclip import noise as noise_lib
from hetclip import towers, xla
from hetclip.model import DualEncoder, Encoders, ModelConfig, abstract_params, count_params, init_params, preset

EOS = 49
SMALL = dict(
    embed_dim=24,
    vision={"width": 32, "layers": 2, "heads": 2, "patch_size": 8, "image_size": 16, "activation": "quick_gelu"},
    text={"width": 32, "layers": 2, "heads": 4, "vocab_size": 50, "context_length": 8, "eos_token_id": EOS,
          "activation": "gelu"},
)


def small_cfg(**over):
    d = {**SMALL, **over}
    return preset("tiny", **d)


@pytest.fixture(scope="module")
def small():
    cfg = small_cfg(het={"enabled": True, "num_factors": 3})
    params = init_params(cfg, jax.random.key(0))
    # Non-trivial LayerNorm parameters so the reference checks them too.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
        if "layer_norm" in str(p) or "layrnorm" in str(p) else x, params)
    return cfg, params


def tokens_batch(rng, batch=3, length=8, eos_at=(5, 2, 7)):
    toks = rng.integers(0, EOS, size=(batch, length)).astype(np.int32)
    for i, p in enumerate(eos_at):
        toks[i, p] = EOS
    return toks


# ---------- numpy reference forward (float64) ----------

def _ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def _lin(x, p):
    y = x @ np.asarray(p["kernel"], np.float64)
    return y + np.asarray(p["bias"], np.float64) if "bias" in p else y


def _act(name, x):
    if name == "quick_gelu":
        return x / (1 + np.exp(-1.702 * x))
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _layer(x, p, heads, causal, act):
    b, t, w = x.shape
    hd = w // heads
    h = _ln(x, p["layer_norm1"])
    a = p["self_attn"]
    q, k, v = (_lin(h, a[n]).reshape(b, t, heads, hd) for n in ("q_proj", "k_proj", "v_proj"))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    if causal:
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    x = x + _lin(np.einsum("bhqk,bkhd->bqhd", s, v).reshape(b, t, w), a["out_proj"])
    return x + _lin(_act(act, _lin(_ln(x, p["layer_norm2"]), p["mlp"]["fc1"])), p["mlp"]["fc2"])


def ref_vision(p, images, c):
    images = np.asarray(images, np.float64)
    kern = np.asarray(p["embeddings"]["patch_embedding"]["kernel"], np.float64)
    g = c.image_size // c.patch_size
    pp = c.patch_size
    patches = [np.einsum("bhwc,hwco->bo", images[:, i * pp:(i + 1) * pp, j * pp:(j + 1) * pp], kern)
               for i in range(g) for j in range(g)]  # row-major patch order, as a stride-p convolution
    x = np.stack(patches, 1)
    cls = np.broadcast_to(np.asarray(p["embeddings"]["class_embedding"], np.float64), (x.shape[0], 1, c.width))
    x = np.concatenate([cls, x], 1) + np.asarray(p["embeddings"]["position_embedding"], np.float64)
    x = _ln(x, p["pre_layrnorm"])
    for i in range(c.layers):
        x = _layer(x, p["encoder"][f"layers_{i}"], c.heads, False, c.activation)
    return _ln(x[:, 0], p["post_layernorm"])


def ref_text(p, toks, c):
    x = np.asarray(p["embeddings"]["token_embedding"]["embedding"], np.float64)[toks]
    x = x + np.asarray(p["embeddings"]["position_embedding"], np.float64)[: toks.shape[1]]
    for i in range(c.layers):
        x = _layer(x, p["encoder"][f"layers_{i}"], c.heads, True, c.activation)
    x = _ln(x, p["final_layer_norm"])
    first = np.array([np.nonzero(row == c.eos_token_id)[0][0] for row in toks])
    return x[np.arange(len(toks)), first], x


def test_forward_matches_numpy_reference(small):
    cfg, params = small
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    toks = tokens_batch(rng)
    model = DualEncoder(cfg)
    out = jax.jit(lambda p, i: model.apply({"params": p}, i, method=DualEncoder.encode_image))(params, images)
    txt = jax.jit(lambda p, t: model.apply({"params": p}, t, method=DualEncoder.encode_text))(params, toks)
    h_ref = ref_vision(params["vision_model"], images, cfg.vision)
    np.testing.assert_allclose(out["features"], h_ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(out["mean"], h_ref @ np.asarray(params["visual_projection"]["kernel"], np.float64),
                               atol=2e-4, rtol=1e-4)
    t_ref, _ = ref_text(params["text_model"], toks, cfg.text)
    np.testing.assert_allclose(txt, t_ref @ np.asarray(params["text_projection"]["kernel"], np.float64),
                               atol=2e-4, rtol=1e-4)


def test_activations_reference():
    x = np.linspace(-4, 4, 17)
    np.testing.assert_allclose(towers.quick_gelu(jnp.asarray(x)), x / (1 + np.exp(-1.702 * x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(towers.gelu_exact(jnp.asarray(x)), _act("gelu", x), rtol=1e-5, atol=1e-6)


# ---------- parameter tree ----------

def expected_tree(cfg: ModelConfig):
    v, t, d = cfg.vision, cfg.text, cfg.embed_dim
    out = {
        "vision_model/embeddings/patch_embedding/kernel": (v.patch_size, v.patch_size, 3, v.width),
        "vision_model/embeddings/class_embedding": (v.width,),
        "vision_model/embeddings/position_embedding": (v.num_patches + 1, v.width),
        "vision_model/pre_layrnorm/scale": (v.width,), "vision_model/pre_layrnorm/bias": (v.width,),
        "vision_model/post_layernorm/scale": (v.width,), "vision_model/post_layernorm/bias": (v.width,),
        "visual_projection/kernel": (v.width, d),
        "text_model/embeddings/token_embedding/embedding": (t.vocab_size, t.width),
        "text_model/embeddings/position_embedding": (t.context_length, t.width),
        "text_model/final_layer_norm/scale": (t.width,), "text_model/final_layer_norm/bias": (t.width,),
        "text_projection/kernel": (t.width, d),
    }
    for tower, c in (("vision_model", v), ("text_model", t)):
        for i in range(c.layers):
            pre = f"{tower}/encoder/layers_{i}"
            for ln in ("layer_norm1", "layer_norm2"):
                out[f"{pre}/{ln}/scale"] = out[f"{pre}/{ln}/bias"] = (c.width,)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[f"{pre}/self_attn/{proj}/kernel"] = (c.width, c.width)
                out[f"{pre}/self_attn/{proj}/bias"] = (c.width,)
            out[f"{pre}/mlp/fc1/kernel"], out[f"{pre}/mlp/fc1/bias"] = (c.width, c.mlp_dim), (c.mlp_dim,)
            out[f"{pre}/mlp/fc2/kernel"], out[f"{pre}/mlp/fc2/bias"] = (c.mlp_dim, c.width), (c.width,)
    if cfg.temperature.kind == "clip":
        out["temperature/log_scale"] = ()
    else:
        out["temperature/t"] = ()
    if cfg.loss == "sigmoid":
        out["logit_bias"] = ()
    if cfg.het.enabled:
        r, w = cfg.het.num_factors, v.width
        out["het_head/diag/kernel"], out["het_head/diag/bias"] = (w, d), (d,)
        if cfg.het.param_efficient:
            out["het_head/low_rank/kernel"], out["het_head/low_rank/bias"] = (w, d), (d,)
            out["het_head/C"] = (d, r)
        else:
            out["het_head/low_rank/kernel"], out["het_head/low_rank/bias"] = (w, d * r), (d * r,)
    return out


def flat_shapes(tree):
    return {"/".join(k.key for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("over", [
    {},
    {"het": {"enabled": True, "num_factors": 3}, "loss": "sigmoid"},
    {"het": {"enabled": True, "num_factors": 3, "param_efficient": False},
     "temperature": {"kind": "bounded"}, "remat": True, "dtype": "bfloat16"},
])
def test_param_tree_matches_architecture(over):
    cfg = small_cfg(**over)
    got = flat_shapes(abstract_params(cfg))
    assert got == expected_tree(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(abstract_params(cfg)))


def test_b32_matches_openai_count():
    assert count_params(abstract_params(preset("B/32"))) == 151_277_313


# ---------- text pooling and causal mask ----------

def test_pooling_at_first_eos(small):
    cfg, params = small
    toks = tokens_batch(np.random.default_rng(1))
    toks[0, 7] = EOS  # a second eos later in row 0: the first one (position 5) is pooled
    mod = towers.TextTransformer(cfg.text)
    pooled, hidden = jax.jit(lambda p, t: mod.apply({"params": p}, t, return_hidden=True))(params["text_model"], toks)
    np.testing.assert_array_equal(pooled, np.asarray(hidden)[np.arange(3), [5, 2, 7]])
    assert not np.allclose(pooled[0], hidden[0, 7])
    np.testing.assert_array_equal(towers.first_eos_index(jnp.asarray(toks), EOS), [5, 2, 7])


def test_causal_mask(small):
    cfg, params = small
    toks = tokens_batch(np.random.default_rng(2), batch=1, eos_at=(7,))
    mod = towers.TextTransformer(cfg.text)
    fn = jax.jit(lambda t: mod.apply({"params": params["text_model"]}, t, return_hidden=True)[1])
    base = fn(toks)
    p = 3
    changed = toks.copy()
    changed[0, p + 1] = (changed[0, p + 1] + 1) % EOS
    alt = fn(changed)
    np.testing.assert_array_equal(base[:, : p + 1], alt[:, : p + 1])
    assert np.abs(base[:, p + 1:] - alt[:, p + 1:]).max() > 1e-3


def test_shorter_tokens_use_leading_positions(small):
    cfg, params = small
    toks = tokens_batch(np.random.default_rng(3), eos_at=(4, 2, 5))
    mod = towers.TextTransformer(cfg.text)
    fn = jax.jit(lambda t: mod.apply({"params": params["text_model"]}, t))
    full, short = fn(toks), fn(toks[:, :6])
    np.testing.assert_allclose(full, short, atol=1e-5)


# ---------- bf16 compute and remat ----------

def test_bf16_close_to_fp32(small):
    cfg, params = small
    rng = np.random.default_rng(4)
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    toks = tokens_batch(rng)
    e32, e16 = Encoders(cfg, params), Encoders(ModelConfig.from_dict({**cfg.to_dict(), "dtype": "bfloat16"}), params)
    i32, i16 = e32.image_embeddings(images), e16.image_embeddings(images)
    t32, t16 = e32.text_embeddings(toks), e16.text_embeddings(toks)
    assert i16.dtype == jnp.float32
    assert np.abs(i32 - i16).max() < 3e-2 and np.abs(t32 - t16).max() < 3e-2
    assert np.min(np.sum(np.asarray(i32) * np.asarray(i16), -1)) > 0.999
    assert np.abs(i32 - i16).max() > 0  # really computed in a different precision


def test_bf16_matmul_accumulates_in_fp32():
    x = jnp.ones((4, 8), jnp.float32)
    k = jnp.full((8, 3), 1.0 + 2 ** -9, jnp.float32)  # not representable in bf16 -> 1.0
    y = towers.mm(x, k, jnp.bfloat16)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, 8.0)


def one_layer(cfg, params):
    """The small model cut to one layer per tower (reuses the fixture's parameters, no new init)."""
    d = cfg.to_dict()
    d["vision"]["layers"] = d["text"]["layers"] = 1
    cut = jax.tree_util.tree_map(lambda x: x, params)
    for tower in ("vision_model", "text_model"):
        cut[tower]["encoder"] = {"layers_0": params[tower]["encoder"]["layers_0"]}
    return ModelConfig.from_dict(d), cut


@pytest.mark.slow
def test_remat_same_outputs_and_grads(small):
    cfg, params = one_layer(*small)
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)).astype(np.float32))
    toks = jnp.asarray(tokens_batch(rng, batch=2, eos_at=(5, 3)))
    cfg_r = ModelConfig.from_dict({**cfg.to_dict(), "remat": True})
    assert flat_shapes(abstract_params(cfg_r)) == flat_shapes(params)

    def loss(p, c):
        out = DualEncoder(c).apply({"params": p}, images, toks)
        return jnp.sum(out["image"]["mean"] * out["text"]) + jnp.sum(out["image"]["noise"]["d"])

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg_r)))(params)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(g1)
    # Some gradients are zero in exact arithmetic (e.g. k_proj biases): compare against the global scale.
    top = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(g0))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5 * top), g0, g1)


# ---------- Encoders ----------

def test_encoders_deterministic_embeddings_and_samples(small):
    cfg, params = small
    rng = np.random.default_rng(6)
    images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
    enc = Encoders(cfg, params)
    emb = enc.image_embeddings(images)
    out = DualEncoder(cfg).apply({"params": params}, jnp.asarray(images), method=DualEncoder.encode_image)
    np.testing.assert_allclose(emb, out["mean"] / np.linalg.norm(out["mean"], axis=-1, keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(emb, enc.image_embeddings(images))
    samples = enc.image_samples(images, jax.random.key(3), 4)
    assert samples.shape == (3, 4, cfg.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(samples, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(samples, noise_lib.sample_embeddings(out["mean"], out["noise"], jax.random.key(3), 4),
                               atol=1e-5)
    cos = np.einsum("bsd,bd->bs", samples, emb)
    assert 0.9 < cos.min() and cos.max() < 1 - 1e-5  # noisy but near the mean at initialisation
    t = enc.text_embeddings(tokens_batch(rng))
    np.testing.assert_allclose(np.linalg.norm(t, axis=-1), 1.0, atol=1e-5)
    assert enc.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)


def test_encoders_validation(small):
    cfg, params = small
    enc = Encoders(cfg, params)
    with pytest.raises(ValueError, match=r"image_size=16.*\(2, 32, 32, 3\)"):
        enc.image_embeddings(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        enc.image_embeddings(np.zeros((2, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match="floating point"):
        enc.image_embeddings(np.zeros((2, 16, 16, 3), np.uint8))
    toks = tokens_batch(np.random.default_rng(0))
    with pytest.raises(ValueError, match="length 9 .*context_length is 8"):
        enc.text_embeddings(np.concatenate([toks, toks[:, :1]], 1))
    no_eos = toks.copy()
    no_eos[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] contain no eos_token_id=49"):
        enc.text_embeddings(no_eos)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        enc.text_embeddings(np.where(toks == EOS, EOS, 50))
    with pytest.raises(ValueError, match="mc_samples=0"):
        enc.image_samples(np.zeros((1, 16, 16, 3), np.float32), jax.random.key(0), 0)
    off = Encoders(small_cfg(), init_params(small_cfg(vision={**SMALL["vision"], "layers": 1},
                                                      text={**SMALL["text"], "layers": 1}), jax.random.key(0)))
    with pytest.raises(ValueError, match="het.enabled=False"):
        off.image_samples(np.zeros((1, 16, 16, 3), np.float32), jax.random.key(0), 2)


def test_module_validation():
    mod = towers.VisionTransformer(towers.VisionConfig(width=8, layers=1, heads=2, patch_size=4, image_size=8))
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 3\].*\(1, 12, 12, 3\)"):
        mod.init(jax.random.key(0), jnp.zeros((1, 12, 12, 3)))
    text = towers.TextTransformer(towers.TextConfig(width=8, layers=1, heads=2, vocab_size=10, context_length=4,
                                                    eos_token_id=9))
    with pytest.raises(ValueError, match="context_length=4"):
        text.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))


@pytest.mark.parametrize("kwargs, msg", [
    (dict(width=30, heads=4), "width=30 is not divisible by heads=4"),
    (dict(image_size=20, patch_size=8), "image_size=20 must be a positive multiple of patch_size=8"),
    (dict(activation="relu"), "activation='relu'"),
])
def test_vision_config_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        towers.VisionConfig(**kwargs)


def test_text_config_errors():
    with pytest.raises(ValueError, match="eos_token_id=50 is outside"):
        towers.TextConfig(vocab_size=50, eos_token_id=50)
    with pytest.raises(ValueError, match="dtype='float16'"):
        towers.compute_dtype("float16")


def test_auto_dtype_follows_the_hardware(monkeypatch):
    """'auto' is bf16 only where bf16 matmuls are fast (AMX or AVX-512 BF16 on CPU), else fp32; it validates
    like the others."""
    monkeypatch.setattr(xla, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert towers.compute_dtype("auto") == jnp.float32
    monkeypatch.setattr(xla, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw"}))
    assert towers.compute_dtype("auto") == jnp.float32  # AVX-512 without its bf16 extension
    monkeypatch.setattr(xla, "cpu_flags", lambda: frozenset({"avx2", "amx_tile", "amx_bf16"}))
    assert towers.compute_dtype("auto") == jnp.bfloat16
    monkeypatch.setattr(xla, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert towers.compute_dtype("auto") == jnp.bfloat16
    from hetclip.model import preset
    assert preset("tiny", dtype="auto").dtype == "auto"
    with pytest.raises(ValueError, match="'auto'"):
        towers.compute_dtype("fp8")


@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 3, 2)])
def test_matmul_gradients(lead):
    """``mm``'s own backward rule (kernel gradient on 2-D views) against einsum, fp32 and bf16."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=lead + (16,)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=lead + (4,)), jnp.float32)

    def grads(dt):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(towers.mm(a, b, dt) * ct), argnums=(0, 1)))(x, k)

    (dx32, dk32), (dx16, dk16) = grads(jnp.float32), grads(jnp.bfloat16)
    np.testing.assert_allclose(dx32, np.einsum("...o,io->...i", ct, k), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk32, np.reshape(x, (-1, 16)).T @ np.reshape(ct, (-1, 4)), rtol=1e-5, atol=1e-4)
    assert dx16.dtype == jnp.float32 and dk16.dtype == jnp.float32
    for a, b in ((dx32, dx16), (dk32, dk16)):
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
        assert 0 < rel < 1e-2
