"""HET-XL heads: the contrastive embedding-noise head, the learned temperature, and the
supervised DET / HET / HET-XL classifier heads of the paper (DESIGN §2).

Noise is represented as in ``hetclip.noise``: ``{"d", "v", "C"}`` (parameter-efficient) or
``{"d", "V"}`` (full); samples are drawn there, keyed by ``(key, sample, example)``.

Initialisation of the embedding head (``HetXLEmbeddingHead``): the image tower's pooled features
``h`` are LayerNorm outputs (≈ unit variance per feature) and the projection is initialised with
std ``W^-0.5``, so each coordinate of the initial mean embedding ``μ`` has std ≈ 1. The head is
initialised so that the noise std per coordinate is ≈ ``init_scale`` (default 0.1) of that:
half of the variance from the diagonal term and half from the low-rank term, i.e.
``d ≈ init_scale/√2`` (bias ``softplus⁻¹(init_scale/√2 − 1e-3)``, small input-dependent kernel)
and ``Σ_r V[:, r]² ≈ init_scale²/2``. The noisy sample is then ≈ 10% off the mean in norm — enough
for gradients to reach the noise parameters but not enough to disturb early contrastive training.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hetclip import noise as noise_lib
from hetclip.towers import Dense

DIAG_FLOOR = 1e-3


@dataclasses.dataclass(frozen=True)
class HetConfig:
    """HET-XL head settings (the recipes' defaults). ``num_factors`` R is the rank of the low-rank
    covariance, ``mc_samples`` S the Monte-Carlo sample count of the training loss (0: DET loss)."""
    enabled: bool = False
    num_factors: int = 15
    mc_samples: int = 16
    param_efficient: bool = True
    sample_chunk: int = 4
    class_chunk: Optional[int] = None
    init_scale: float = 0.1

    def __post_init__(self):
        if self.num_factors < 1:
            raise ValueError(f"HetConfig: num_factors={self.num_factors} must be >= 1")
        if self.mc_samples < 0:
            raise ValueError(f"HetConfig: mc_samples={self.mc_samples} must be >= 0 (0 = DET loss)")
        if self.enabled and self.mc_samples < 1:
            raise ValueError(f"HetConfig: mc_samples={self.mc_samples} must be >= 1 when the HET-XL "
                             "head is enabled")
        if self.sample_chunk < 1:
            raise ValueError(f"HetConfig: sample_chunk={self.sample_chunk} must be >= 1")
        if self.class_chunk is not None and self.class_chunk < 1:
            raise ValueError(f"HetConfig: class_chunk={self.class_chunk} must be >= 1 or None")
        if not self.init_scale > 0:
            raise ValueError(f"HetConfig: init_scale={self.init_scale} must be > 0")


def inverse_softplus(y: float) -> float:
    return float(y + math.log(-math.expm1(-y)))


def low_rank_noise(module: nn.Module, h, dim: int, num_factors: int, param_efficient: bool,
                   init_scale: float, dtype=jnp.float32):
    """Input-dependent Gaussian over ``dim`` coordinates from features ``h [B, F]``; call from inside
    ``module``'s compact method (creates its parameters there).

    ``d = softplus(A_d h + b_d) + 1e-3``; PE: ``v = A_v h + b_v`` with learned ``C [dim, R]``;
    full: ``V = reshape(A_V h + b_V, [dim, R])``. Returns the ``hetclip.noise`` dict.
    Parameters: ``diag/{kernel,bias}`` (A_d, b_d), ``low_rank/{kernel,bias}`` (A_v, b_v or A_V, b_V),
    ``C`` (PE only). See the module docstring for the initialisation.
    """
    h = h.astype(jnp.float32)
    f = h.shape[-1]
    r = num_factors
    part = init_scale / math.sqrt(2.0)  # std of each of the two terms at initialisation
    # Input dependence starts small (1/10 of the constant part) so the initial noise is ≈ part.
    small = nn.initializers.normal(0.1 * f ** -0.5)
    d_bias = inverse_softplus(max(part - DIAG_FLOOR, 1e-6))
    d = nn.softplus(Dense(dim, dtype=dtype, kernel_init=small,
                          bias_init=nn.initializers.constant(d_bias), name="diag")(h)) + DIAG_FLOOR
    if param_efficient:
        v = Dense(dim, dtype=dtype, kernel_init=small, bias_init=nn.initializers.ones, name="low_rank")(h)
        c = module.param("C", nn.initializers.normal(part / math.sqrt(r)), (dim, r), jnp.float32)
        return {"d": d, "v": v, "C": c}
    # Full form: V entries have std ≈ part/√R from the input (h has unit variance per feature).
    flat = Dense(dim * r, dtype=dtype, kernel_init=nn.initializers.normal(part / math.sqrt(r * f)),
                 name="low_rank")(h)
    return {"d": d, "V": flat.reshape(h.shape[:-1] + (dim, r))}


class HetXLEmbeddingHead(nn.Module):
    """Contrastive HET-XL head: Gaussian noise over the ``embed_dim`` image embedding, predicted from
    the pooled image features ``h [B, W_v]``. Returns the ``hetclip.noise`` dict
    (parameters ``het_head/{diag,low_rank}/{kernel,bias}`` and ``het_head/C`` in the PE form)."""
    embed_dim: int
    config: HetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        c = self.config
        return low_rank_noise(self, h, self.embed_dim, c.num_factors, c.param_efficient, c.init_scale,
                              self.dtype)


@dataclasses.dataclass(frozen=True)
class TemperatureConfig:
    """``kind='clip'``: learned ``log_scale`` = log(1/τ), scale clamped at ``max_scale``.
    ``kind='bounded'``: ``τ = tau_lo + (tau_hi - tau_lo) · sigmoid(t)``. Both start at ``τ = init``."""
    kind: str = "clip"
    init: float = 0.07
    max_scale: float = 100.0
    tau_lo: float = 0.01
    tau_hi: float = 1.0

    def __post_init__(self):
        if self.kind not in ("clip", "bounded"):
            raise ValueError(f"temperature kind={self.kind!r} is not supported; choose 'clip' or 'bounded'")
        if not self.init > 0:
            raise ValueError(f"temperature init={self.init} must be > 0")
        if self.kind == "clip" and not self.max_scale > 0:
            raise ValueError(f"temperature max_scale={self.max_scale} must be > 0")
        if self.kind == "bounded" and not 0 < self.tau_lo < self.init < self.tau_hi:
            raise ValueError(f"bounded temperature needs 0 < tau_lo < init < tau_hi, got tau_lo={self.tau_lo}, "
                             f"init={self.init}, tau_hi={self.tau_hi}")


class Temperature(nn.Module):
    """Learned temperature; ``__call__()`` returns the logit scale ``1/τ`` (scalar, fp32)."""
    config: TemperatureConfig = TemperatureConfig()

    @nn.compact
    def __call__(self):
        c = self.config
        if c.kind == "clip":
            log_scale = self.param("log_scale", nn.initializers.constant(math.log(1.0 / c.init)), (), jnp.float32)
            return jnp.exp(jnp.minimum(log_scale, math.log(c.max_scale)))
        frac = (c.init - c.tau_lo) / (c.tau_hi - c.tau_lo)
        t = self.param("t", nn.initializers.constant(math.log(frac / (1 - frac))), (), jnp.float32)
        return 1.0 / (c.tau_lo + (c.tau_hi - c.tau_lo) * jax.nn.sigmoid(t))


# ----------------------------------------------------------------------------------------------
# Supervised classifier heads (DET, HET, HET-XL), as in the paper's image-classification setting.
# ----------------------------------------------------------------------------------------------

CLASSIFIER_KINDS = ("softmax", "sigmoid")


def _check_kind(kind: str):
    if kind not in CLASSIFIER_KINDS:
        raise ValueError(f"classifier kind={kind!r} is not supported; choose one of {CLASSIFIER_KINDS}")


def _sample_terms(u, kind: str):
    """Per-sample log-probabilities of ``u`` (already divided by τ)."""
    if kind == "softmax":
        return (jax.nn.log_softmax(u, axis=-1),)
    return jax.nn.log_sigmoid(u), jax.nn.log_sigmoid(-u)


def mc_log_mean(sample_fn, mc_samples: int, sample_chunk: int, num_terms: int):
    """``log((1/S) Σ_s exp(sample_fn(s)))`` for each of the ``num_terms`` arrays ``sample_fn`` returns,
    computed in log space with a running logsumexp over chunks of ``sample_chunk`` samples (samples of
    a chunk are vmapped; chunk bodies are rematerialised in the backward pass)."""
    if mc_samples < 1:
        raise ValueError(f"mc_samples={mc_samples} must be >= 1 for a Monte-Carlo average")
    if sample_chunk < 1:
        raise ValueError(f"sample_chunk={sample_chunk} must be >= 1")
    chunk = min(sample_chunk, mc_samples)
    n_chunks = -(-mc_samples // chunk)

    @jax.checkpoint
    def chunk_lse(c):
        idx = c * chunk + jnp.arange(chunk)
        terms = jax.vmap(sample_fn)(idx)
        valid = (idx < mc_samples).reshape((chunk,) + (1,) * (terms[0].ndim - 1))
        return tuple(jax.nn.logsumexp(jnp.where(valid, t, -jnp.inf), axis=0) for t in terms)

    first = chunk_lse(0)

    def body(acc, c):
        new = chunk_lse(c)
        return tuple(jnp.logaddexp(a, n) for a, n in zip(acc, new)), None

    acc, _ = jax.lax.scan(body, first, jnp.arange(1, n_chunks))
    return tuple(a - math.log(mc_samples) for a in acc)[:num_terms]


def _output(terms, kind: str, **extra):
    out = {"log_probs": terms[0]}
    if kind == "sigmoid":
        out["log_1m_probs"] = terms[1]
    out.update(extra)
    return out


def det_log_probs(logits, kind: str = "softmax", scale=1.0):
    """DET predictive: ``log softmax(scale·logits)`` or ``log sigmoid(±scale·logits)``."""
    _check_kind(kind)
    return _output(_sample_terms(logits * scale, kind), kind)


def het_log_probs(logits, noise, scale, key, mc_samples: int, kind: str = "softmax",
                  sample_chunk: int = 8, example_ids=None):
    """HET predictive (noise in logit space): ``log (1/S) Σ_s p(u_s/τ)``, ``u_s = logits + ε_s``,
    ``ε_s ~ N(0, V Vᵀ + diag(d²))`` over the ``K`` classes (``noise`` in ``hetclip.noise`` form)."""
    _check_kind(kind)
    ids = jnp.arange(logits.shape[0]) if example_ids is None else example_ids
    k_dim, r = logits.shape[-1], noise_lib.rank(noise)

    def one(s):
        e_low, e_diag = noise_lib.standard_normals(key, s, ids, k_dim, r)
        return _sample_terms((logits + noise_lib.perturbation(noise, e_low, e_diag)) * scale, kind)

    return _output(mc_log_mean(one, mc_samples, sample_chunk, 1 if kind == "softmax" else 2), kind)


def hetxl_log_probs(prelogits, noise, kernel, bias, scale, key, mc_samples: int, kind: str = "softmax",
                    sample_chunk: int = 8, example_ids=None, dtype=jnp.float32):
    """HET-XL predictive (noise on the ``D`` pre-logits): ``u_s = (φ + ε'_s) W + b``,
    ``ε'_s ~ N(0, V Vᵀ + diag(d²))`` over ``D``; ``log (1/S) Σ_s p(u_s/τ)``."""
    _check_kind(kind)
    ids = jnp.arange(prelogits.shape[0]) if example_ids is None else example_ids
    d_dim, r = prelogits.shape[-1], noise_lib.rank(noise)

    def one(s):
        e_low, e_diag = noise_lib.standard_normals(key, s, ids, d_dim, r)
        z = prelogits + noise_lib.perturbation(noise, e_low, e_diag)
        u = jax.lax.dot_general(z.astype(dtype), kernel.astype(dtype), (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
        if bias is not None:
            u = u + bias
        return _sample_terms(u * scale, kind)

    return _output(mc_log_mean(one, mc_samples, sample_chunk, 1 if kind == "softmax" else 2), kind)


def classifier_loss(out, labels):
    """Mean negative log-likelihood of a classifier output.

    softmax: ``labels`` int ``[B]`` or (soft / normalised multi-hot) float ``[B, K]``;
    sigmoid: ``labels`` multi-hot ``[B, K]`` or int ``[B]`` (one-hot), summed binary NLL over classes.
    """
    log_p = out["log_probs"]
    k = log_p.shape[-1]
    labels = jnp.asarray(labels)
    if labels.ndim == 1:
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"1-D labels must be integer class ids, got dtype {labels.dtype}")
        labels = jax.nn.one_hot(labels, k, dtype=jnp.float32)
    if labels.shape != log_p.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match log-probabilities {tuple(log_p.shape)}")
    labels = labels.astype(jnp.float32)
    if "log_1m_probs" in out:
        return -jnp.mean(jnp.sum(labels * log_p + (1 - labels) * out["log_1m_probs"], axis=-1))
    return -jnp.mean(jnp.sum(labels * log_p, axis=-1))


def _check_classifier(num_classes: int, kind: str):
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    _check_kind(kind)


def _bounded_default() -> TemperatureConfig:
    return TemperatureConfig(kind="bounded", init=1.0, tau_lo=0.05, tau_hi=5.0)


class DetClassifier(nn.Module):
    """``logits = φ(x) W + b`` (params ``classifier/{kernel,bias}``); optional learned temperature."""
    num_classes: int
    kind: str = "softmax"
    temperature: Optional[TemperatureConfig] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        _check_classifier(self.num_classes, self.kind)
        logits = Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                       name="classifier")(x)
        scale = Temperature(self.temperature, name="temperature")() if self.temperature else 1.0
        return {**det_log_probs(logits, self.kind, scale), "logits": logits}


class HetClassifier(nn.Module):
    """HET (2021): noise in logit space, ``K × R`` low rank (PE: ``diag(v) C``) + ``K`` diagonal,
    MC average of ``p(u_s/τ)`` over ``mc_samples`` samples, learned (bounded) temperature.
    Params: ``classifier``, ``diag``, ``low_rank``, ``C`` (PE), ``temperature``.
    ``deterministic=True`` returns the DET predictive of the mean logits (no sampling)."""
    num_classes: int
    num_factors: int = 10
    mc_samples: int = 16
    param_efficient: bool = True
    kind: str = "softmax"
    temperature: TemperatureConfig = dataclasses.field(default_factory=_bounded_default)
    sample_chunk: int = 8
    init_scale: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key=None, *, deterministic: bool = False, example_ids=None):
        _check_classifier(self.num_classes, self.kind)
        logits = Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                       name="classifier")(x)
        noise = low_rank_noise(self, x, self.num_classes, self.num_factors, self.param_efficient,
                               self.init_scale, self.dtype)
        scale = Temperature(self.temperature, name="temperature")()
        if deterministic:
            return {**det_log_probs(logits, self.kind, scale), "logits": logits, "noise": noise}
        if key is None:
            raise ValueError("HetClassifier needs a PRNG key unless deterministic=True")
        out = het_log_probs(logits, noise, scale, key, self.mc_samples, self.kind, self.sample_chunk, example_ids)
        return {**out, "logits": logits, "noise": noise}


class HetXLClassifier(nn.Module):
    """HET-XL (2023): noise on the ``D`` pre-logits (``D × R`` low rank + ``D`` diagonal), then the
    classifier ``W``; MC average as ``HetClassifier``. Extra parameters do not grow with ``K``."""
    num_classes: int
    num_factors: int = 10
    mc_samples: int = 16
    param_efficient: bool = True
    kind: str = "softmax"
    temperature: TemperatureConfig = dataclasses.field(default_factory=_bounded_default)
    sample_chunk: int = 8
    init_scale: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key=None, *, deterministic: bool = False, example_ids=None):
        _check_classifier(self.num_classes, self.kind)
        x = x.astype(jnp.float32)
        dense = Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="classifier")
        logits = dense(x)
        kernel = dense.variables["params"]["kernel"]
        bias = dense.variables["params"]["bias"]
        noise = low_rank_noise(self, x, x.shape[-1], self.num_factors, self.param_efficient,
                               self.init_scale, self.dtype)
        scale = Temperature(self.temperature, name="temperature")()
        if deterministic:
            return {**det_log_probs(logits, self.kind, scale), "logits": logits, "noise": noise}
        if key is None:
            raise ValueError("HetXLClassifier needs a PRNG key unless deterministic=True")
        out = hetxl_log_probs(x, noise, kernel, bias, scale, key, self.mc_samples, self.kind,
                              self.sample_chunk, example_ids, self.dtype)
        return {**out, "logits": logits, "noise": noise}
