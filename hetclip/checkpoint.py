"""Checkpoints with orbax: what a training run saves, and how evaluation/export read it back.

A checkpoint step directory holds four items:

* ``params``: the model parameters (read alone by evaluation and export);
* ``train``: optimizer state, step and RNG key;
* ``data``: the input iterator's state (JSON), so the sample stream resumes exactly;
* ``meta``: JSON with the model config, tokenizer spec, preprocessing and the full run config.

orbax writes each step into a temporary directory and renames it when complete, so a kill in the
middle of a save leaves the previous steps untouched and is ignored (and cleaned up) on restart.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("params", "train", "data", "meta")


def _manager(directory: str, keep: int | None = None, async_save: bool = True,
             read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


class Checkpointer:
    """Periodic, asynchronous, keep-the-last-N checkpoints of a training run."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._mgr = _manager(self.directory, keep=keep, async_save=async_save)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, *, params, opt_state, rng, data_state: dict, meta: dict) -> None:
        train = {"opt_state": opt_state, "step": np.asarray(step, np.int64), "rng": rng}
        self._mgr.save(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            train=ocp.args.StandardSave(train),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        ), force=True)

    def restore(self, step: int, *, abstract_params, abstract_opt_state, abstract_rng):
        """Restore ``step`` into arrays with the shardings of the given abstract trees."""
        abstract_train = {"opt_state": abstract_opt_state,
                          "step": jax.ShapeDtypeStruct((), np.int64), "rng": abstract_rng}
        out = self._mgr.restore(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            train=ocp.args.StandardRestore(abstract_train),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
        return {"params": out["params"], "opt_state": out["train"]["opt_state"],
                "step": int(out["train"]["step"]), "rng": out["train"]["rng"],
                "data": out["data"], "meta": out["meta"]}

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def checkpoint_dir(path: str) -> str:
    """Accept a work directory (with ``checkpoints/``) or the checkpoints directory itself."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints")
    return path


def read_meta(path: str, step: int | None = None) -> tuple[int, dict]:
    directory = checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}")
    mgr = _manager(directory, read_only=True, async_save=False)
    try:
        steps = mgr.all_steps()
        if not steps:
            raise FileNotFoundError(f"{directory!r} holds no complete checkpoint")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{directory!r} has no checkpoint for step {step}; it has {sorted(steps)}")
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        mgr.close()
    return step, meta


def load_params(path: str, step: int | None = None):
    """``(step, params as numpy arrays, meta)`` of the latest (or given) checkpoint under ``path``."""
    step, meta = read_meta(path, step)
    directory = checkpoint_dir(path)
    mgr = _manager(directory, read_only=True, async_save=False)
    try:
        params_dir = os.path.join(directory, str(step), "params")
        metadata = ocp.StandardCheckpointer().metadata(params_dir)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu), tree)
        params = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
    finally:
        mgr.close()
    return step, jax.tree.map(np.asarray, params), meta


def load_encoders(path: str, step: int | None = None):
    """Everything evaluation and export need from a training checkpoint.

    Returns ``(model_cfg: ModelConfig, params, tokenizer_spec: dict, preprocess: dict, meta: dict)``.
    """
    from hetclip.model import ModelConfig

    step, params, meta = load_params(path, step)
    missing = [k for k in ("model", "tokenizer", "preprocess") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint {path!r} step {step} has no {missing} in its metadata; "
                         "it was not written by hetclip-train")
    model_cfg = ModelConfig.from_dict(meta["model"])
    meta = dict(meta, step=step, checkpoint=os.path.abspath(path))
    return model_cfg, params, meta["tokenizer"], meta["preprocess"], meta


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=list)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
