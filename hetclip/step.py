"""The training step: towers -> (HET-XL head) -> loss (sharded over the batch axes) -> optax, and its guard.

With ``accum_steps > 1`` the whole global batch stays the set of negatives: embeddings of every
micro-batch are computed first (no gradients), the loss and its gradient with respect to those
embeddings are taken over the whole batch, then each micro-batch is re-encoded and back-propagated
with its slice of that gradient. The result equals the single-pass gradient.

The guard keeps, on the device, the first step whose loss, gradient norm, parameter norm or temperature
is not finite; the loop reads it (a few bytes) only when it logs, evaluates or saves.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from hetclip import distributed as dist
from hetclip import losses
from hetclip.model import DualEncoder, ModelConfig, loss_embeddings, normalize_images
from hetclip.optim import stop_frozen


class TrainingError(RuntimeError):
    """A run that cannot go on; the message names the step and the quantity."""


def _micro_split(x, accum: int, n_shards: int):
    """``[B, ...]`` -> ``[A, B/A, ...]`` where micro-batch ``a`` takes rows from every device."""
    b = x.shape[0]
    m = b // (n_shards * accum)
    y = x.reshape((n_shards, accum, m) + x.shape[1:])
    return jnp.swapaxes(y, 0, 1).reshape((accum, n_shards * m) + x.shape[1:])


def _micro_merge(y, n_shards: int):
    """Inverse of ``_micro_split``: ``[A, B/A, ...]`` -> ``[B, ...]`` in the original row order."""
    accum, bm = y.shape[:2]
    m = bm // n_shards
    z = y.reshape((accum, n_shards, m) + y.shape[2:])
    return jnp.swapaxes(z, 0, 1).reshape((accum * bm,) + y.shape[2:])


def make_train_step(model_cfg: ModelConfig, optimizer, mesh, accum_steps: int = 1, frozen: frozenset = frozenset()):
    """``step(state, batch, key) -> (state, metrics)``; ``state = {"params", "opt_state", "step"}``.
    ``frozen``: parameter groups (``optim.GROUPS``) that get no gradient (``optim.stop_frozen``)."""
    model = DualEncoder(model_cfg)
    loss_of = losses.for_model(model_cfg, mesh, dist.BATCH_AXES)
    n_shards = mesh.devices.size

    def encode(p, batch):  # every gradient path goes through these two, so frozen groups get none
        return loss_embeddings(model, stop_frozen(p, frozen), batch)

    def loss_fn(p, emb, key):
        shared = model.apply({"params": stop_frozen(p, frozen)}, method=DualEncoder.loss_inputs)
        return loss_of(emb, shared, key)

    batch_sharding = NamedSharding(mesh, P(dist.BATCH_AXES))
    micro_sharding = NamedSharding(mesh, P(None, dist.BATCH_AXES))

    def grads_single(params, batch, key):
        def total(p):
            return loss_fn(p, encode(p, batch), key)

        (value, aux), grads = jax.value_and_grad(total, has_aux=True)(params)
        return value, aux, grads

    def grads_accumulated(params, batch, key):
        micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            _micro_split(x, accum_steps, n_shards), micro_sharding), batch)
        frozen_params = jax.lax.stop_gradient(params)
        # Pass 1: embeddings of every micro-batch, no gradients kept.
        emb_micro = jax.lax.map(lambda mb: loss_embeddings(model, frozen_params, mb), micro)
        emb = jax.tree.map(lambda y: jax.lax.with_sharding_constraint(_micro_merge(y, n_shards), batch_sharding),
                           emb_micro)
        # The loss over the whole batch, its gradient wrt the embeddings and the head's shared params.
        (value, aux), (g_params, g_emb) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, emb, key)
        g_emb_micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            _micro_split(x, accum_steps, n_shards), micro_sharding), g_emb)

        # Pass 2: re-encode each micro-batch and back-propagate its slice of the embedding gradient.
        def body(acc, inputs):
            mb, g = inputs
            _, vjp = jax.vjp(lambda p: encode(p, mb), params)
            (gp,) = vjp(g)
            return jax.tree.map(jnp.add, acc, gp), None

        g_towers, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), (micro, g_emb_micro))
        return value, aux, jax.tree.map(jnp.add, g_params, g_towers)

    compute = grads_single if accum_steps == 1 else grads_accumulated

    def step(state, batch, key):
        if "image" in batch:
            batch = dict(batch, image=normalize_images(batch["image"]))
        value, aux, grads = compute(state["params"], batch, key)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(aux, loss=value, grad_norm=grad_norm, param_norm=optax.tree.norm(params))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


GUARDED = ("loss", "grad_norm", "param_norm", "temperature")


def new_guard() -> dict:
    """Device-side record of the first non-finite step: ``step`` 0 = none yet, and its ``GUARDED`` values."""
    return {"step": jnp.zeros((), jnp.int32), "values": jnp.zeros((len(GUARDED),), jnp.float32)}


def guarded(step_fn):
    """``step(state, batch, key)`` -> ``step(state, guard, batch, key) -> (state, guard, metrics)``.

    The guard keeps the first step whose loss, gradient norm or parameter norm is not finite, so the
    loop needs to read it (a few bytes) only when it logs, evaluates or saves.
    """
    def step(state, guard, batch, key):
        new_state, metrics = step_fn(state, batch, key)
        values = jnp.stack([jnp.asarray(metrics.get(k, 0.0), jnp.float32) for k in GUARDED])
        first = (guard["step"] == 0) & ~jnp.all(jnp.isfinite(values))
        guard = {"step": jnp.where(first, new_state["step"], guard["step"]),
                 "values": jnp.where(first, values, guard["values"])}
        return new_state, guard, metrics

    return step


def check_guard(guard: dict) -> None:
    """Raise ``TrainingError`` naming the first non-finite step and value of a read (host) guard."""
    step = int(guard["step"])
    if step == 0:
        return
    values = dict(zip(GUARDED, (float(v) for v in guard["values"])))
    name = next(k for k in GUARDED if not math.isfinite(values[k]))
    raise TrainingError(f"non-finite {name} ({values[name]}) at step {step}; stopping without saving this state. "
                        "The last good checkpoint is untouched; lower the learning rate or check the data")
