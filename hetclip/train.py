"""``hetclip-train``: contrastive pretraining on a device mesh, from a config, resumable.

    hetclip-train --config demo --workdir runs/demo [--config.batch_size=256 ...]

The step: towers -> (HET-XL head) -> loss (under ``shard_map`` over the batch axes) -> optax.
With ``accum_steps > 1`` the whole global batch stays the set of negatives: embeddings of every
micro-batch are computed first (no gradients), the loss and its gradient with respect to those
embeddings are taken over the whole batch, then each micro-batch is re-encoded and back-propagated
with its slice of that gradient. The result equals the single-pass gradient.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from hetclip import checkpoint as ckpt_lib
from hetclip import config as config_lib
from hetclip import distributed as dist
from hetclip import losses
from hetclip import runlog
from hetclip import workdir as workdir_lib
from hetclip.data.decode import CLIP_MEAN, CLIP_STD
from hetclip.data.loader import TooManyBadSamples
from hetclip.data.workers import DataWorkerError
from hetclip.prefetch import DevicePrefetcher
from hetclip.model import DualEncoder, ModelConfig, abstract_params, init_params, normalize_images
from hetclip.optim import GROUPS, frozen_groups, make_optimizer, make_schedule, param_group, stop_frozen
from hetclip.towers import compute_dtype

log = logging.getLogger("hetclip.train")



class TrainingError(RuntimeError):
    """A run that cannot go on; the message names the step and the quantity."""


# --------------------------------------------------------------------------------------------
# Model config from the run config (+ tokenizer)


def model_config(cfg: ml_collections.ConfigDict, tokenizer=None) -> ModelConfig:
    """The ``ModelConfig`` of a run; vocabulary, end-of-text id and context come from the tokenizer."""
    d = cfg.model.to_dict()
    if tokenizer is not None:
        text = dict(d["text"])
        if cfg.get("model_from_tokenizer", True):
            text.update(vocab_size=int(tokenizer.vocab_size), eos_token_id=int(tokenizer.eos_token_id),
                        context_length=int(tokenizer.context_length))
        else:
            for key, want in (("vocab_size", tokenizer.vocab_size), ("eos_token_id", tokenizer.eos_token_id),
                              ("context_length", tokenizer.context_length)):
                if text[key] != want:
                    raise config_lib.ConfigError(
                        f"config model.text.{key}={text[key]} disagrees with the tokenizer ({want}); "
                        "set model_from_tokenizer=True or fix the config")
        d["text"] = text
    try:
        return ModelConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(f"config 'model': {e}") from None


# --------------------------------------------------------------------------------------------
# Loss on embeddings


def embed(model: DualEncoder, params, batch):
    """Per-example outputs of both towers: ``{"mean", "txt"}`` and, with the HET-XL head, ``"noise"`` (its
    per-example part ``d``, ``v`` or ``V``; the shared ``C`` is a parameter the loss reads itself).
    A batch with ``"features"`` (the image tower's pooled output, computed once for a locked tower)
    instead of ``"image"`` starts after the tower."""
    if "features" in batch:
        img = model.apply({"params": params}, batch["features"], method=DualEncoder.project_image)
    else:
        img = model.apply({"params": params}, batch["image"], train=True, method=DualEncoder.encode_image)
    txt = model.apply({"params": params}, batch["text"], method=DualEncoder.encode_text)
    out = {"mean": img["mean"].astype(jnp.float32), "txt": txt.astype(jnp.float32)}
    if img["noise"] is not None:
        out["noise"] = {k: v.astype(jnp.float32) for k, v in img["noise"].items() if k != "C"}
    return out


def make_loss(model_cfg: ModelConfig, mesh):
    """``loss(params, emb, key) -> (loss, aux)`` over the global batch: the model's shared loss inputs
    (scale, SigLIP bias, HET-XL ``C``) read from ``params``, then ``losses.make_loss``."""
    model = DualEncoder(model_cfg)
    het = model_cfg.het
    kind = "sigmoid" if model_cfg.loss == "sigmoid" else ("hetxl" if het.enabled and het.mc_samples > 0
                                                          else "softmax")
    # bf16 models also run the logits matmuls as bf16 x bf16 -> fp32 (AMX, AVX-512 BF16); logsumexps stay fp32.
    mm = jnp.bfloat16 if compute_dtype(model_cfg.dtype) == jnp.bfloat16 else None
    fn = losses.make_loss(kind, mesh, dist.BATCH_AXES, mc_samples=het.mc_samples, sample_chunk=het.sample_chunk,
                          class_chunk=het.class_chunk, matmul_dtype=mm, estimator=het.estimator)

    def loss(params, emb, key):
        shared = {"scale": model.apply({"params": params}, method=DualEncoder.logit_scale)}
        if kind == "sigmoid":
            shared["bias"] = model.apply({"params": params}, method=DualEncoder.logit_bias)
        if het.enabled and het.param_efficient:
            shared["C"] = params["het_head"]["C"]
        return fn(emb, shared, key)

    return loss


# --------------------------------------------------------------------------------------------
# Train step


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
    full_loss = make_loss(model_cfg, mesh)
    n_shards = mesh.devices.size

    def encode(p, batch):  # every gradient path goes through these two, so frozen groups get none
        return embed(model, stop_frozen(p, frozen), batch)

    def loss_fn(p, emb, key):
        return full_loss(stop_frozen(p, frozen), emb, key)

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
        emb_micro = jax.lax.map(lambda mb: embed(model, frozen_params, mb), micro)
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


# --------------------------------------------------------------------------------------------
# Data


_NOT_LOADER_KEYS = ("num_workers", "synthetic", "tokenizer")


def make_data(cfg, tokenizer, *, local_batch: int, state: dict | None):
    """The host-local batch iterator (or synthetic batches when ``data.synthetic``)."""
    if cfg.data.get("synthetic", False):
        from hetclip.data.synthetic import SyntheticBatches

        return SyntheticBatches(tokenizer, image_size=cfg.data.image_size, local_batch=local_batch, seed=cfg.seed,
                                process_index=jax.process_index(), process_count=jax.process_count(), state=state)
    from hetclip.data.loader import make_train_loader

    spec = {k: v for k, v in cfg.data.to_dict().items() if k not in _NOT_LOADER_KEYS}
    spec["epoch_size"] = spec.get("epoch_size") or None
    return make_train_loader(spec, tokenizer, batch_size=local_batch, seed=cfg.seed,
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             num_workers=cfg.data.num_workers, state=state)


# --------------------------------------------------------------------------------------------
# Work directory and run set-up


# (key, smallest allowed value, what the value means)
_LIMITS = (("batch_size", 1, ""), ("accum_steps", 1, ""), ("total_steps", 0, " (0: from total_samples)"),
           ("log_every", 1, ""), ("checkpoint.every_steps", 0, " (0: only at the end)"), ("checkpoint.keep", 1, ""),
           ("eval.every_steps", 0, " (0: only at the end)"), ("data.num_workers", 0, ""),
           ("optim.warmup_steps", 0, ""), ("optim.lr", 0, ""))


def validate(cfg) -> None:
    """Refuse values no run can use; called before anything is written."""
    for key, low, meaning in _LIMITS:
        node = cfg
        for part in key.split("."):
            node = node[part]
        if not node >= low:  # NaN fails too
            raise config_lib.ConfigError(f"config {key}={node} must be >= {low}{meaning}")
    for key, value in cfg.optim.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise config_lib.ConfigError(f"config optim.{key}={value} must be a finite number")
    if cfg.total_steps == 0 and not cfg.total_samples > 0:
        raise config_lib.ConfigError(f"config total_samples={cfg.total_samples} must be > 0 when total_steps=0")


def _prepare_demo(cfg) -> ml_collections.ConfigDict:
    """Generate the built-in demo data if asked for and point the data/eval settings at it.

    A config that names its own ``data.shards`` keeps them: the demo recipe's model and schedule train on
    them, no demo data is generated and the demo's zero-shot tasks are not added (the config's own
    ``eval.tasks`` run); the returned config says ``demo.enabled=False``. Its ``data.tokenizer.path`` must
    be named too (the demo tokenizer knows only the demo captions)."""
    if not cfg.get("demo") or not cfg.demo.get("enabled", False):
        return cfg
    if cfg.data.get("shards"):
        if not cfg.data.tokenizer.get("path"):
            raise config_lib.ConfigError(
                "data.shards names your own data but data.tokenizer.path is empty: train a tokenizer on its "
                "captions (hetclip-train-bpe) and pass --config.data.tokenizer.path=DIR")
        if dist.is_main_process():
            log.info("data.shards is given: training on %s, without generating the demo data or adding its "
                     "zero-shot tasks (%d eval task(s) configured)", cfg.data.shards, len(cfg.eval.tasks))
        out = ml_collections.ConfigDict(cfg.to_dict())
        out.demo.enabled = False
        out.lock()
        return out
    from hetclip.data import demo

    root = os.path.abspath(os.path.expanduser(cfg.demo.dir or "demo_data"))
    params = cfg.demo.params.to_dict()
    if dist.is_main_process():
        t0 = time.perf_counter()
        fresh = demo.read_manifest(root) is None
        paths = demo.ensure_demo(root, workers=max(1, min(4, os.cpu_count() or 1)), **params)
        if fresh:
            log.info("generated the demo data in %s (%.0f s)", root, time.perf_counter() - t0)
    dist.barrier("demo-data")
    if not dist.is_main_process():
        paths = demo.ensure_demo(root, **params)
    out = ml_collections.ConfigDict(demo.configure(cfg.to_dict(), paths))
    out.lock()
    return out


def _preprocess(cfg) -> dict:
    return {"image_size": int(cfg.data.image_size), "resize": "shortest_side_bicubic", "crop": "center",
            "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "train_crop_scale": list(cfg.data.crop_scale)}


@dataclasses.dataclass
class Run:
    """Everything a training run holds besides the loop's local variables."""
    cfg: ml_collections.ConfigDict
    workdir: str
    model_cfg: ModelConfig
    tokenizer: object
    tokenizer_spec: dict
    mesh: object
    total_steps: int
    lock: workdir_lib.RunLock | None = None


def setup(cfg, workdir: str, allow_config_change: bool = False) -> Run:
    """Validate everything, then take the run directory's lock and write its config and tokenizer.

    Nothing is written to ``workdir`` before the config, the model, the mesh and the schedule are
    known to be usable; on success the caller owns ``run.lock`` (main process only)."""
    validate(cfg)
    cfg = _prepare_demo(cfg)  # the config the run reads from here on: what config.json and checkpoints record
    from hetclip.data.tokenizers import load_tokenizer

    if not cfg.data.get("synthetic", False):
        from hetclip.data.shards import parse_sources

        if not cfg.data.shards:
            raise config_lib.ConfigError("config data.shards is empty: name the training shards (or set "
                                         "data.synthetic=True or demo.enabled=True)")
        parse_sources(cfg.data.shards, cfg.data.get("weights"))  # every local shard exists, all missing ones named

    spec = cfg.data.tokenizer.to_dict() if isinstance(cfg.data.tokenizer, ml_collections.ConfigDict) \
        else cfg.data.tokenizer
    tokenizer = load_tokenizer(spec)
    mesh = dist.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    dist.batch_size_check(cfg.batch_size, mesh)
    if cfg.batch_size % (mesh.devices.size * cfg.accum_steps):
        raise config_lib.ConfigError(
            f"batch_size={cfg.batch_size} must split into accum_steps={cfg.accum_steps} micro-batches on each of "
            f"the {mesh.devices.size} devices (a multiple of {mesh.devices.size * cfg.accum_steps})")
    total = int(cfg.total_steps) if cfg.total_steps > 0 else math.ceil(cfg.total_samples / cfg.batch_size)
    make_schedule(cfg.optim, total)
    model_cfg = model_config(cfg, tokenizer)

    main = dist.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    lock = workdir_lib.RunLock(workdir).acquire() if main else None
    try:
        workdir_lib.save_or_check_config(json.loads(config_lib.to_json(cfg)), workdir, allow_config_change,
                                         write=main)
        load_spec, stored_spec = workdir_lib.persist_tokenizer(dict(tokenizer.spec()), workdir, copy=main)
        dist.barrier("tokenizer-copy")
        if load_spec != tokenizer.spec():
            tokenizer = load_tokenizer(load_spec)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Run(cfg, workdir, model_cfg, tokenizer, stored_spec, mesh, total, lock)


# --------------------------------------------------------------------------------------------
# The loop


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: give up at once
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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


def _check_guard(guard: dict) -> None:
    step = int(guard["step"])
    if step == 0:
        return
    values = dict(zip(GUARDED, (float(v) for v in guard["values"])))
    name = next(k for k in GUARDED if not math.isfinite(values[k]))
    raise TrainingError(f"non-finite {name} ({values[name]}) at step {step}; stopping without saving this state. "
                        "The last good checkpoint is untouched; lower the learning rate or check the data")


def _metadata(run: Run) -> dict:
    return {"model": run.model_cfg.to_dict(), "tokenizer": run.tokenizer_spec, "preprocess": _preprocess(run.cfg),
            "config": run.cfg.to_dict(), "hetclip_version": _version()}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hetclip")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def train(cfg, workdir: str, *, allow_config_change: bool = False, progress: bool = True,
          max_steps: int | None = None) -> dict:
    """Train (or resume) a run in ``workdir``; returns a summary dict. ``max_steps`` stops early (tests)."""
    if max_steps is not None and max_steps < 1:
        raise config_lib.ConfigError(f"max_steps={max_steps} must be >= 1")
    run = setup(cfg, workdir, allow_config_change)
    try:
        return _train(run, progress=progress, max_steps=max_steps)
    finally:
        if run.lock is not None:
            run.lock.release()


def _resume(ckpt: ckpt_lib.Checkpointer, workdir: str, **abstract) -> dict | None:
    """The newest intact checkpoint; newer damaged steps are named and set aside (never deleted)."""
    try:
        restored, damaged = ckpt.restore_newest_intact(**abstract)
    except ValueError as e:
        raise TrainingError(f"{e}; was the model or optimizer changed? Use another --workdir") from None
    if damaged and restored is None:
        raise TrainingError("no intact checkpoint to resume from:\n  " + "\n  ".join(why for _, why in damaged)
                            + f"\nmove the damaged steps out of {ckpt.directory} to start again from scratch")
    aside = os.path.join(workdir, "damaged_checkpoints")
    for step, why in damaged:
        where = ckpt.set_aside(step, aside) if dist.is_main_process() else aside
        log.warning("%s; set aside to %s; resuming from step %d instead", why, where, restored["step"])
    if damaged:
        dist.barrier("checkpoints-set-aside")
    return restored


def _train(run: Run, *, progress: bool, max_steps: int | None) -> dict:
    cfg = run.cfg
    workdir = run.workdir
    mesh = run.mesh
    main = dist.is_main_process()
    local_batch = cfg.batch_size // jax.process_count()

    key = jax.random.key(cfg.seed)
    init_key, loop_key = jax.random.split(key)
    abstract = abstract_params(run.model_cfg)
    p_shard = dist.tree_shardings(mesh, abstract)
    params = jax.jit(lambda k: init_params(run.model_cfg, k), out_shardings=p_shard)(init_key)
    if cfg.get("init_from_hf"):
        params = _init_from_hf(cfg.init_from_hf, run.model_cfg, params, p_shard, tuple(cfg.init_from_hf_groups))
    optimizer, schedule = make_optimizer(cfg, params, run.total_steps)
    o_abstract = jax.eval_shape(optimizer.init, params)
    o_shard = dist.tree_shardings(mesh, o_abstract)
    opt_state = jax.jit(optimizer.init, out_shardings=o_shard)(params)
    rep = dist.replicated(mesh)
    # A replicated global array, so orbax can save it from several processes.
    rng = jax.make_array_from_process_local_data(rep, np.asarray(jax.random.key_data(loop_key)))

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                                 async_save=cfg.checkpoint.async_save)
    start_step, data_state = 0, None
    if ckpt.latest_step() is not None:
        with_shard = lambda tree, sh: jax.tree.map(  # noqa: E731
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
        restored = _resume(ckpt, workdir, abstract_params=with_shard(abstract, p_shard),
                           abstract_opt_state=with_shard(o_abstract, o_shard),
                           abstract_rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep))
        params, opt_state, rng = restored["params"], restored["opt_state"], restored["rng"]
        start_step, data_state = restored["step"], restored["data"]
        if main:
            log.info("resumed from %s at step %d", ckpt.directory, start_step)

    step_fn = jax.jit(guarded(make_train_step(run.model_cfg, optimizer, mesh, cfg.accum_steps, frozen_groups(cfg))),
                      donate_argnums=(0, 1))
    # Every leaf already placed as the step returns it, so the second call does not compile again.
    state = {"params": params, "opt_state": opt_state,
             "step": jax.device_put(jnp.asarray(start_step, jnp.int32), rep)}
    guard = jax.device_put(new_guard(), rep)
    loop_key = jax.random.wrap_key_data(rng)
    data = make_data(cfg, run.tokenizer, local_batch=local_batch, state=data_state)
    data_pos = data.state()  # the loader position of the last batch a step consumed
    writer = runlog.MetricsWriter(workdir, enabled=main, tensorboard=cfg.get("tensorboard", True),
                                  resume_step=start_step)
    end_step = run.total_steps if max_steps is None else min(run.total_steps, max_steps)
    bar = runlog.Progress(run.total_steps, initial=start_step, enabled=main and progress)
    meta = _metadata(run)
    logit_scale = jax.jit(lambda p: DualEncoder(run.model_cfg).apply({"params": p}, method=DualEncoder.logit_scale))

    def check():
        """Read the device-side guard (a few bytes): raise naming the first non-finite step."""
        _check_guard(jax.device_get(guard))

    saved = {"step": start_step or None}  # the newest checkpoint step (saved here or resumed from)

    def save(step):
        check()  # nothing non-finite is ever saved
        scale = float(jax.device_get(logit_scale(state["params"])))
        if not (math.isfinite(scale) and scale > 0):  # the metrics saw the parameters before this step's update
            raise TrainingError(f"refusing to save step {step}: the temperature is not finite (logit scale {scale}); "
                                "the last good checkpoint is untouched; lower the learning rate")
        ckpt.save(step, params=state["params"], opt_state=state["opt_state"], rng=rng,
                  data_state=data_pos, meta=meta)
        saved["step"] = step

    summary = {"workdir": workdir, "start_step": start_step, "total_steps": run.total_steps}
    step = start_step
    last_eval = {}
    window = {"t0": time.perf_counter(), "wait": 0.0, "n": 0}
    feed = DevicePrefetcher(data, lambda local: dist.global_batch(local, mesh), depth=2)
    in_flight: collections.deque = collections.deque()
    try:
        with _StopRequest() as stop:
            while step < end_step:
                waited = feed.wait_seconds
                try:
                    batch, data_pos_next = next(feed)
                except StopIteration:
                    raise TrainingError(f"the data ran out at step {step} (set data.epochs higher or "
                                        "data.epoch_size correctly)") from None
                except (DataWorkerError, TooManyBadSamples) as e:
                    raise TrainingError(f"input data at step {step + 1}: {e}") from None
                window["wait"] += feed.wait_seconds - waited
                state, guard, metrics = step_fn(state, guard, batch, jax.random.fold_in(loop_key, step))
                data_pos = data_pos_next
                step += 1
                window["n"] += 1
                # At most two steps queued on the devices: their batches are the only ones held there.
                in_flight.append(metrics["loss"])
                if len(in_flight) > 2:
                    in_flight.popleft().block_until_ready()
                ckpt.poll()
                if step % cfg.log_every == 0 or step == end_step:
                    check()
                    metrics = jax.device_get(metrics)
                    dt = time.perf_counter() - window["t0"]
                    scalars = {k: float(v) for k, v in metrics.items()}
                    scalars.update({"lr": float(schedule(step - 1)),
                                    "samples_per_sec": window["n"] * cfg.batch_size / max(dt, 1e-9),
                                    "data_wait_frac": window["wait"] / max(dt, 1e-9)})
                    writer.write(step, scalars)
                    summary["last_metrics"] = dict(scalars, step=step)
                    eta = (end_step - step) * dt / max(window["n"], 1)
                    bar.update(step, {"loss": scalars["loss"], "T": scalars["temperature"],
                                      "sps": scalars["samples_per_sec"], "wait": scalars["data_wait_frac"],
                                      "eta": f"{eta / 60:.1f}m"})
                    window = {"t0": time.perf_counter(), "wait": 0.0, "n": 0}
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                    save(step)
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < end_step:
                    check()
                    last_eval = evaluate(run, state["params"], step, writer, bar)
                if stop.signal is not None:
                    if saved["step"] != step:  # this step may just have been saved by the periodic save
                        bar.write(f"signal {stop.signal} received: saving a checkpoint at step {step} and stopping")
                        save(step)
                    else:
                        bar.write(f"signal {stop.signal} received: stopping at step {step} (its checkpoint is saved)")
                    ckpt.wait()
                    summary.update(stopped_by_signal=int(stop.signal), step=step)
                    return summary
            if ckpt.latest_step() != step:
                save(step)
            ckpt.wait()
    finally:
        failing = sys.exc_info()[0]
        feed.close()
        bar.close()
        data.close()
        try:
            ckpt.close()
        except ckpt_lib.CheckpointError:
            if failing is None:  # else the error already under way is the one to report
                raise
        if failing is not None and issubclass(failing, KeyboardInterrupt):  # a second signal: no save
            raise KeyboardInterrupt(f"stopped at step {step} without saving; " + (
                "nothing was saved (no checkpoint yet)" if saved["step"] is None
                else f"the newest checkpoint is step {saved['step']}")) from None
    summary["step"] = step
    summary["data"] = data.stats()
    if step >= run.total_steps:
        if cfg.eval.get("at_end", True) and cfg.eval.tasks:
            last_eval = evaluate(run, state["params"], step, writer, None)
        summary["eval"] = last_eval
        if cfg.get("export") and cfg.export.get("format") and main:
            summary["export"] = export(run, workdir)
    writer.close()
    if main:
        ckpt_lib.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    return summary


def _init_from_hf(path: str, model_cfg: ModelConfig, params, shardings, groups=GROUPS):
    """The parameter ``groups`` (``optim.GROUPS``) from a Hugging Face CLIP directory, the rest as initialised:
    all groups to fine-tune, ``("image",)`` for LiT (a pretrained image tower, the text tower from scratch).
    A HET-XL head comes from the directory when it holds one (``hetclip-export``), else it keeps its
    initialisation (a new head on pretrained towers)."""
    from hetclip import hf

    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not groups:
        raise config_lib.ConfigError(f"init_from_hf_groups={tuple(groups)!r}: name one or more of {list(GROUPS)}")
    cfg = model_cfg
    with_head = os.path.isfile(os.path.join(path, hf.HET_HEAD_WEIGHTS))
    if model_cfg.het.enabled and not (with_head and "head" in groups):
        cfg = dataclasses.replace(model_cfg, het=dataclasses.replace(model_cfg.het, enabled=False))
        if "head" in groups and dist.is_main_process():
            log.info("init_from_hf: %s holds no HET-XL head; the head starts from its initialisation", path)
    imported, _ = hf.params_from_hf(path, cfg)
    merged = dict(jax.device_get(params))
    for k, v in imported.items():
        if k in merged and param_group((k,)) in groups:
            merged[k] = v
    return jax.device_put(merged, shardings)


def evaluate(run: Run, params, step: int, writer, bar) -> dict:
    """Zero-shot accuracy on the configured tasks (the periodic hook and the end of training)."""
    from hetclip.model import Encoders
    from hetclip.zero_shot.evaluate import run_zero_shot

    enc = Encoders(run.model_cfg, jax.device_get(params))
    results = {}
    for task in run.cfg.eval.tasks:
        task = ml_collections.ConfigDict(dict(task))
        if not task.dir:
            raise config_lib.ConfigError(f"eval task {task.name!r} has no dir; set --config.eval.tasks... dir or "
                                         "remove the task")
        out = run_zero_shot(enc, run.tokenizer, task.dir, classnames=task.get("classnames") or None,
                            templates=task.get("templates") or "clip80",
                            image_size=run.model_cfg.vision.image_size, imagenet=task.get("classnames") == "imagenet",
                            batch_size=run.cfg.eval.batch_size, mc_samples=run.cfg.eval.mc_samples,
                            limit=run.cfg.eval.get("limit") or None, seed=run.cfg.seed,
                            workers=run.cfg.data.num_workers)
        res = out["metrics"]
        results[task.name] = res
        scalars = {f"zero_shot/{task.name}/{k}": v for k, v in _flat_scalars(res).items()}
        writer.write(step, scalars)
        msg = f"step {step} zero-shot {task.name}: top1={_get(res, 'top1'):.4f}"
        (bar.write(msg) if bar is not None else print(msg, flush=True)) if dist.is_main_process() else None
    if dist.is_main_process():
        ckpt_lib.write_json_atomic(os.path.join(run.workdir, f"zero_shot_step{step}.json"), results)
    return results


def _get(res: dict, key: str) -> float:
    if key in res:
        return float(res[key])
    for v in res.values():
        if isinstance(v, dict) and key in v:
            return float(v[key])
    return float("nan")


def _flat_scalars(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def export(run: Run, workdir: str) -> dict:
    from hetclip import export as export_lib

    out = os.path.join(workdir, run.cfg.export.get("dir") or f"export_{run.cfg.export.format}")
    export_lib.export_checkpoint(workdir, run.cfg.export.format, out, force=True)
    return {"format": run.cfg.export.format, "dir": out}


# --------------------------------------------------------------------------------------------
# CLI


def parse(argv: list[str]):
    spec, overrides, rest = config_lib.split_argv(argv)
    parser = argparse.ArgumentParser(prog="hetclip-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=config_lib.help_epilog())
    parser.add_argument("--workdir", help="run directory (default: runs/<recipe>)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a work directory even though its saved config differs")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    parser.add_argument("--coordinator", help="multi-process: coordinator address host:port (default: JAX's "
                        "auto-detection under SLURM, Open MPI or on Cloud TPU VMs)")
    parser.add_argument("--num-processes", type=int, help="multi-process: number of processes (with --coordinator)")
    parser.add_argument("--process-id", type=int, help="multi-process: this process's id 0..N-1 (with --coordinator)")
    parser.add_argument("--no-cluster-detection", action="store_true",
                        help="run as one process even inside a SLURM step, mpirun or a TPU pod")
    parser.add_argument("--max-steps", type=int, help="stop after this step (the schedule still uses total_steps)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("--quiet", action="store_true", help="log warnings and errors only (no INFO lines)")
    loud.add_argument("--verbose", action="store_true", help="log DEBUG lines, and other libraries' INFO (orbax)")
    args = parser.parse_args(rest)
    if spec is None:
        parser.error("--config is required (a config file or one of the recipes: "
                     f"{', '.join(config_lib.available_recipes())})")
    cfg = config_lib.apply_overrides(config_lib.load_config(spec), overrides)
    workdir = args.workdir or cfg.get("workdir") or os.path.join("runs", os.path.splitext(os.path.basename(
        spec.partition(":")[0]))[0])
    return cfg, workdir, args


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a user error (one message naming the file, key or step), 128+N stopped by signal N."""
    from hetclip.cli import guarded as with_exit_status

    argv = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        cfg, workdir, args = parse(argv)
        dist.initialize(args.coordinator, args.num_processes, args.process_id, auto=not args.no_cluster_detection)
        summary = train(cfg, workdir, allow_config_change=args.allow_config_change, progress=not args.no_progress,
                        max_steps=args.max_steps)
        if "stopped_by_signal" in summary:
            return 128 + summary["stopped_by_signal"]
        print(_summary_text(summary), flush=True)
        return 0

    return with_exit_status("hetclip-train", body, argv)


def _summary_text(summary: dict) -> str:
    lines = [f"trained {summary['workdir']}: step {summary['step']} of {summary['total_steps']}"]
    last = summary.get("last_metrics") or {}
    if "het/angular" in last:
        lines.append(f"  HET-XL head at step {last['step']}: angular noise {last['het/angular']:.4f} rad "
                     f"(spread across images {last['het/angular_spread']:.4f}), per-coordinate std "
                     f"{last['het/noise_std']:.4f}, |mean| {last['het/mean_norm']:.2f}, temperature "
                     f"{last['temperature']:.4f}")
    for name, res in (summary.get("eval") or {}).items():
        lines.append(f"  zero-shot {name}: top1 {_get(res, 'top1'):.4f}  top5 {_get(res, 'top5'):.4f}")
    if summary.get("export"):
        lines.append(f"  exported ({summary['export']['format']}) to {summary['export']['dir']}")
    return "\n".join(lines)


if __name__ == "__main__":
    from hetclip.allocator import reexec_with_mimalloc

    reexec_with_mimalloc()  # as the console script does (python -m is kept on re-execution)
    sys.exit(main())
