"""Contrastive losses: chunked vs naive (values and gradients), 8 devices vs 1, zero noise -> DET,
log-space MC average vs a probability-space numpy computation, input errors, memory not growing with S."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from hetclip import losses as L
from hetclip import noise as noise_lib

N, D, R, S = 16, 8, 3, 5
RTOL = 1e-5
# XLA's CPU backend optimisation passes dominate these tiny programs' run time; they do not change
# the arithmetic checked here.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _inputs(form="efficient", n=N, d=D, r=R, seed=0, noise_scale=0.5):
    k = jax.random.split(jax.random.key(seed), 6)
    mean = jax.random.normal(k[0], (n, d))
    txt = jax.random.normal(k[1], (n, d))
    diag = noise_scale * jax.nn.softplus(jax.random.normal(k[2], (n, d)))
    if form == "efficient":
        noise = {"d": diag, "v": noise_scale * jax.random.normal(k[3], (n, d)),
                 "C": jax.random.normal(k[4], (d, r)) / math.sqrt(r)}
    else:
        noise = {"d": diag, "V": noise_scale * jax.random.normal(k[3], (n, d, r)) / math.sqrt(r)}
    return mean, noise, txt, jnp.float32(4.0), jax.random.key(seed + 100)


def _close(actual, expected, rtol=RTOL):
    """Leaf-wise closeness, relative to each leaf's largest magnitude."""
    def check(a, e):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * max(np.max(np.abs(e)), 1e-3))
    jax.tree.map(check, actual, expected)


def _mesh8():
    assert len(jax.devices()) == 8, "conftest.py should give 8 CPU devices"
    return Mesh(np.array(jax.devices()), ("data",))


# ------------------------------------------------------------------ chunked vs naive

@pytest.mark.parametrize("class_chunk", [None, 4, 5, 64])
def test_clip_chunked_matches_naive(class_chunk):
    img, _, txt, scale, _ = _inputs()
    f = lambda *a: L.clip_loss(*a, class_chunk=class_chunk)
    (v1, aux1), g1 = _jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(img, txt, scale)
    (v0, aux0), g0 = _jit(jax.value_and_grad(L.clip_loss_naive, argnums=(0, 1, 2), has_aux=True))(img, txt, scale)
    _close(v1, v0)
    _close(aux1, aux0)
    _close(g1, g0)
    # against a plain numpy cross-entropy
    x = np.asarray(img, np.float64); x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = np.asarray(txt, np.float64); t /= np.linalg.norm(t, axis=1, keepdims=True)
    lg = 4.0 * x @ t.T

    def xent(m):
        m = m - m.max(axis=1, keepdims=True)
        return -np.mean(np.diag(m) - np.log(np.exp(m).sum(axis=1)))
    np.testing.assert_allclose(float(v1), (xent(lg) + xent(lg.T)) / 2, rtol=RTOL)


@pytest.mark.parametrize("form,sample_chunk,class_chunk", [
    ("efficient", 2, 5),  # neither chunk size divides (S=5, N=16)
    ("full", 1, 4),  # both divide
    pytest.param("efficient", None, None, marks=pytest.mark.slow),
    pytest.param("full", 3, 5, marks=pytest.mark.slow),
    pytest.param("efficient", 5, 16, marks=pytest.mark.slow),
    pytest.param("full", 7, 100, marks=pytest.mark.slow),  # chunks larger than S and N
])
def test_hetxl_chunked_matches_naive(form, sample_chunk, class_chunk):
    mean, noise, txt, scale, key = _inputs(form)
    naive = lambda m, nz, t, sc: L.hetxl_loss_naive(m, nz, t, sc, key, mc_samples=S)
    chunked = lambda m, nz, t, sc: L.hetxl_loss(m, nz, t, sc, key, mc_samples=S, sample_chunk=sample_chunk,
                                                 class_chunk=class_chunk)
    (v0, aux0), g0 = _jit(jax.value_and_grad(naive, argnums=(0, 1, 2, 3), has_aux=True))(mean, noise, txt, scale)
    (v1, aux1), g1 = _jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3), has_aux=True))(
        mean, noise, txt, scale)
    _close(v1, v0)
    _close(aux1, aux0)
    _close(g1, g0)
    assert set(g1[1]) == set(noise) and all(float(jnp.max(jnp.abs(g))) > 0 for g in g1[1].values())


@pytest.mark.parametrize("class_chunk", [None, 3, 16])
def test_siglip_chunked_matches_naive(class_chunk):
    img, _, txt, scale, _ = _inputs()
    bias = jnp.float32(-2.0)
    f = lambda *a: L.siglip_loss(*a, class_chunk=class_chunk)
    (v1, aux1), g1 = _jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(img, txt, scale, bias)
    (v0, aux0), g0 = _jit(jax.value_and_grad(L.siglip_loss_naive, argnums=(0, 1, 2, 3), has_aux=True))(
        img, txt, scale, bias)
    _close(v1, v0)
    _close(aux1, aux0)
    _close(g1, g0)
    # numpy: -(1/N) sum_ij log sigmoid(z_ij * l_ij)
    x = np.asarray(img, np.float64); x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = np.asarray(txt, np.float64); t /= np.linalg.norm(t, axis=1, keepdims=True)
    z = 2 * np.eye(N) - 1
    ref = -np.sum(-np.logaddexp(0, -z * (4.0 * x @ t.T - 2.0))) / N
    np.testing.assert_allclose(float(v1), ref, rtol=RTOL)


# ------------------------------------------------------------------ 8 devices vs 1

def _grad_both(single, multi, args, argnums):
    (v0, aux0), g0 = _jit(jax.value_and_grad(single, argnums=argnums, has_aux=True))(*args)
    (v1, aux1), g1 = _jit(jax.value_and_grad(multi, argnums=argnums, has_aux=True))(*args)
    _close(v1, v0)
    _close(aux1, aux0)
    _close(g1, g0)


def test_clip_sharded_matches_single_device():
    img, _, txt, scale, _ = _inputs(n=32)
    f8 = L.sharded(L.clip_loss, _mesh8(), class_chunk=5)
    _grad_both(L.clip_loss_naive, f8, (img, txt, scale), (0, 1, 2))


def test_siglip_sharded_matches_single_device():
    img, _, txt, scale, _ = _inputs(n=32)
    f8 = L.sharded(L.siglip_loss, _mesh8(), class_chunk=7)
    _grad_both(L.siglip_loss_naive, f8, (img, txt, scale, jnp.float32(-3.0)), (0, 1, 2, 3))


@pytest.mark.parametrize("form", ["efficient", pytest.param("full", marks=pytest.mark.slow)])
def test_hetxl_sharded_matches_single_device(form):
    mean, noise, txt, scale, key = _inputs(form, n=32)
    f8 = L.sharded(L.hetxl_loss, _mesh8(), mc_samples=S, sample_chunk=2, class_chunk=12)
    f1 = lambda *a: L.hetxl_loss_naive(*a, mc_samples=S)
    _grad_both(f1, f8, (mean, noise, txt, scale, key), (0, 1, 2, 3))


@pytest.mark.slow
def test_hetxl_sharded_over_two_mesh_axes():
    """The trainer's (data, fsdp) mesh: batch split over both axes."""
    mean, noise, txt, scale, key = _inputs(n=16)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    f = L.sharded(L.hetxl_loss, mesh, axis=("data", "fsdp"), mc_samples=3, sample_chunk=2)
    _grad_both(lambda *a: L.hetxl_loss_naive(*a, mc_samples=3), f, (mean, noise, txt, scale, key), (0, 1, 2, 3))


def test_sharded_with_explicit_mesh():
    img, _, txt, scale, _ = _inputs(n=16)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    v, _ = _jit(L.sharded(L.clip_loss, mesh))(img, txt, scale)
    _close(v, L.clip_loss_naive(img, txt, scale)[0])


# ------------------------------------------------------------------ properties

@pytest.mark.parametrize("mc_samples", [1, 4])
def test_zero_noise_equals_det(mc_samples):
    mean, noise, txt, scale, key = _inputs()
    zero = {k: (jnp.zeros_like(a) if k != "C" else a) for k, a in noise.items()}
    det = _jit(L.clip_loss_naive)(mean, txt, scale)[0]
    het = _jit(lambda *a: L.hetxl_loss(*a, key, mc_samples=mc_samples, sample_chunk=3, class_chunk=5))(
        mean, zero, txt, scale)[0]
    het_naive = _jit(lambda *a: L.hetxl_loss_naive(*a, key, mc_samples=mc_samples))(mean, zero, txt, scale)[0]
    _close(het, det)
    _close(het_naive, det)


def test_noise_changes_the_loss():
    mean, noise, txt, scale, key = _inputs(noise_scale=1.0)
    det = _jit(L.clip_loss)(mean, txt, scale)[0]
    het = _jit(lambda *a: L.hetxl_loss(*a, key, mc_samples=4))(mean, noise, txt, scale)[0]
    assert abs(float(het) - float(det)) > 1e-2


def test_log_space_mc_average_matches_probability_space_numpy():
    """Tiny case by hand: average softmax probabilities over samples, then take -log."""
    n, d, r, s, scale = 3, 2, 1, 2, 3.0
    mean, noise, txt, _, key = _inputs(n=n, d=d, r=r, noise_scale=0.8)
    mu, dd, vv, cc = (np.asarray(a, np.float64) for a in (mean, noise["d"], noise["v"], noise["C"]))
    t = np.asarray(txt, np.float64); t /= np.linalg.norm(t, axis=1, keepdims=True)
    ids = jnp.arange(n)
    logits = np.zeros((n, s, n))
    for k in range(s):
        e_low, e_diag = (np.asarray(a, np.float64) for a in noise_lib.standard_normals(key, k, ids, d, r))
        z = mu + vv * (e_low @ cc.T) + dd * e_diag
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        logits[:, k, :] = scale * z @ t.T
    p_i2t = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)  # softmax over texts
    p_t2i = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)  # softmax over images
    i2t = -np.mean([np.log(np.mean(p_i2t[i, :, i])) for i in range(n)])
    t2i = -np.mean([np.log(np.mean(p_t2i[j, :, j])) for j in range(n)])
    expected = (i2t + t2i) / 2
    args = (mean, noise, txt, jnp.float32(scale))
    for value, aux in (_jit(lambda *a: L.hetxl_loss_naive(*a, key, mc_samples=s))(*args),
                       _jit(lambda *a: L.hetxl_loss(*a, key, mc_samples=s, sample_chunk=1, class_chunk=2))(*args)):
        np.testing.assert_allclose(float(value), expected, rtol=RTOL)
        np.testing.assert_allclose(float(aux["loss_i2t"]), i2t, rtol=RTOL)
        np.testing.assert_allclose(float(aux["loss_t2i"]), t2i, rtol=RTOL)


def test_accuracy_metrics():
    img, _, _, scale, _ = _inputs(n=16)
    perm = jnp.array([1, 0] + list(range(2, 16)))  # two swapped pairs -> 14/16 correct
    txt = img[perm]
    auxes = [_jit(lambda *a: L.clip_loss(*a, class_chunk=3))(img, txt, scale)[1],
             _jit(lambda *a: L.siglip_loss(*a, 0.0, class_chunk=5))(img, txt, scale)[1],
             _jit(L.sharded(L.clip_loss, _mesh8(), class_chunk=3))(img, txt, scale)[1],
             L.clip_loss_naive(img, txt, scale)[1]]
    for aux in auxes:
        np.testing.assert_allclose([aux["acc_i2t"], aux["acc_t2i"]], [14 / 16, 14 / 16])


def test_bf16_matmul_option():
    mean, noise, txt, scale, key = _inputs()
    ref = _jit(lambda *a: L.clip_loss(*a)[0])(mean, txt, scale)
    fast, aux = _jit(lambda *a: L.clip_loss(*a, matmul_dtype=jnp.bfloat16))(
        mean.astype(jnp.bfloat16), txt.astype(jnp.bfloat16), scale)
    assert fast.dtype == jnp.float32 and aux["loss_i2t"].dtype == jnp.float32
    np.testing.assert_allclose(float(fast), float(ref), rtol=2e-2)


@pytest.mark.slow
def test_chunked_memory_does_not_grow_with_samples():
    """Compile-time temp memory of value+grad: flat in S for the chunked loss, ∝ S for the naive one."""
    mean, noise, txt, scale, key = _inputs(n=128, d=32)

    def temp_bytes(fn, s):
        g = jax.jit(jax.grad(lambda m, nz, t: fn(m, nz, t, scale, key, mc_samples=s)[0], argnums=(0, 1, 2)))
        return g.lower(mean, noise, txt).compile().memory_analysis().temp_size_in_bytes

    chunked = lambda *a, **k: L.hetxl_loss(*a, **k, sample_chunk=2, class_chunk=32)
    c4, c32 = temp_bytes(chunked, 4), temp_bytes(chunked, 32)
    n4, n32 = temp_bytes(L.hetxl_loss_naive, 4), temp_bytes(L.hetxl_loss_naive, 32)
    assert n32 > 4 * n4  # the naive [N, S, N] logits dominate
    assert c32 < 1.5 * c4, (c4, c32)
    assert c32 < n32 / 8


# ------------------------------------------------------------------ errors

def test_bad_inputs_raise_clear_errors():
    mean, noise, txt, scale, key = _inputs()
    het = lambda **kw: L.hetxl_loss(kw.pop("mean", mean), kw.pop("noise", noise), kw.pop("txt", txt),
                                    kw.pop("scale", scale), key, **{"mc_samples": 2, **kw})
    with pytest.raises(ValueError, match="mc_samples=0 must be a positive integer"):
        het(mc_samples=0)
    with pytest.raises(ValueError, match="mc_samples=1.5"):
        het(mc_samples=1.5)
    with pytest.raises(ValueError, match="mc_samples=0"):
        L.hetxl_loss_naive(mean, noise, txt, scale, key, mc_samples=0)
    with pytest.raises(ValueError, match="sample_chunk=0"):
        het(sample_chunk=0)
    with pytest.raises(ValueError, match="class_chunk=-1"):
        L.clip_loss(mean, txt, scale, class_chunk=-1)
    with pytest.raises(ValueError, match="batch sizes differ: mean has 16 rows, txt has 15"):
        het(txt=txt[:15])
    with pytest.raises(ValueError, match="batch sizes differ: img has 16 rows, txt has 8"):
        L.siglip_loss(mean, txt[:8], scale, 0.0)
    with pytest.raises(ValueError, match="embedding widths differ"):
        L.clip_loss(mean, txt[:, :4], scale)
    with pytest.raises(ValueError, match=r"img must have shape \[B, D\] \(rank 2\), got shape \(16, 2, 4\)"):
        L.clip_loss(mean.reshape(16, 2, 4), txt, scale)
    with pytest.raises(ValueError, match=r"scale must be a scalar, got shape \(2,\)"):
        L.clip_loss_naive(mean, txt, jnp.ones(2))
    with pytest.raises(ValueError, match="bias must be a scalar"):
        L.siglip_loss(mean, txt, scale, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"noise\['d'\] must have shape \[B, D\] = \[16, 8\], got \[16, 7\]"):
        het(noise={**noise, "d": noise["d"][:, :7]})
    with pytest.raises(ValueError, match=r"noise\['C'\] must have shape \[D=8, R\]"):
        het(noise={**noise, "C": noise["C"][:4]})
    with pytest.raises(ValueError, match=r"noise\['V'\] must have shape \[B=16, D=8, R\]"):
        het(noise={"d": noise["d"], "V": jnp.zeros((16, 8))})
    with pytest.raises(ValueError, match="noise must have keys"):
        het(noise={"d": noise["d"]})


def test_sharded_bad_inputs():
    mean, noise, txt, scale, key = _inputs(n=12)
    mesh = _mesh8()
    with pytest.raises(ValueError, match="global batch 12 is not divisible by the 8 devices"):
        L.sharded(L.hetxl_loss, mesh, mc_samples=2)(mean, noise, txt, scale, key)
    with pytest.raises(ValueError, match="axis 'batch' is not an axis of the mesh"):
        L.sharded(L.clip_loss, mesh, axis="batch")
    with pytest.raises(ValueError, match="sharded\\(\\) supports"):
        L.sharded(L.clip_loss_naive, mesh)
    with pytest.raises(ValueError, match="sets axis_name itself"):
        L.sharded(L.clip_loss, mesh, axis_name="data")
    with pytest.raises(ValueError, match="batch sizes differ"):
        L.sharded(L.clip_loss, mesh)(mean[:8], txt[:4], scale)


@pytest.mark.parametrize("loss", ["clip", pytest.param("hetxl", marks=pytest.mark.slow)])
def test_gradients_under_shard_map_without_vma_checks(loss):
    """The trainer calls the losses inside its own ``shard_map(..., check_vma=False)``."""
    mean, noise, txt, scale, key = _inputs(n=16)
    if loss == "clip":
        fn = functools.partial(L.clip_loss, axis_name="data", class_chunk=3)
        args, specs, ref = (mean, txt, scale), (P("data"), P("data"), P()), L.clip_loss_naive
    else:
        fn = functools.partial(L.hetxl_loss, axis_name="data", mc_samples=3, sample_chunk=2)
        args = (mean, noise, txt, scale, key)
        specs = (P("data"), {"d": P("data"), "v": P("data"), "C": P()}, P("data"), P(), P())
        ref = functools.partial(L.hetxl_loss_naive, mc_samples=3)
    multi = jax.shard_map(fn, mesh=_mesh8(), in_specs=specs, out_specs=(P(), P()), check_vma=False)
    _grad_both(ref, multi, args, (0, 1, 2, 3) if loss == "hetxl" else (0, 1, 2))


# ------------------------------------------------------------------ the jackknife estimator

def test_log_mean_estimate_jackknife_known_answer():
    """Against the definition in float64: ``S·L_S − (S−1)·mean_k L_(k)`` with ``L`` the log of a sample mean."""
    rng = np.random.default_rng(0)
    log_p = np.log(rng.uniform(0.01, 1.0, (6, 4)))
    full = np.log(np.exp(log_p).mean(0))
    loo = np.stack([np.log(np.exp(np.delete(log_p, k, 0)).mean(0)) for k in range(6)])
    want = 6 * full - 5 * loo.mean(0)
    np.testing.assert_allclose(L.log_mean_estimate(jnp.asarray(log_p), "jackknife"), want, rtol=1e-5)
    np.testing.assert_allclose(L.log_mean_estimate(jnp.asarray(log_p), "mc"), full, rtol=1e-6)
    with pytest.raises(ValueError, match="mc_samples >= 2"):
        L.log_mean_estimate(jnp.zeros((1, 3)), "jackknife")
    with pytest.raises(ValueError, match="estimator='exact'"):
        L.log_mean_estimate(jnp.zeros((2, 3)), "exact")
    # one sample holding all the mass: finite
    assert np.isfinite(np.asarray(L.log_mean_estimate(jnp.asarray([[0.0], [-1e4], [-1e4]]), "jackknife"))).all()


def test_jackknife_removes_most_of_the_small_sample_bias():
    """The HET-XL loss with S = 4 samples, averaged over 400 keys, against a 4,096-sample estimate of the
    expected loss: the plain MC estimate is biased upward (Jensen), the jackknife's bias is several times smaller."""
    mean, noise, txt, scale, _ = _inputs(noise_scale=1.0)
    ref = float(_jit(lambda k: L.hetxl_loss(mean, noise, txt, scale, k, mc_samples=4096, sample_chunk=512)[0])(
        jax.random.key(7)))

    def avg(estimator):
        f = _jit(jax.vmap(lambda k: L.hetxl_loss_naive(mean, noise, txt, scale, k, mc_samples=4,
                                                       estimator=estimator)[0]))
        return float(jnp.mean(f(jax.random.split(jax.random.key(1), 400))))

    bias_mc, bias_jk = avg("mc") - ref, avg("jackknife") - ref
    assert bias_mc > 0.01
    assert abs(bias_jk) < bias_mc / 3


def test_jackknife_chunked_and_sharded_match_naive():
    mean, noise, txt, scale, key = _inputs()
    naive = L.hetxl_loss_naive(mean, noise, txt, scale, key, mc_samples=S, estimator="jackknife")[0]
    chunked = L.hetxl_loss(mean, noise, txt, scale, key, mc_samples=S, sample_chunk=2, class_chunk=5,
                           estimator="jackknife")[0]
    f8 = L.sharded(L.hetxl_loss, _mesh8(), mc_samples=S, sample_chunk=2, estimator="jackknife")
    _close(chunked, naive)
    _close(f8(mean, noise, txt, scale, key)[0], naive)
    assert float(naive) != pytest.approx(float(L.hetxl_loss_naive(mean, noise, txt, scale, key, mc_samples=S)[0]))
