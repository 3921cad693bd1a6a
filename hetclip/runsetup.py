"""A training run's set-up, before the first step: the config validated, the demo data prepared, the
tokenizer, mesh, model config and evaluators built, the run directory locked and its config written;
then the initial (or resumed) training state. Nothing is written to the run directory before every
check passed."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hetclip import checkpoint as ckpt_lib
from hetclip import config as config_lib
from hetclip import distributed as dist
from hetclip import evals as evals_lib
from hetclip import workdir as workdir_lib
from hetclip.data.decode import CLIP_MEAN, CLIP_STD
from hetclip.model import ModelConfig, abstract_params, init_params
from hetclip.optim import make_optimizer, make_schedule
from hetclip.step import TrainingError

log = logging.getLogger("hetclip.train")


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


# (key, smallest allowed value, what the value means)
_LIMITS = (("batch_size", 1, ""), ("accum_steps", 1, ""), ("total_steps", 0, " (0: from total_samples)"),
           ("log_every", 1, ""), ("checkpoint.every_steps", 0, " (0: only at the end)"), ("checkpoint.keep", 1, ""),
           ("data.num_workers", 0, ""),
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


def prepare_demo(cfg) -> ml_collections.ConfigDict:
    """Generate the built-in demo data if asked for and point the data/eval settings at it.

    A config that names its own ``data.shards`` keeps them: the demo recipe's model and schedule train on
    them, no demo data is generated and the demo's own evaluators (entries named after a demo task
    without a ``dir``) are dropped; the returned config says ``demo.enabled=False``. Its ``data.tokenizer.path`` must
    be named too (the demo tokenizer knows only the demo captions)."""
    if not cfg.get("demo") or not cfg.demo.get("enabled", False):
        return cfg
    if cfg.data.get("shards"):
        if not cfg.data.tokenizer.get("path"):
            raise config_lib.ConfigError(
                "data.shards names your own data but data.tokenizer.path is empty: train a tokenizer on its "
                "captions (hetclip-train-bpe) and pass --config.data.tokenizer.path=DIR")
        if dist.is_main_process():
            log.info("data.shards is given: training on %s, without generating the demo data or running its "
                     "evaluators", cfg.data.shards)
        from hetclip.data.demo import TASKS

        d = cfg.to_dict()
        d["evals"] = [e for e in d["evals"] if not (e.get("name") in TASKS and not e.get("dir"))]
        out = ml_collections.ConfigDict(d)
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


def preprocess(cfg) -> dict:
    """The evaluation preprocessing a checkpoint records (what hetclip-zero-shot and the export apply)."""
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
    evals: object = None  # hetclip.evals.Suite
    lock: workdir_lib.RunLock | None = None


def setup(cfg, workdir: str, allow_config_change: bool = False) -> Run:
    """Validate everything, then take the run directory's lock and write its config and tokenizer.

    Nothing is written to ``workdir`` before the config, the model, the mesh and the schedule are
    known to be usable; on success the caller owns ``run.lock`` (main process only)."""
    validate(cfg)
    cfg = prepare_demo(cfg)  # the config the run reads from here on: what config.json and checkpoints record
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
    suite = evals_lib.Suite(cfg.evals, evals_lib.Context(model_cfg, tokenizer, mesh, seed=cfg.seed,
                                                         workers=cfg.data.num_workers))

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
    return Run(cfg, workdir, model_cfg, tokenizer, stored_spec, mesh, total, suite, lock)


def metadata(run: Run) -> dict:
    return {"model": run.model_cfg.to_dict(), "tokenizer": run.tokenizer_spec, "preprocess": preprocess(run.cfg),
            "config": run.cfg.to_dict(), "hetclip_version": _version()}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hetclip")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


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


@dataclasses.dataclass
class State:
    """What the loop starts from: the step's state (params, optimizer state, step) on the mesh, the loop's
    key data (``rng``, saved with checkpoints), the loader position and the optimizer's schedule."""
    train: dict
    rng: jax.Array
    start_step: int
    data_state: dict | None
    optimizer: object
    schedule: object


def init_state(run: Run, ckpt: ckpt_lib.Checkpointer) -> State:
    """Fresh parameters (or ``init_from_hf``'s groups) and optimizer state, sharded over the mesh; the
    newest intact checkpoint instead when ``ckpt`` has one."""
    cfg, mesh = run.cfg, run.mesh
    init_key, loop_key = jax.random.split(jax.random.key(cfg.seed))
    abstract = abstract_params(run.model_cfg)
    p_shard = dist.tree_shardings(mesh, abstract)
    params = jax.jit(lambda k: init_params(run.model_cfg, k), out_shardings=p_shard)(init_key)
    if cfg.get("init_from_hf"):
        from hetclip import hf

        params = hf.init_groups(cfg.init_from_hf, run.model_cfg, params, p_shard, tuple(cfg.init_from_hf_groups))
    optimizer, schedule = make_optimizer(cfg, params, run.total_steps)
    o_abstract = jax.eval_shape(optimizer.init, params)
    o_shard = dist.tree_shardings(mesh, o_abstract)
    opt_state = jax.jit(optimizer.init, out_shardings=o_shard)(params)
    rep = dist.replicated(mesh)
    # A replicated global array, so orbax can save it from several processes.
    rng = jax.make_array_from_process_local_data(rep, np.asarray(jax.random.key_data(loop_key)))
    start_step, data_state = 0, None
    if ckpt.latest_step() is not None:
        with_shard = lambda tree, sh: jax.tree.map(  # noqa: E731
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
        restored = _resume(ckpt, run.workdir, abstract_params=with_shard(abstract, p_shard),
                           abstract_opt_state=with_shard(o_abstract, o_shard),
                           abstract_rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep))
        params, opt_state, rng = restored["params"], restored["opt_state"], restored["rng"]
        start_step, data_state = restored["step"], restored["data"]
        if dist.is_main_process():
            log.info("resumed from %s at step %d", ckpt.directory, start_step)
    # Every leaf already placed as the step returns it, so the second call does not compile again.
    train = {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.asarray(start_step, jnp.int32), rep)}
    return State(train, rng, start_step, data_state, optimizer, schedule)
