"""HET-XL heads: the contrastive embedding-noise head and the learned temperature (docs/DESIGN.md §3, §5), and
``low_rank_noise``, the input-dependent Gaussian shared with ``hetclip.supervised_heads``.

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

from hetclip.losses import ESTIMATORS  # how the loss estimates log E[softmax] (losses.log_mean_estimate)
from hetclip.towers import Dense

DIAG_FLOOR = 1e-3
# Where the contrastive head adds its noise: to the projection's output μ before the normalisation
# ("embedding"), or to the unit vector μ/‖μ‖ ("sphere"; see HetXLEmbeddingHead).
NOISE_SPACES = ("embedding", "sphere")


@dataclasses.dataclass(frozen=True)
class HetConfig:
    """HET-XL head settings (the recipes' defaults). ``num_factors`` R is the rank of the low-rank
    covariance, ``mc_samples`` S the Monte-Carlo sample count of the training loss (0: DET loss),
    ``estimator`` how the loss estimates ``log E[softmax]`` from them (``hetclip.losses.log_mean_estimate``)."""
    enabled: bool = False
    num_factors: int = 15
    mc_samples: int = 16
    param_efficient: bool = True
    sample_chunk: int = 4
    class_chunk: Optional[int] = None
    init_scale: float = 0.1
    noise_space: str = "embedding"
    estimator: str = "mc"

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
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"HetConfig: estimator={self.estimator!r} is not one of {ESTIMATORS}")
        if self.estimator == "jackknife" and self.enabled and self.mc_samples < 2:
            raise ValueError(f"HetConfig: the jackknife estimator needs mc_samples >= 2, got {self.mc_samples}")
        if self.noise_space not in NOISE_SPACES:
            raise ValueError(f"HetConfig: noise_space={self.noise_space!r} is not one of {NOISE_SPACES}")


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
    (parameters ``het_head/{diag,low_rank}/{kernel,bias}`` and ``het_head/C`` in the PE form).

    With ``noise_space="sphere"`` the noise is added to the unit mean ``μ/‖μ‖`` (``DualEncoder.project_image``
    returns that as the mean), so its size is an angle that ``‖μ‖`` cannot shrink; the head's outputs ``d`` and
    ``v`` (``V``) are multiplied by ``embed_dim^-0.5``, which keeps the initial angular noise ≈ ``init_scale``
    as in the default ``"embedding"`` space (where ``‖μ‖ ≈ √D`` at initialisation)."""
    embed_dim: int
    config: HetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        c = self.config
        noise = low_rank_noise(self, h, self.embed_dim, c.num_factors, c.param_efficient, c.init_scale, self.dtype)
        if c.noise_space == "sphere":
            unit = self.embed_dim ** -0.5
            noise = {k: (v if k == "C" else v * unit) for k, v in noise.items()}
        return noise


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
