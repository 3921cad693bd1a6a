"""Contrastive losses: DET (CLIP softmax), HET-XL (Monte-Carlo softmax), SigLIP (sigmoid).

Every loss takes **unnormalised** image (mean) and text embeddings, normalises them inside, uses
``scale = 1/τ`` (a differentiable scalar) and returns ``(loss, aux)`` with ``aux`` a dict of scalars.

Two implementations of each:

* ``*_naive``: one device, materialises every logit (``[N, N]``, or ``[N, S, N]`` for HET-XL). Simple
  references for the tests.
* the chunked versions (``clip_loss``, ``hetxl_loss``, ``siglip_loss``): loop over sample chunks and
  class (text) chunks (``hetclip.chunks.chunked_map``: ``jax.lax.map``, ``jax.checkpoint`` on each chunk), so the backward
  pass recomputes chunk logits instead of storing them (a loop with a single chunk is not
  checkpointed: it stores its logits like the naive loss and skips the recomputation); per-chunk logsumexps are combined with
  max-shifted logsumexps. With ``axis_name`` (inside ``shard_map``) each device holds its local
  batch; normalised texts are all-gathered (``[N, D]``); image→text rows are local; the
  text→image logsumexp over all images combines per-device partial logsumexps (``[S_c, N]`` per
  chunk) with ``pmax`` (of a stop-gradient max) and ``psum_scatter`` of shifted exps, so each device
  receives the columns of its own texts. Each device sums the loss terms of its own rows (i2t) and
  its own columns (t2i); the total is ``psum``-ed and divided by the global batch ``N``.

HET-XL (docs/DESIGN.md §6): ``z_is = μ_i + V(h_i) e_is + d(h_i) ⊙ e'_is``, ``ẑ_is = z_is / ‖z_is‖``,
``l[i,s,j] = scale · ẑ_is·t̂_j``,
``L_i2t = −mean_i[logsumexp_s(l[i,s,i] − logsumexp_j l[i,s,j]) − log S]``,
``L_t2i = −mean_j[logsumexp_s(l[j,s,j] − logsumexp_i l[i,s,j]) − log S]``, ``L = (L_i2t + L_t2i)/2``.
Noise for sample ``s`` of global example ``g`` comes from ``hetclip.noise`` keyed by ``(key, s, g)``,
so naive, chunked, 1-device and N-device results agree.

Chunk sizes need not divide ``S`` or ``N``: the remainder is one extra, smaller chunk. A chunk size
larger than ``S`` (``N``) means a single chunk.
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from hetclip import noise as noise_lib
from hetclip.chunks import chunked_map
from hetclip.towers import compute_dtype

AxisName = Union[str, Sequence[str], None]
Aux = dict


# ---------------------------------------------------------------------------------------------
# input checks (static shapes, before anything heavy is traced)


def _shape(x) -> tuple:
    return tuple(jnp.shape(x))


def _check_scalar(name: str, x) -> None:
    if _shape(x) != ():
        raise ValueError(f"{name} must be a scalar, got shape {_shape(x)}")


def _check_pair(img, txt, img_name: str = "img") -> None:
    for name, x in ((img_name, img), ("txt", txt)):
        if jnp.ndim(x) != 2:
            raise ValueError(f"{name} must have shape [B, D] (rank 2), got shape {_shape(x)}")
    if img.shape[0] != txt.shape[0]:
        raise ValueError(f"batch sizes differ: {img_name} has {img.shape[0]} rows, txt has {txt.shape[0]}; "
                         "contrastive losses need one text per image")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"embedding widths differ: {img_name} has D={img.shape[1]}, txt has D={txt.shape[1]}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"empty embeddings: {img_name} shape {_shape(img)}")


def _check_noise(noise, batch: int, dim: int) -> None:
    if not isinstance(noise, Mapping):
        raise ValueError(f"noise must be a dict of arrays, got {type(noise).__name__}")
    keys = set(noise)
    if keys == {"d", "v", "C"}:
        expected = {"d": (batch, dim), "v": (batch, dim)}
        c_shape = _shape(noise["C"])
        if len(c_shape) != 2 or c_shape[0] != dim or c_shape[1] < 1:
            raise ValueError(f"noise['C'] must have shape [D={dim}, R], got {c_shape}")
    elif keys == {"d", "V"}:
        expected = {"d": (batch, dim)}
        v_shape = _shape(noise["V"])
        if len(v_shape) != 3 or v_shape[:2] != (batch, dim) or v_shape[2] < 1:
            raise ValueError(f"noise['V'] must have shape [B={batch}, D={dim}, R], got {v_shape}")
    else:
        raise ValueError("noise must have keys {'d', 'v', 'C'} (parameter-efficient form) or {'d', 'V'} "
                         f"(full form), got {sorted(keys)}")
    for k, shape in expected.items():
        if _shape(noise[k]) != shape:
            raise ValueError(f"noise[{k!r}] must have shape [B, D] = {list(shape)}, got {list(_shape(noise[k]))}")


def _check_count(name: str, value, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer" + (" or None" if allow_none else ""))


# ---------------------------------------------------------------------------------------------
# building blocks


def _dot(a, b, spec: str, matmul_dtype):
    """``einsum`` with fp32 accumulation; ``matmul_dtype`` (e.g. bf16) casts the operands first."""
    if matmul_dtype is not None:
        a, b = a.astype(matmul_dtype), b.astype(matmul_dtype)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _gather(x, axis_name: AxisName):
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _psum(x, axis_name: AxisName):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _offset(batch_local: int, axis_name: AxisName):
    """Global index of this device's first example."""
    return 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch_local


def _local_column_lse(part, offset, batch_local: int, axis_name: AxisName):
    """Combine per-device partial logsumexps ``part [S_c, N]`` over devices; return this device's
    columns ``[S_c, B_l]``. The max is a stop-gradient shift, so the gradient is the exact softmax."""
    if axis_name is None:
        return part
    m = jax.lax.pmax(jax.lax.stop_gradient(part), axis_name)
    total = jax.lax.psum_scatter(jnp.exp(part - m), axis_name, scatter_dimension=1, tiled=True)
    m_local = jax.lax.dynamic_slice_in_dim(m, offset, batch_local, axis=1)
    return m_local + jnp.log(total)


def _class_pass(zs, t_all, class_chunk: Optional[int], matmul_dtype):
    """For scaled normalised image samples ``zs [S_c, B_l, D]`` and all texts ``t_all [N, D]``:
    ``row_lse [S_c, B_l]`` (logsumexp over all N texts) and ``col_part [S_c, N]`` (logsumexp over the
    local images), computed ``class_chunk`` texts at a time."""

    def block(t_c):
        x = _dot(zs, t_c, "sbd,cd->sbc", matmul_dtype)
        return jax.nn.logsumexp(x, axis=2), jax.nn.logsumexp(x, axis=1)

    parts = chunked_map(block, t_all, class_chunk)  # each ([nc, S_c, B_l], [nc, S_c, C])
    rows = jnp.concatenate([r for r, _ in parts], axis=0)
    cols = jnp.concatenate([jnp.moveaxis(c, 0, 1).reshape(c.shape[1], -1) for _, c in parts], axis=1)
    return jax.nn.logsumexp(rows, axis=0), cols


ESTIMATORS = ("mc", "jackknife")


def log_mean_estimate(log_p, estimator: str = "mc"):
    """``log (1/S) Σ_s p_s`` over axis 0 of ``log_p [S, ...]``: the MC estimate of ``log E[p]``.

    ``"mc"``: that estimate; by Jensen's inequality it lies below ``log E[p]`` on average, by about
    ``Var(p) / (2 S E[p]²)``, so its loss ``−log`` charges the noise a penalty that fades only as ``1/S``.
    ``"jackknife"``: ``S·L_S − (S−1)·mean_k L_(k)`` with ``L_(k)`` the estimate without sample ``k``, which
    cancels the ``1/S`` term of the bias (the rest is ``O(1/S²)``); needs ``S ≥ 2``."""
    s = log_p.shape[0]
    full = jax.nn.logsumexp(log_p, axis=0) - math.log(s)
    if estimator == "mc":
        return full
    if estimator != "jackknife":
        raise ValueError(f"estimator={estimator!r} is not one of {ESTIMATORS}")
    if s < 2:
        raise ValueError(f"the jackknife estimator needs mc_samples >= 2, got {s}")
    lse = full + math.log(s)
    # leave-one-out logsumexp: lse + log(1 − p_k / Σ p); the share is kept below 1 so it stays finite
    share = jnp.minimum(jnp.exp(log_p - lse), 1.0 - 1e-6)
    loo = lse + jnp.log1p(-share) - math.log(s - 1)
    return s * full - (s - 1) * jnp.mean(loo, axis=0)


def _mc_softmax_terms(sample_fn: Callable, mc_samples: int, t_loc_n, scale, *, sample_chunk, class_chunk,
                      axis_name: AxisName, matmul_dtype, estimator: str = "mc"):
    """Local sums of the i2t and t2i terms of the MC-softmax contrastive loss.

    ``sample_fn(sample_indices [S_c]) -> [S_c, B_l, D]`` normalised image samples for this device.
    Returns ``(sum_i2t, sum_t2i)`` over this device's rows / columns (not yet psum-ed or averaged).
    """
    b_local = t_loc_n.shape[0]
    t_all = _gather(t_loc_n, axis_name)
    offset = _offset(b_local, axis_name)

    def body(s_idx):
        zs = sample_fn(s_idx) * scale
        pos = _dot(zs, t_loc_n, "sbd,bd->sb", matmul_dtype)  # l[i, s, i]
        row_lse, col_part = _class_pass(zs, t_all, class_chunk, matmul_dtype)
        col_lse = _local_column_lse(col_part, offset, b_local, axis_name)
        return pos - row_lse, pos - col_lse  # log p_s(text i | image i), log p_s(image j | text j)

    parts = chunked_map(body, jnp.arange(mc_samples), sample_chunk)  # each ([nc, S_c, B_l], [nc, S_c, B_l])
    log_p_i2t = jnp.concatenate([p[0].reshape((-1, b_local)) for p in parts], axis=0)  # [S, B_l]
    log_p_t2i = jnp.concatenate([p[1].reshape((-1, b_local)) for p in parts], axis=0)
    i2t = -log_mean_estimate(log_p_i2t, estimator)
    t2i = -log_mean_estimate(log_p_t2i, estimator)
    return jnp.sum(i2t), jnp.sum(t2i)


def _top1_counts(img_n, t_loc_n, class_chunk: Optional[int], axis_name: AxisName, matmul_dtype):
    """Number of this device's images whose top-1 text is its own (i2t) and of its texts whose
    top-1 image is its own (t2i), with ``jnp.argmax`` tie-breaking (first index), chunked over texts."""
    img_n, t_loc_n = jax.lax.stop_gradient(img_n), jax.lax.stop_gradient(t_loc_n)
    b_local = img_n.shape[0]
    t_all = _gather(t_loc_n, axis_name)
    n = t_all.shape[0]
    offset = _offset(b_local, axis_name)
    own = offset + jnp.arange(b_local)

    def block(args):
        t_c, ids = args  # a chunk of texts and their global indices
        x = _dot(img_n, t_c, "bd,cd->bc", matmul_dtype)
        return (jnp.max(x, axis=1), jnp.argmax(x, axis=1) + ids[0],
                jnp.max(x, axis=0), jnp.argmax(x, axis=0) + offset)

    results = chunked_map(block, (t_all, jnp.arange(n)), class_chunk, remat=False)
    row_max = jnp.concatenate([r[0] for r in results], axis=0)  # [nc, B_l]
    row_arg = jnp.concatenate([r[1] for r in results], axis=0)
    best = jnp.argmax(row_max, axis=0)  # first chunk holding the maximum
    row_top = jnp.take_along_axis(row_arg, best[None], axis=0)[0]
    col_max = jnp.concatenate([r[2].reshape(-1) for r in results])  # [N]
    col_arg = jnp.concatenate([r[3].reshape(-1) for r in results])
    if axis_name is not None:
        g_max = jax.lax.pmax(col_max, axis_name)
        col_arg = jax.lax.pmin(jnp.where(col_max == g_max, col_arg, n), axis_name)
    col_top = jax.lax.dynamic_slice_in_dim(col_arg, offset, b_local)
    return (jnp.sum(row_top == own).astype(jnp.float32), jnp.sum(col_top == own).astype(jnp.float32))


def _finish(sum_i2t, sum_t2i, img_n, t_loc_n, n_global: int, scale, *, class_chunk, axis_name, matmul_dtype):
    acc_i2t, acc_t2i = _top1_counts(img_n, t_loc_n, class_chunk, axis_name, matmul_dtype)
    sums = _psum(jnp.stack([sum_i2t, sum_t2i, acc_i2t, acc_t2i]), axis_name) / n_global
    loss = (sums[0] + sums[1]) / 2
    aux = {"loss_i2t": sums[0], "loss_t2i": sums[1], "acc_i2t": sums[2], "acc_t2i": sums[3],
           "logit_scale": jnp.asarray(scale, jnp.float32)}
    return loss, aux


def _axis_size(axis_name: AxisName) -> int:
    if axis_name is None:
        return 1
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    return math.prod(jax.lax.axis_size(a) for a in names)


# ---------------------------------------------------------------------------------------------
# chunked (and data-parallel) losses


def clip_loss(img, txt, scale, *, axis_name: AxisName = None, class_chunk: Optional[int] = None,
              matmul_dtype=None) -> tuple[jax.Array, Aux]:
    """CLIP (DET) symmetric softmax contrastive loss. ``img``/``txt`` ``[B, D]`` (local batch under
    ``axis_name``), ``scale = 1/τ``. The HET-XL machinery with ``S = 1`` and no noise."""
    _check_pair(img, txt)
    _check_scalar("scale", scale)
    _check_count("class_chunk", class_chunk, allow_none=True)
    scale = jnp.asarray(scale, jnp.float32)
    img_n, t_loc_n = noise_lib.l2_normalize(img), noise_lib.l2_normalize(txt)
    n_global = img.shape[0] * _axis_size(axis_name)
    s_i2t, s_t2i = _mc_softmax_terms(
        lambda s_idx: jnp.broadcast_to(img_n, (s_idx.shape[0],) + img_n.shape), 1, t_loc_n, scale,
        sample_chunk=None, class_chunk=class_chunk, axis_name=axis_name, matmul_dtype=matmul_dtype)
    return _finish(s_i2t, s_t2i, img_n, t_loc_n, n_global, scale, class_chunk=class_chunk,
                   axis_name=axis_name, matmul_dtype=matmul_dtype)


def hetxl_loss(mean, noise, txt, scale, key, *, mc_samples: int, sample_chunk: Optional[int] = None,
               class_chunk: Optional[int] = None, axis_name: AxisName = None,
               matmul_dtype=None, estimator: str = "mc") -> tuple[jax.Array, Aux]:
    """Contrastive HET-XL MC-softmax loss (docs/DESIGN.md §6, §7), chunked over samples and classes.

    ``mean [B, D]`` unnormalised image means, ``noise`` the head's noise dict (``hetclip.noise``),
    ``txt [B, D]``, ``scale = 1/τ``, ``key`` the noise PRNG key (same on every device).
    ``sample_chunk``/``class_chunk``: samples/texts per chunk (``None``: all at once). ``estimator``: how
    ``log E[softmax]`` is estimated from the samples (``log_mean_estimate``).
    """
    _check_pair(mean, txt, "mean")
    _check_noise(noise, mean.shape[0], mean.shape[1])
    _check_scalar("scale", scale)
    _check_count("mc_samples", mc_samples, allow_none=False)
    _check_count("sample_chunk", sample_chunk, allow_none=True)
    _check_count("class_chunk", class_chunk, allow_none=True)
    scale = jnp.asarray(scale, jnp.float32)
    b_local = mean.shape[0]
    ids = _offset(b_local, axis_name) + jnp.arange(b_local)
    mean32 = mean.astype(jnp.float32)
    noise32 = jax.tree.map(lambda a: a.astype(jnp.float32), dict(noise))
    t_loc_n = noise_lib.l2_normalize(txt)

    def sample_fn(s_idx):
        return jax.vmap(lambda s: noise_lib.noisy_sample(mean32, noise32, key, s, ids))(s_idx)

    s_i2t, s_t2i = _mc_softmax_terms(sample_fn, mc_samples, t_loc_n, scale, sample_chunk=sample_chunk,
                                     class_chunk=class_chunk, axis_name=axis_name, matmul_dtype=matmul_dtype,
                                     estimator=estimator)
    n_global = b_local * _axis_size(axis_name)
    loss, aux = _finish(s_i2t, s_t2i, noise_lib.l2_normalize(mean32), t_loc_n, n_global, scale,
                        class_chunk=class_chunk, axis_name=axis_name, matmul_dtype=matmul_dtype)
    aux.update(noise_lib.size_stats(jax.lax.stop_gradient(mean32), jax.lax.stop_gradient(noise32), axis_name))
    return loss, aux


def siglip_loss(img, txt, scale, bias, *, axis_name: AxisName = None, class_chunk: Optional[int] = None,
                matmul_dtype=None) -> tuple[jax.Array, Aux]:
    """SigLIP (Zhai et al. 2023): ``−(1/N) Σ_i Σ_j log σ(z_ij (scale·x̂_i·ŷ_j + bias))``, ``z = +1`` on the
    diagonal and ``−1`` elsewhere. Uses ``log σ(l) − log σ(−l) = l``: each row is
    ``Σ_j log σ(−l_ij) + l_ii``, so the chunks need no label masks."""
    _check_pair(img, txt)
    _check_scalar("scale", scale)
    _check_scalar("bias", bias)
    _check_count("class_chunk", class_chunk, allow_none=True)
    scale = jnp.asarray(scale, jnp.float32)
    bias = jnp.asarray(bias, jnp.float32)
    img_n, t_loc_n = noise_lib.l2_normalize(img), noise_lib.l2_normalize(txt)
    t_all = _gather(t_loc_n, axis_name)
    xs = img_n * scale

    def block(t_c):
        return jnp.sum(jax.nn.log_sigmoid(-(_dot(xs, t_c, "bd,cd->bc", matmul_dtype) + bias)), axis=1)

    neg = sum(jnp.sum(p, axis=0) for p in chunked_map(block, t_all, class_chunk))  # [B_l]
    pos = _dot(xs, t_loc_n, "bd,bd->b", matmul_dtype) + bias
    n_global = img.shape[0] * _axis_size(axis_name)
    acc_i2t, acc_t2i = _top1_counts(img_n, t_loc_n, class_chunk, axis_name, matmul_dtype)
    sums = _psum(jnp.stack([-jnp.sum(neg + pos), jnp.sum(pos), acc_i2t, acc_t2i]), axis_name) / n_global
    aux = {"loss": sums[0], "pos_logit": sums[1], "acc_i2t": sums[2], "acc_t2i": sums[3],
           "logit_scale": scale, "logit_bias": bias}
    return sums[0], aux


# ---------------------------------------------------------------------------------------------
# naive references (one device, everything materialised)


def _naive_acc(sims):
    ids = jnp.arange(sims.shape[0])
    return (jnp.mean(jnp.argmax(sims, axis=1) == ids).astype(jnp.float32),
            jnp.mean(jnp.argmax(sims, axis=0) == ids).astype(jnp.float32))


def clip_loss_naive(img, txt, scale) -> tuple[jax.Array, Aux]:
    """Reference CLIP loss with the full ``[N, N]`` logits."""
    _check_pair(img, txt)
    _check_scalar("scale", scale)
    x, t = noise_lib.l2_normalize(img), noise_lib.l2_normalize(txt)
    sims = x @ t.T
    logits = jnp.asarray(scale, jnp.float32) * sims
    i2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    t2i = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    acc_i2t, acc_t2i = _naive_acc(sims)
    return (i2t + t2i) / 2, {"loss_i2t": i2t, "loss_t2i": t2i, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i,
                             "logit_scale": jnp.asarray(scale, jnp.float32)}


def hetxl_loss_naive(mean, noise, txt, scale, key, *, mc_samples: int, estimator: str = "mc"
                     ) -> tuple[jax.Array, Aux]:
    """Reference HET-XL loss with the full ``[N, S, N]`` logits."""
    _check_pair(mean, txt, "mean")
    _check_noise(noise, mean.shape[0], mean.shape[1])
    _check_scalar("scale", scale)
    _check_count("mc_samples", mc_samples, allow_none=False)
    n = mean.shape[0]
    z = noise_lib.sample_embeddings(mean.astype(jnp.float32), noise, key, mc_samples)  # [N, S, D]
    t = noise_lib.l2_normalize(txt)
    logits = jnp.asarray(scale, jnp.float32) * jnp.einsum("isd,jd->isj", z, t)  # [N, S, N]
    ids = jnp.arange(n)
    log_p_i2t = jax.nn.log_softmax(logits, axis=2)[ids, :, ids]  # [N, S]: image i, its text i
    log_p_t2i = jax.nn.log_softmax(logits, axis=0)[ids, :, ids]  # [N, S]: text j, its image j
    i2t = -jnp.mean(log_mean_estimate(log_p_i2t.T, estimator))
    t2i = -jnp.mean(log_mean_estimate(log_p_t2i.T, estimator))
    acc_i2t, acc_t2i = _naive_acc(noise_lib.l2_normalize(mean) @ t.T)
    aux = {"loss_i2t": i2t, "loss_t2i": t2i, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i,
           "logit_scale": jnp.asarray(scale, jnp.float32)}
    aux.update(noise_lib.size_stats(mean, noise))
    return (i2t + t2i) / 2, aux


def siglip_loss_naive(img, txt, scale, bias) -> tuple[jax.Array, Aux]:
    """Reference SigLIP loss with the full ``[N, N]`` logits and an explicit ±1 label matrix."""
    _check_pair(img, txt)
    _check_scalar("scale", scale)
    _check_scalar("bias", bias)
    x, t = noise_lib.l2_normalize(img), noise_lib.l2_normalize(txt)
    sims = x @ t.T
    logits = jnp.asarray(scale, jnp.float32) * sims + bias
    labels = 2.0 * jnp.eye(x.shape[0]) - 1.0
    loss = -jnp.mean(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=1))
    acc_i2t, acc_t2i = _naive_acc(sims)
    return loss, {"loss": loss, "pos_logit": jnp.mean(jnp.diagonal(logits)), "acc_i2t": acc_i2t,
                  "acc_t2i": acc_t2i, "logit_scale": jnp.asarray(scale, jnp.float32),
                  "logit_bias": jnp.asarray(bias, jnp.float32)}


# ---------------------------------------------------------------------------------------------
# shard_map wrapper


def _specs(loss_fn, axis, args):
    batch = P(axis)
    if loss_fn is clip_loss:
        return (batch, batch, P())
    if loss_fn is siglip_loss:
        return (batch, batch, P(), P())
    if loss_fn is hetxl_loss:
        noise = args[1]
        if not isinstance(noise, Mapping):
            raise ValueError(f"noise must be a dict of arrays, got {type(noise).__name__}")
        return (batch, {k: (P() if k == "C" else batch) for k in noise}, batch, P(), P())
    raise ValueError(f"sharded() supports clip_loss, hetxl_loss and siglip_loss, got {loss_fn!r}")


_NUM_ARGS = {clip_loss: 3, siglip_loss: 4, hetxl_loss: 5}


def sharded(loss_fn: Callable, mesh: jax.sharding.Mesh, axis: AxisName = "data", **static_kwargs) -> Callable:
    """Wrap a chunked loss in ``jax.shard_map`` over the batch axis (or axes) ``axis`` of ``mesh``.

    The returned function takes the loss's positional arguments with **global** batches (sharded or
    not; under ``jax.jit`` they are resharded as needed): embeddings and per-example noise are split
    over ``axis`` along the batch dimension; ``C``, ``scale``, ``bias`` and ``key`` are replicated.
    It returns the replicated ``(loss, aux)``. ``static_kwargs`` go to the loss
    (``mc_samples=...``, ``class_chunk=...``, ...); ``axis_name`` is set here.
    """
    if loss_fn not in _NUM_ARGS:
        raise ValueError(f"sharded() supports clip_loss, hetxl_loss and siglip_loss, got {loss_fn!r}")
    if "axis_name" in static_kwargs:
        raise ValueError("sharded() sets axis_name itself (from `axis`); do not pass it")
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    missing = [a for a in axes if a not in mesh.axis_names]
    if not axes or missing:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh (axes {mesh.axis_names})")
    n_dev = math.prod(mesh.shape[a] for a in axes)
    axis_spec = axes[0] if len(axes) == 1 else axes
    fn = functools.partial(loss_fn, axis_name=axis_spec, **static_kwargs)
    explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))

    def wrapped(*args):
        if len(args) != _NUM_ARGS[loss_fn]:
            raise ValueError(f"{loss_fn.__name__} takes {_NUM_ARGS[loss_fn]} positional arguments, got {len(args)}")
        # global-shape checks first, so errors name the global batch
        if loss_fn is hetxl_loss:
            _check_pair(args[0], args[2], "mean")
            _check_noise(args[1], args[0].shape[0], args[0].shape[1])
        else:
            _check_pair(args[0], args[1])
        batch = args[0].shape[0]
        if batch % n_dev:
            raise ValueError(f"global batch {batch} is not divisible by the {n_dev} devices of mesh axis "
                             f"{axis!r}; use a multiple of {n_dev}")
        specs = _specs(loss_fn, axis_spec, args)
        if explicit:
            args = jax.tree.map(lambda a, s: jax.reshard(a, NamedSharding(mesh, s)), args, specs,
                                is_leaf=lambda x: isinstance(x, P))
        # check_vma=False: the losses place their collectives themselves (psum of per-device sums,
        # psum_scatter of column logsumexps); their gradients are checked against the naive losses so.
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(*args)

    return wrapped


# The model's loss kinds (``ModelConfig.loss``). A HET-XL head with ``mc_samples > 0`` makes ``softmax`` the
# Monte-Carlo softmax over its samples; it is not a separate kind.
LOSS_KINDS = ("softmax", "sigmoid")


def make_loss(kind: str, mesh: jax.sharding.Mesh, axis: AxisName = "data", *, mc_samples: int = 0,
              sample_chunk: Optional[int] = None, class_chunk: Optional[int] = None,
              matmul_dtype=None, estimator: str = "mc") -> Callable:
    """The training loss ``loss(emb, shared, key) -> (loss, aux)`` over the global batch, sharded over
    ``axis`` of ``mesh`` (``sharded``).

    ``kind``: ``softmax`` (CLIP; with ``mc_samples > 0`` the HET-XL MC softmax over that many samples) or
    ``sigmoid`` (SigLIP). ``emb``: per-example ``{"mean", "txt"}`` and, with samples, ``"noise"`` (``d``,
    ``v`` or ``V``); ``shared``: ``{"scale"}`` plus ``"bias"`` (sigmoid) and ``"C"`` (parameter-efficient
    HET-XL). ``aux`` gains ``temperature`` (and ``logit_bias``).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; one of {LOSS_KINDS}")
    if mc_samples < 0 or (mc_samples and kind != "softmax"):
        raise ValueError(f"mc_samples={mc_samples}: Monte-Carlo samples need kind='softmax' and a count >= 0")
    chunks = dict(class_chunk=class_chunk, matmul_dtype=matmul_dtype)
    if mc_samples:
        fn = sharded(hetxl_loss, mesh, axis, mc_samples=mc_samples, sample_chunk=sample_chunk,
                     estimator=estimator, **chunks)

        def args(emb, shared, key):
            noise = dict(emb["noise"], **({"C": shared["C"]} if shared.get("C") is not None else {}))
            return emb["mean"], noise, emb["txt"], shared["scale"], key
    elif kind == "sigmoid":
        fn = sharded(siglip_loss, mesh, axis, **chunks)

        def args(emb, shared, key):
            return emb["mean"], emb["txt"], shared["scale"], shared["bias"]
    else:
        fn = sharded(clip_loss, mesh, axis, **chunks)

        def args(emb, shared, key):
            return emb["mean"], emb["txt"], shared["scale"]

    def loss(emb, shared, key):
        value, aux = fn(*args(emb, shared, key))
        aux = dict(aux, temperature=1.0 / shared["scale"])
        if "bias" in shared:
            aux["logit_bias"] = shared["bias"]
        return value, aux

    return loss


def for_model(model_cfg, mesh: jax.sharding.Mesh, axis: AxisName = ("data", "fsdp")) -> Callable:
    """``loss(emb, shared, key)`` of a ``hetclip.model.ModelConfig``, from that config alone: its loss kind,
    the HET-XL head's samples, chunks and estimator (samples only when the head is on with
    ``mc_samples > 0``), and bf16 x bf16 -> fp32 logits matmuls for a bf16 model (logsumexps stay fp32).
    ``shared`` is ``DualEncoder.loss_inputs``."""
    het = model_cfg.het
    samples = het.mc_samples if het.enabled and model_cfg.loss == "softmax" else 0
    mm = jnp.bfloat16 if compute_dtype(model_cfg.dtype) == jnp.bfloat16 else None
    return make_loss(model_cfg.loss, mesh, axis, mc_samples=samples, sample_chunk=het.sample_chunk,
                     class_chunk=het.class_chunk, matmul_dtype=mm, estimator=het.estimator)
