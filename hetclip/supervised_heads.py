"""The paper's supervised classifier heads (docs/DESIGN.md §3–§5): DET, HET (noise on the logits)
and HET-XL (noise on the pre-logits), with their Monte-Carlo predictives and the classification loss.

Noise parameters come from ``hetclip.heads.low_rank_noise``; samples are keyed by
``(key, sample, example)`` as in ``hetclip.noise``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hetclip import noise as noise_lib
from hetclip.chunks import chunked_map
from hetclip.heads import Temperature, TemperatureConfig, low_rank_noise
from hetclip.towers import Dense

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
    computed in log space: a logsumexp per chunk of ``sample_chunk`` samples (vmapped; with several
    chunks each is rematerialised in the backward pass, ``hetclip.chunks.chunked_map``), then over chunks."""
    if mc_samples < 1:
        raise ValueError(f"mc_samples={mc_samples} must be >= 1 for a Monte-Carlo average")
    if sample_chunk < 1:
        raise ValueError(f"sample_chunk={sample_chunk} must be >= 1")

    def chunk_lse(idx):
        return tuple(jax.nn.logsumexp(t, axis=0) for t in jax.vmap(sample_fn)(idx)[:num_terms])

    parts = chunked_map(chunk_lse, jnp.arange(mc_samples), sample_chunk)  # each: terms of [nc, ...]
    return tuple(jax.nn.logsumexp(jnp.concatenate([p[i] for p in parts], axis=0), axis=0) - math.log(mc_samples)
                 for i in range(num_terms))


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


class _MCClassifier(nn.Module):
    """What HET and HET-XL share: ``logits = φ(x) W + b`` (params ``classifier``), an input-dependent
    low-rank Gaussian (``diag``, ``low_rank``, ``C`` in the PE form) over ``_noise_dim(x)``
    coordinates, a learned (bounded) temperature, and the MC average of ``p(u_s/τ)`` over
    ``mc_samples`` samples (``_predictive``). ``deterministic=True`` returns the DET predictive of
    the mean logits (no sampling)."""
    num_classes: int
    num_factors: int = 10
    mc_samples: int = 16
    param_efficient: bool = True
    kind: str = "softmax"
    temperature: TemperatureConfig = dataclasses.field(default_factory=_bounded_default)
    sample_chunk: int = 8
    init_scale: float = 0.1
    dtype: Any = jnp.float32

    def _noise_dim(self, x) -> int:
        raise NotImplementedError

    def _predictive(self, x, logits, dense, noise, scale, key, example_ids) -> dict:
        raise NotImplementedError

    @nn.compact
    def __call__(self, x, key=None, *, deterministic: bool = False, example_ids=None):
        _check_classifier(self.num_classes, self.kind)
        x = x.astype(jnp.float32)
        dense = Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="classifier")
        logits = dense(x)
        noise = low_rank_noise(self, x, self._noise_dim(x), self.num_factors, self.param_efficient,
                               self.init_scale, self.dtype)
        scale = Temperature(self.temperature, name="temperature")()
        if deterministic:
            return {**det_log_probs(logits, self.kind, scale), "logits": logits, "noise": noise}
        if key is None:
            raise ValueError(f"{type(self).__name__} needs a PRNG key unless deterministic=True")
        return {**self._predictive(x, logits, dense, noise, scale, key, example_ids), "logits": logits,
                "noise": noise}


class HetClassifier(_MCClassifier):
    """HET (2021): noise in logit space, ``K × R`` low rank (PE: ``diag(v) C``) + ``K`` diagonal."""

    def _noise_dim(self, x) -> int:
        return self.num_classes

    def _predictive(self, x, logits, dense, noise, scale, key, example_ids) -> dict:
        return het_log_probs(logits, noise, scale, key, self.mc_samples, self.kind, self.sample_chunk, example_ids)


class HetXLClassifier(_MCClassifier):
    """HET-XL (2023): noise on the ``D`` pre-logits (``D × R`` low rank + ``D`` diagonal), then the
    classifier ``W``. Extra parameters do not grow with ``K``."""

    def _noise_dim(self, x) -> int:
        return x.shape[-1]

    def _predictive(self, x, logits, dense, noise, scale, key, example_ids) -> dict:
        params = dense.variables["params"]
        return hetxl_log_probs(x, noise, params["kernel"], params["bias"], scale, key, self.mc_samples, self.kind,
                               self.sample_chunk, example_ids, self.dtype)
