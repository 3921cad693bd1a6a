"""HET-XL embedding head, temperature and the supervised DET/HET/HET-XL classifiers."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetclip import heads as H
from hetclip import supervised_heads as SH
from hetclip import noise as noise_lib


def _softplus(x):
    return np.logaddexp(0.0, x)


def _perturbed(variables, key, scale=0.3):
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _head(pe, dim=6, feat=5, r=2, init_scale=0.5):
    head = H.HetXLEmbeddingHead(dim, H.HetConfig(enabled=True, num_factors=r, param_efficient=pe,
                                                  init_scale=init_scale))
    h = jax.random.normal(jax.random.key(1), (2, feat))
    variables = _perturbed(head.init(jax.random.key(0), h), jax.random.key(2))
    return head, variables, h


@pytest.mark.parametrize("pe", [True, False])
def test_head_formulas_and_empirical_covariance(pe):
    head, variables, h = _head(pe)
    noise = jax.jit(head.apply)(variables, h)
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), variables["params"])
    hn = np.asarray(h, np.float64)
    d = _softplus(hn @ p["diag"]["kernel"] + p["diag"]["bias"]) + 1e-3
    low = hn @ p["low_rank"]["kernel"] + p["low_rank"]["bias"]
    v_mat = low[:, :, None] * p["C"][None] if pe else low.reshape(2, 6, 2)
    np.testing.assert_allclose(noise["d"], d, rtol=1e-5)
    cov_ref = np.einsum("bdr,ber->bde", v_mat, v_mat) + np.stack([np.diag(x ** 2) for x in d])
    np.testing.assert_allclose(noise_lib.covariance(noise), cov_ref, rtol=1e-4, atol=1e-6)

    num = 40_000
    ids = jnp.arange(2)

    @jax.jit
    def draws(key):
        def one(s):
            e_low, e_diag = noise_lib.standard_normals(key, s, ids, 6, 2)
            return noise_lib.perturbation(noise, e_low, e_diag), d_only(e_low, e_diag)

        def d_only(e_low, e_diag):
            return noise["d"] * e_diag

        return jax.vmap(one)(jnp.arange(num))

    eps, diag_eps = (np.asarray(x, np.float64) for x in draws(jax.random.key(7)))
    for b in range(2):
        emp = eps[:, b].T @ eps[:, b] / num
        rel = np.linalg.norm(emp - cov_ref[b]) / np.linalg.norm(cov_ref[b])
        assert rel < 0.04, rel
        # The diagonal term is really diagonal (one normal per dimension, not one broadcast scalar).
        emp_d = diag_eps[:, b].T @ diag_eps[:, b] / num
        corr = emp_d / np.sqrt(np.outer(np.diag(emp_d), np.diag(emp_d)))
        assert np.abs(corr - np.eye(6)).max() < 0.04
        np.testing.assert_allclose(np.diag(emp_d), d[b] ** 2, rtol=0.05)
        assert np.linalg.matrix_rank(emp_d, tol=1e-3 * emp_d.max()) == 6


@pytest.mark.parametrize("pe", [True, False])
def test_initial_noise_is_modest(pe):
    cfg = H.HetConfig(enabled=True, num_factors=4, param_efficient=pe, init_scale=0.1)
    head = H.HetXLEmbeddingHead(32, cfg)
    h = jax.random.normal(jax.random.key(0), (64, 48))  # LayerNorm-like pooled features
    noise = jax.jit(head.apply)(head.init(jax.random.key(1), h), h)
    mean = jax.random.normal(jax.random.key(2), (64, 32))  # the projection's output: std ≈ 1 per coordinate
    stats = noise_lib.size_stats(mean, noise)
    assert 0.075 < float(stats["het/noise_std"]) < 0.13
    assert 0.05 < float(stats["het/diag_std"]) < 0.09
    assert 0.04 < float(stats["het/lowrank_std"]) < 0.1
    assert 0.07 < float(stats["het/angular"]) < 0.13  # ≈ init_scale radians
    assert float(jnp.std(noise["d"])) > 0  # input dependent from the start
    assert float(stats["het/angular_spread"]) > 0


@pytest.mark.parametrize("pe", [True, False])
def test_noise_sizes_against_the_covariance_and_sampled_angles(pe):
    head, variables, h = _head(pe, dim=6, feat=5, r=2, init_scale=0.5)
    noise = jax.jit(head.apply)(variables, h)
    mean = jnp.asarray([[3.0, -1.0, 0.5, 2.0, 0.0, 1.0], [0.2, 0.1, -0.3, 0.4, 0.0, -0.2]])
    sizes = jax.tree.map(np.asarray, noise_lib.per_example_sizes(mean, noise))
    cov = np.asarray(noise_lib.covariance(noise), np.float64)
    m = np.asarray(mean, np.float64)
    for b in range(2):
        u = m[b] / np.linalg.norm(m[b])
        tr = np.trace(cov[b])
        np.testing.assert_allclose(sizes["std"][b], math.sqrt(tr / 6), rtol=1e-5)
        np.testing.assert_allclose(sizes["mean_norm"][b], np.linalg.norm(m[b]), rtol=1e-6)
        np.testing.assert_allclose(sizes["angular"][b], math.sqrt(tr - u @ cov[b] @ u) / np.linalg.norm(m[b]),
                                   rtol=1e-5)
        np.testing.assert_allclose(sizes["diag_std"][b] ** 2 + sizes["lowrank_std"][b] ** 2, tr / 6, rtol=1e-5)
    # The first mean is long next to its noise: the angle between it and normalised noisy samples is the
    # "angular" size (small-noise limit); the second is short, so its noisy samples point anywhere.
    samples = np.asarray(noise_lib.sample_embeddings(mean * 10, jax.tree.map(lambda x: x, noise), jax.random.key(3),
                                                     4000), np.float64)
    u0 = m[0] / np.linalg.norm(m[0])
    angles = np.arccos(np.clip(samples[0] @ u0, -1, 1))
    small = noise_lib.per_example_sizes(mean * 10, noise)["angular"][0]
    np.testing.assert_allclose(np.sqrt(np.mean(angles ** 2)), small, rtol=0.05)
    assert sizes["angular"][1] > 1.0


def test_size_stats_spread_is_zero_for_input_independent_noise_and_matches_across_devices():
    from jax.sharding import Mesh, PartitionSpec as P

    d = jnp.full((8, 4), 0.3)
    noise = {"d": d, "v": jnp.ones((8, 4)), "C": jnp.full((4, 2), 0.1)}
    mean = jnp.tile(jnp.asarray([[1.0, 2.0, 0.0, -1.0]]), (8, 1))
    stats = noise_lib.size_stats(mean, noise)
    assert float(stats["het/angular_spread"]) == pytest.approx(0.0, abs=1e-6)
    varied = dict(noise, d=d * jnp.arange(1, 9)[:, None])
    single = noise_lib.size_stats(mean, varied)
    assert float(single["het/angular_spread"]) > 0.1
    n = min(len(jax.devices()), 8)
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    spec = {"d": P("data"), "v": P("data"), "C": P()}
    sharded = jax.shard_map(lambda m, z: noise_lib.size_stats(m, z, "data"), mesh=mesh, in_specs=(P("data"), spec),
                        out_specs=P())(mean, varied)
    for k in single:
        np.testing.assert_allclose(float(sharded[k]), float(single[k]), rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("pe", [True, False])
def test_sphere_noise_space_puts_the_noise_on_the_unit_mean(pe):
    from hetclip.model import DualEncoder, init_params, preset

    cfgs = {space: preset("tiny", embed_dim=16, vision=dict(width=32, layers=1, heads=2, patch_size=16),
                          text=dict(width=32, layers=1, heads=2, vocab_size=50, eos_token_id=49, context_length=8),
                          het=dict(enabled=True, num_factors=3, param_efficient=pe, noise_space=space))
            for space in ("embedding", "sphere")}
    params = init_params(cfgs["embedding"], jax.random.key(0))  # same parameter tree for both spaces
    images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    out = {space: DualEncoder(c).apply({"params": params}, images, method=DualEncoder.encode_image)
           for space, c in cfgs.items()}
    emb, sph = out["embedding"], out["sphere"]
    np.testing.assert_allclose(np.linalg.norm(sph["mean"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(sph["mean"], noise_lib.l2_normalize(emb["mean"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(noise_lib.covariance(sph["noise"]), noise_lib.covariance(emb["noise"]) / 16,
                               rtol=1e-4, atol=1e-8)
    # At initialisation the angular noise is ≈ init_scale in both spaces.
    for o in (emb, sph):
        angular = float(noise_lib.size_stats(o["mean"], o["noise"])["het/angular"])
        assert 0.05 < angular < 0.2, angular


def test_het_config_errors():
    with pytest.raises(ValueError, match="mc_samples=0 must be >= 1 when the HET-XL head is enabled"):
        H.HetConfig(enabled=True, mc_samples=0)
    with pytest.raises(ValueError, match="num_factors=0"):
        H.HetConfig(num_factors=0)
    with pytest.raises(ValueError, match="init_scale=0"):
        H.HetConfig(init_scale=0)
    with pytest.raises(ValueError, match="noise_space='ball' is not one of"):
        H.HetConfig(noise_space="ball")
    with pytest.raises(ValueError, match="estimator='exact' is not one of"):
        H.HetConfig(estimator="exact")
    with pytest.raises(ValueError, match="jackknife estimator needs mc_samples >= 2"):
        H.HetConfig(enabled=True, estimator="jackknife", mc_samples=1)


# ---------- temperature ----------

def test_temperature_clip_and_bounded():
    t = H.Temperature(H.TemperatureConfig(kind="clip", init=0.07, max_scale=100.0))
    v = t.init(jax.random.key(0))
    assert float(v["params"]["log_scale"]) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert float(t.apply(v)) == pytest.approx(1 / 0.07, rel=1e-5)
    assert float(t.apply({"params": {"log_scale": jnp.float32(7.0)}})) == pytest.approx(100.0, rel=1e-5)
    g = jax.grad(lambda s: t.apply({"params": {"log_scale": s}}))(jnp.float32(7.0))
    assert float(g) == 0.0  # clamped like CLIP

    b = H.Temperature(H.TemperatureConfig(kind="bounded", init=0.07, tau_lo=0.01, tau_hi=1.0))
    vb = b.init(jax.random.key(0))
    assert float(b.apply(vb)) == pytest.approx(1 / 0.07, rel=1e-5)
    for tv in (-3.0, 0.0, 2.5):
        tau = 0.01 + 0.99 / (1 + math.exp(-tv))
        assert float(b.apply({"params": {"t": jnp.float32(tv)}})) == pytest.approx(1 / tau, rel=1e-5)
    assert float(b.apply({"params": {"t": jnp.float32(-80.0)}})) == pytest.approx(100.0, rel=1e-4)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(kind="fixed"), "kind='fixed'"),
    (dict(kind="bounded", init=0.005, tau_lo=0.01), "tau_lo < init < tau_hi"),
    (dict(init=-1.0), "init=-1.0"),
])
def test_temperature_config_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        H.TemperatureConfig(**kwargs)


# ---------- supervised classifiers ----------

def _np_log_softmax(u):
    u = u - u.max(-1, keepdims=True)
    return u - np.log(np.exp(u).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _all_normals(key, mc_samples, batch, dim, r):
    return jax.vmap(lambda s: noise_lib.standard_normals(key, s, jnp.arange(batch), dim, r))(jnp.arange(mc_samples))


def _np_perturbation(noise, e_low, e_diag):
    n = {k: np.asarray(v, np.float64) for k, v in noise.items()}
    low = np.einsum("bdr,br->bd", n["V"], e_low) if "V" in n else n["v"] * (e_low @ n["C"].T)
    return low + n["d"] * e_diag


def _prob_space_reference(logit_fn, noise, key, mc_samples, dim, kind, scale, batch):
    """Probability-space MC average, sample by sample, with the same normals (float64)."""
    e_lows, e_diags = (np.asarray(x, np.float64)
                       for x in _all_normals(key, mc_samples, batch, dim, noise_lib.rank(noise)))
    acc_p = acc_q = 0.0
    for s in range(mc_samples):
        eps = _np_perturbation(noise, e_lows[s], e_diags[s])
        u = logit_fn(eps) * scale
        if kind == "softmax":
            acc_p = acc_p + np.exp(_np_log_softmax(u)) / mc_samples
        else:
            acc_p = acc_p + 1 / (1 + np.exp(-u)) / mc_samples
            acc_q = acc_q + 1 / (1 + np.exp(u)) / mc_samples
    return np.log(acc_p), (np.log(acc_q) if kind == "sigmoid" else None)


@pytest.mark.parametrize("xl", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("pe", [True, False])
def test_classifier_mc_log_space_equals_probability_space(xl, kind, pe):
    cls = SH.HetXLClassifier if xl else SH.HetClassifier
    mod = cls(num_classes=7, num_factors=3, mc_samples=5, param_efficient=pe, kind=kind, sample_chunk=2,
              init_scale=1.0)
    x = jax.random.normal(jax.random.key(0), (4, 6))
    key = jax.random.key(9)
    variables = _perturbed(jax.jit(mod.init)(jax.random.key(1), x, key), jax.random.key(3), 0.5)
    out = jax.jit(mod.apply)(variables, x, key)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    w, b = p["classifier"]["kernel"], p["classifier"]["bias"]
    xn = np.asarray(x, np.float64)
    tau = 0.05 + 4.95 / (1 + np.exp(-p["temperature"]["t"]))
    if xl:
        fn, dim = (lambda eps: (xn + eps) @ w + b), 6
    else:
        fn, dim = (lambda eps: xn @ w + b + eps), 7
    ref_p, ref_q = _prob_space_reference(fn, out["noise"], key, 5, dim, kind, 1 / tau, 4)
    np.testing.assert_allclose(out["log_probs"], ref_p, rtol=1e-4, atol=1e-5)
    if kind == "sigmoid":
        np.testing.assert_allclose(out["log_1m_probs"], ref_q, rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_allclose(np.exp(out["log_probs"]).sum(-1), 1.0, atol=1e-5)
    if not (xl and pe):
        return
    # Chunking over samples does not change the result.
    one_chunk = cls(num_classes=7, num_factors=3, mc_samples=5, param_efficient=pe, kind=kind, sample_chunk=5,
                    init_scale=1.0)
    np.testing.assert_allclose(jax.jit(one_chunk.apply)(variables, x, key)["log_probs"], out["log_probs"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_zero_noise_equals_det(kind):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    det = SH.det_log_probs(x @ w + b, kind, 2.0)
    zero_xl = {"d": jnp.zeros((3, 5)), "v": jnp.zeros((3, 5)), "C": jnp.ones((5, 2))}
    zero_het = {"d": jnp.zeros((3, 4)), "V": jnp.zeros((3, 4, 2))}

    @jax.jit
    def both(key):
        return (SH.hetxl_log_probs(x, zero_xl, w, b, 2.0, key, 6, kind, sample_chunk=4),
                SH.het_log_probs(x @ w + b, zero_het, 2.0, key, 6, kind, sample_chunk=4))

    xl, het = both(jax.random.key(0))
    for key in det:
        np.testing.assert_allclose(xl[key], det[key], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(het[key], det[key], rtol=1e-5, atol=1e-6)


def test_deterministic_mode_and_det_classifier():
    x = jax.random.normal(jax.random.key(0), (3, 6))
    mod = SH.HetXLClassifier(num_classes=4, num_factors=2, mc_samples=3)
    v = _perturbed(mod.init(jax.random.key(1), x, jax.random.key(2)), jax.random.key(3))
    out = mod.apply(v, x, deterministic=True)
    p = v["params"]
    logits = x @ p["classifier"]["kernel"] + p["classifier"]["bias"]
    scale = H.Temperature(mod.temperature).apply({"params": p["temperature"]})
    np.testing.assert_allclose(out["log_probs"], jax.nn.log_softmax(logits * scale), rtol=1e-5, atol=1e-6)
    det = SH.DetClassifier(num_classes=4, kind="sigmoid")
    dv = {"params": {"classifier": p["classifier"]}}
    dout = det.apply(dv, x)
    np.testing.assert_allclose(dout["log_probs"], jax.nn.log_sigmoid(logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dout["log_1m_probs"], jax.nn.log_sigmoid(-logits), rtol=1e-5, atol=1e-6)


def test_log_space_is_stable_for_confident_predictions():
    logits = jnp.array([[0.0, 60.0, -60.0]])
    noise = {"d": jnp.full((1, 3), 0.01), "V": jnp.zeros((1, 3, 1))}
    out = jax.jit(lambda l: SH.het_log_probs(l, noise, 20.0, jax.random.key(0), 4, "softmax"))(logits)
    assert np.all(np.isfinite(out["log_probs"]))
    assert float(out["log_probs"][0, 2]) < -2000  # far below float32's exp underflow, still exact-ish
    g = jax.jit(jax.grad(
        lambda l: SH.het_log_probs(l, noise, 20.0, jax.random.key(0), 4, "softmax")["log_probs"][0, 0]))(logits)
    assert np.all(np.isfinite(g))


def test_classifier_loss():
    log_p = jnp.log(jnp.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]))
    out = {"log_probs": log_p}
    assert float(SH.classifier_loss(out, jnp.array([1, 0]))) == pytest.approx(-(math.log(0.5) + math.log(0.6)) / 2)
    soft = jnp.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    want = -(0.5 * math.log(0.5) + 0.5 * math.log(0.3) + math.log(0.6)) / 2
    assert float(SH.classifier_loss(out, soft)) == pytest.approx(want, rel=1e-6)
    p = np.array([[0.9, 0.2], [0.3, 0.6]])
    sig = {"log_probs": jnp.log(p), "log_1m_probs": jnp.log(1 - p)}
    y = np.array([[1, 0], [1, 1]])
    want = -np.mean(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p), -1))
    assert float(SH.classifier_loss(sig, jnp.asarray(y))) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match=r"labels shape \(2, 4\) does not match"):
        SH.classifier_loss(out, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="integer class ids"):
        SH.classifier_loss(out, jnp.array([0.0, 1.0]))


def test_classifier_errors():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="kind='softplus'"):
        SH.DetClassifier(num_classes=3, kind="softplus").init(jax.random.key(0), x)
    mod = SH.HetXLClassifier(num_classes=3, num_factors=2, mc_samples=2)
    v = mod.init(jax.random.key(0), x, jax.random.key(1))
    with pytest.raises(ValueError, match="needs a PRNG key unless deterministic=True"):
        mod.apply(v, x)
    with pytest.raises(ValueError, match="mc_samples=0 must be >= 1"):
        SH.HetXLClassifier(num_classes=3, num_factors=2, mc_samples=0).apply(v, x, jax.random.key(1))
