"""HET-XL noise on an embedding: the one place that draws and applies it.

The head (``hetclip.heads``) predicts, per image, a Gaussian ``N(0, V Vᵀ + diag(d²))`` over the
``D``-dimensional embedding. It is represented by a plain dict of arrays so that it can cross
``shard_map``/``jit`` boundaries and be stored:

* parameter-efficient form: ``{"d": [B, D], "v": [B, D], "C": [D, R]}`` with ``V = diag(v) C``;
* full form: ``{"d": [B, D], "V": [B, D, R]}``.

Sample ``s`` of global example ``g`` uses standard normals that depend only on ``(key, s, g)``,
so a loss computed on 1 device or on 8, chunked or not, sees exactly the same noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rank(noise) -> int:
    return noise["V"].shape[-1] if "V" in noise else noise["C"].shape[-1]


def standard_normals(key, sample_index, example_ids, dim: int, num_factors: int):
    """``(e [B, R], e' [B, D])`` for sample ``sample_index`` of the examples ``example_ids`` (int [B]).

    One independent normal per embedding dimension for the diagonal term (``e'``), never a scalar
    broadcast over dimensions (that would make the "diagonal" term rank one).
    """
    k = jax.random.fold_in(key, sample_index)

    def one(g):
        k_low, k_diag = jax.random.split(jax.random.fold_in(k, g))
        return (jax.random.normal(k_low, (num_factors,), jnp.float32),
                jax.random.normal(k_diag, (dim,), jnp.float32))

    return jax.vmap(one)(example_ids)


def perturbation(noise, e_low, e_diag):
    """``ε = V e + d ⊙ e'`` for ``e_low [B, R]``, ``e_diag [B, D]``; returns ``[B, D]``."""
    if "V" in noise:
        low = jnp.einsum("bdr,br->bd", noise["V"], e_low)
    else:
        low = noise["v"] * (e_low @ noise["C"].T)
    return low + noise["d"] * e_diag


def covariance(noise):
    """Analytic covariance ``V Vᵀ + diag(d²)``, ``[B, D, D]`` (tests and diagnostics only)."""
    v_mat = noise["V"] if "V" in noise else noise["v"][:, :, None] * noise["C"][None]
    return jnp.einsum("bdr,ber->bde", v_mat, v_mat) + jax.vmap(jnp.diag)(noise["d"] ** 2)


def l2_normalize(x, axis=-1, eps=1e-12):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def noisy_sample(mean, noise, key, sample_index, example_ids):
    """One normalised noisy embedding per example: ``(μ + ε_s) / ‖μ + ε_s‖``, ``[B, D]``."""
    e_low, e_diag = standard_normals(key, sample_index, example_ids, mean.shape[-1], rank(noise))
    return l2_normalize(mean + perturbation(noise, e_low, e_diag))


def sample_embeddings(mean, noise, key, mc_samples: int, example_ids=None):
    """``[B, S, D]`` normalised noisy embeddings (zero-shot MC prediction, diagnostics)."""
    if example_ids is None:
        example_ids = jnp.arange(mean.shape[0])
    samples = jax.vmap(lambda s: noisy_sample(mean, noise, key, s, example_ids))(jnp.arange(mc_samples))
    return jnp.swapaxes(samples, 0, 1)


def _low_rank_parts(noise, unit):
    """``(Σ_r V[:, d, r]² [B, D], ‖Vᵀ u‖² [B])`` for unit vectors ``u [B, D]``, without forming ``V`` in the
    parameter-efficient form (``V = diag(v) C``)."""
    if "V" in noise:
        return jnp.sum(noise["V"] ** 2, axis=-1), jnp.sum(jnp.einsum("bdr,bd->br", noise["V"], unit) ** 2, axis=-1)
    c = noise["C"]
    return noise["v"] ** 2 * jnp.sum(c ** 2, axis=-1)[None], jnp.sum(((noise["v"] * unit) @ c) ** 2, axis=-1)


def per_example_sizes(mean, noise):
    """How large each example's noise is, ``[B]`` each:

    * ``std``: the per-coordinate noise std ``sqrt(tr Σ / D)``;
    * ``mean_norm``: ``‖μ‖``;
    * ``angular``: ``sqrt(tr Σ − μ̂ᵀ Σ μ̂) / ‖μ‖``, the size of the noise across the mean direction relative to
      the mean (for small noise, the RMS angle in radians between ``μ`` and a normalised noisy sample). Noise
      along ``μ`` only changes the length, which the normalisation removes, so this is the noise that can
      change a prediction;
    * ``lowrank_std``, ``diag_std``: the two parts of ``std`` (``V Vᵀ`` and ``diag(d²)``).
    """
    mean = mean.astype(jnp.float32)
    unit = l2_normalize(mean)
    low_sq, low_along = _low_rank_parts(noise, unit)
    d2 = noise["d"] ** 2
    trace = jnp.sum(low_sq, axis=-1) + jnp.sum(d2, axis=-1)
    along = low_along + jnp.sum(d2 * unit ** 2, axis=-1)
    norm = jnp.sqrt(jnp.sum(mean * mean, axis=-1))
    dim = mean.shape[-1]
    return {"std": jnp.sqrt(trace / dim), "mean_norm": norm,
            "angular": jnp.sqrt(jnp.maximum(trace - along, 0.0)) / jnp.maximum(norm, 1e-12),
            "lowrank_std": jnp.sqrt(jnp.sum(low_sq, axis=-1) / dim), "diag_std": jnp.sqrt(jnp.sum(d2, axis=-1) / dim)}


def size_stats(mean, noise, axis_name=None):
    """Scalars for logging (means over the batch; under ``axis_name`` over every device's examples):
    ``het/noise_std`` (per-coordinate std), ``het/mean_norm`` (``‖μ‖``), ``het/angular`` (noise across the
    mean direction relative to ``‖μ‖``: what survives the normalisation), ``het/angular_spread`` (its standard
    deviation across images: 0 means the noise does not depend on the input), and the two parts of the
    per-coordinate std, ``het/diag_std`` (``d``) and ``het/lowrank_std`` (``V``)."""
    sizes = per_example_sizes(mean, noise)
    moments = {f"het/{k}": sizes[k] for k in ("angular", "mean_norm", "diag_std", "lowrank_std")}
    moments.update({"het/noise_std": sizes["std"], "_angular_sq": sizes["angular"] ** 2})
    out = {k: jnp.mean(v) for k, v in moments.items()}
    if axis_name is not None:
        out = jax.lax.pmean(out, axis_name)
    second = out.pop("_angular_sq")
    out["het/angular_spread"] = jnp.sqrt(jnp.maximum(second - out["het/angular"] ** 2, 0.0))
    return out
