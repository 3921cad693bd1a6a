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
    if "V" in noise:
        v_mat = noise["V"]
    else:
        v_mat = noise["v"][:, :, None] * noise["C"][None]
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


def noise_scale_stats(noise):
    """Scalars for logging: mean diagonal std, mean low-rank norm per dimension."""
    if "V" in noise:
        low_sq = jnp.sum(noise["V"] ** 2, axis=-1)
    else:
        low_sq = noise["v"] ** 2 * jnp.sum(noise["C"] ** 2, axis=-1)[None]
    return {"het/diag_std": jnp.mean(noise["d"]),
            "het/lowrank_std": jnp.mean(jnp.sqrt(low_sq)),
            "het/total_std": jnp.mean(jnp.sqrt(low_sq + noise["d"] ** 2))}
