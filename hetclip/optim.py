"""The optimizer of a run: AdamW with gradient clipping, a weight-decay mask (matrices only), per-group
learning-rate and weight-decay multipliers and frozen groups (``image``, ``text``, ``head``, ``temperature``), on a linear
warm-up followed by cosine, rsqrt or constant decay. Configured by the run config's ``optim`` and
``freeze`` sections (``hetclip.configs._base``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hetclip import config as config_lib


def make_schedule(o: ml_collections.ConfigDict, total_steps: int):
    """Linear warm-up from ``warmup_init_lr`` to ``lr``, then cosine (to ``end_lr``) or rsqrt decay."""
    warm = int(o.warmup_steps)
    if warm >= total_steps:
        raise config_lib.ConfigError(f"optim.warmup_steps={warm} must be smaller than total_steps={total_steps}")
    warmup = optax.linear_schedule(o.warmup_init_lr, o.lr, max(warm, 1))
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(o.lr, max(total_steps - warm, 1), alpha=o.end_lr / o.lr if o.lr else 0.0)
    elif o.schedule == "rsqrt":
        timescale = max(int(o.get("rsqrt_timescale", 10_000)), 1)

        def decay(step):
            return o.lr / jnp.sqrt(1.0 + step / timescale)
    elif o.schedule == "constant":
        decay = optax.constant_schedule(o.lr)
    else:
        raise config_lib.ConfigError(f"optim.schedule={o.schedule!r} is not one of 'cosine', 'rsqrt', 'constant'")
    return optax.join_schedules([warmup, decay], [warm]) if warm else decay


GROUPS = ("image", "text", "head", "temperature")


def param_group(path: tuple[str, ...]) -> str:
    top = path[0]
    if top in ("vision_model", "visual_projection"):
        return "image"
    if top in ("text_model", "text_projection"):
        return "text"
    if top == "temperature":
        return "temperature"
    return "head"  # het_head, logit_bias


def _path_names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def frozen_groups(cfg: ml_collections.ConfigDict) -> frozenset[str]:
    """The parameter groups ``cfg.freeze`` holds fixed (unknown names are a ``ConfigError``)."""
    freeze = dict(cfg.get("freeze", {}) or {})
    unknown = sorted(set(freeze) - set(GROUPS))
    if unknown:
        raise config_lib.ConfigError(f"freeze.{unknown[0]}: no such parameter group; groups are {list(GROUPS)}")
    return frozenset(g for g in GROUPS if freeze.get(g, False))


def stop_frozen(params, frozen: frozenset[str]):
    """``params`` with a stop-gradient on every leaf of a frozen group: their gradients are zeros that
    XLA never computes (a locked image tower costs no backward pass) and that do not count in the
    gradient norm the clipping uses."""
    if not frozen:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.stop_gradient(x) if param_group(_path_names(path)) in frozen else x, params)


def make_optimizer(cfg: ml_collections.ConfigDict, params, total_steps: int):
    """AdamW (paper defaults) with clipping, weight-decay mask, per-tower lr multipliers and freezing."""
    o = cfg.optim
    schedule = make_schedule(o, total_steps)
    frozen = frozen_groups(cfg)

    def label(path, x):
        g = param_group(_path_names(path))
        return "frozen" if g in frozen else g

    labels = jax.tree_util.tree_map_with_path(label, params)
    # Decay matrices only: not biases, LayerNorm, the class token, the temperature or SigLIP bias.
    decay_mask = jax.tree.map(lambda x: np.ndim(x) >= 2, params)
    transforms = {"frozen": optax.set_to_zero()}
    wd_mults = dict(o.get("wd_mults") or {})
    for g in GROUPS:
        mult = float(o.lr_mults.get(g, 1.0))
        transforms[g] = optax.adamw(lambda s, m=mult: schedule(s) * m, b1=o.b1, b2=o.b2, eps=o.eps,
                                    weight_decay=o.weight_decay * float(wd_mults.get(g, 1.0)), mask=decay_mask)
    chain = []
    if o.grad_clip and o.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain), schedule
