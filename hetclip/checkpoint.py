"""Checkpoints with orbax: what a training run saves, how it is verified, and how it is read back.

A checkpoint step directory holds four items:

* ``params``: the model parameters (read alone by evaluation and export);
* ``train``: optimizer state, step and RNG key;
* ``data``: the input iterator's state (JSON), so the sample stream resumes exactly;
* ``meta``: JSON with the model config, tokenizer spec (paths relative to the run directory),
  preprocessing, the full run config and ``integrity``: a digest of every tensor and of the data state.

orbax writes each step into a temporary directory and renames it when complete, so a kill in the
middle of a save leaves the previous steps untouched and is ignored (and cleaned up) on restart.

Integrity: before a step is saved every tensor of ``params`` and ``train`` is checked for
non-finite values (a diverged state is never saved) and digested on the devices (two wrapping
uint32 sums of its bits, position-weighted; sharded arrays need no gather). The digests go into
``meta``, which orbax commits together with the tensors. Loading recomputes them: flipped or
truncated bytes are reported with the step, the item directory and the tensor's name.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("params", "train", "data", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back intact; the message names step, file and tensor."""


# --------------------------------------------------------------------------------------------
# Tensor digests and finiteness


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_report(x):
    """``[digest_a, digest_b, finite]`` (uint32) of one array; equal bits give equal digests on any sharding."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if x.dtype.itemsize not in _UINT:
        raise TypeError(f"cannot digest an array of dtype {x.dtype}")
    bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2 ** 32)
        stride *= x.shape[axis]
    a = jnp.sum(bits ^ (index * jnp.uint32(0x85EBCA6B)), dtype=jnp.uint32)
    b = jnp.sum(bits * (index * jnp.uint32(0x9E3779B1) + jnp.uint32(1)), dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack([a, b, finite.astype(jnp.uint32)])


@jax.jit
def _tree_report(leaves):
    return jnp.stack([_leaf_report(x) for x in leaves]) if leaves else jnp.zeros((0, 3), jnp.uint32)


def tree_report(tree) -> dict[str, tuple[str, bool]]:
    """``{tensor path: (digest hex, all finite)}`` of every array in ``tree`` (one device round trip)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [_path_name(p) for p, _ in flat]
    out = _tree_report([x for _, x in flat])
    if not out.is_fully_addressable:  # multi-host: every process holds the replicated result
        out = out.addressable_data(0)
    rows = np.asarray(out)
    return {n: (f"{int(r[0]):08x}{int(r[1]):08x}", bool(r[2])) for n, r in zip(names, rows)}


def non_finite(report: dict[str, tuple[str, bool]]) -> list[str]:
    return [name for name, (_, finite) in report.items() if not finite]


def json_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Writing (training)


def _manager(directory: str, keep: int | None = None, async_save: bool = True,
             read_only: bool = False) -> ocp.CheckpointManager:
    _install_unraisable_filter()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


def _short(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _os_reason(e: BaseException) -> str | None:
    """The operating system's reason behind a failed write (``No space left on device``), from an
    ``OSError`` in the exception chain or tensorstore's ``[os_error_code=N]`` text; None if there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno)
        m = re.search(r"os_error_code='?(\d+)", str(e))
        if m:
            return os.strerror(int(m.group(1)))
        e = e.__cause__ or e.__context__
    return None


def _save_failed(step, directory: str, e: BaseException) -> CheckpointError:
    """One message for a failed save: step, directory, orbax's words (short) and the OS reason last."""
    reason = _os_reason(e)
    return CheckpointError(f"saving the checkpoint of step {step} in {directory} failed: {_short(e, 240)}"
                           + (f" -- {reason}" if reason else ""))


def _closed_loop_noise(unraisable) -> bool:
    """orbax runs each save's writes in a fresh event loop and closes it when the first write fails; the
    writes still pending then call back into the closed loop, and each callback's ``RuntimeError: Event
    loop is closed`` reaches ``sys.unraisablehook`` (nothing waits for them; the failure itself is raised
    by ``wait``/``restore``). These, and only these, are dropped."""
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and unraisable.object is None):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.join("asyncio", "base_events.py") in tb.tb_frame.f_code.co_filename


def _install_unraisable_filter() -> None:
    if getattr(sys.unraisablehook, "_hetclip_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _closed_loop_noise(unraisable):
            previous(unraisable)

    hook._hetclip_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class Checkpointer:
    """Periodic, asynchronous, keep-the-last-N checkpoints of a training run, verified on the way in and out."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._keep, self._async = keep, async_save
        self._mgr = _manager(self.directory, keep=keep, async_save=async_save)
        self._pending: int | None = None

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, *, params, opt_state, rng, data_state: dict, meta: dict) -> None:
        """Check every tensor for finiteness, digest it, and start the (asynchronous) save of ``step``.

        Raises ``CheckpointError`` (nothing written) for non-finite tensors, and for a failed
        earlier asynchronous save (named with its own step)."""
        if self._pending is not None:  # orbax waits for it anyway; here its failure is named with its step
            self.wait()
        train = {"opt_state": opt_state, "step": np.asarray(step, np.int64), "rng": rng}
        reports = {"params": tree_report(params), "train": tree_report({"opt_state": opt_state, "rng": rng})}
        bad = [f"{item}/{name}" for item, r in reports.items() for name in non_finite(r)]
        if bad:
            raise CheckpointError(f"refusing to save step {step}: non-finite values in {len(bad)} tensor(s): "
                                  f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
        integrity = {item: {n: d for n, (d, _) in r.items()} for item, r in reports.items()}
        integrity["data"] = json_digest(data_state)
        meta = dict(meta, step=int(step), integrity=integrity)
        try:
            self._mgr.save(int(step), args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                train=ocp.args.StandardSave(train),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ), force=True)
        except Exception as e:  # noqa: BLE001 - any failure to write is reported with the step and place
            raise _save_failed(step, self.directory, e) from e
        self._pending = int(step)

    def poll(self) -> None:
        """Raise ``CheckpointError`` if an asynchronous save has finished with an error (cheap when none)."""
        if self._pending is None or self._mgr.is_saving_in_progress():
            return
        self.wait()

    def wait(self) -> None:
        step, self._pending = self._pending, None
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise _save_failed(step, self.directory, e) from e

    def restore(self, step: int, *, abstract_params, abstract_opt_state, abstract_rng) -> dict:
        """Restore and verify ``step`` into arrays with the shardings of the given abstract trees.

        ``CheckpointError``: the step is damaged (unreadable item, digest mismatch, non-finite tensor).
        ``ValueError``: it is intact but holds another model or optimizer than the abstract trees."""
        abstract_train = {"opt_state": abstract_opt_state,
                          "step": jax.ShapeDtypeStruct((), np.int64), "rng": abstract_rng}
        reader = _StepReader(self._mgr, self.directory, step)
        meta = reader.meta()
        data = reader.json("data")
        integrity = meta.get("integrity") or {}
        reader.check_complete("params", integrity.get("params"))
        reader.check_complete("train", integrity.get("train"))
        reader.check_layout("params", abstract_params)
        reader.check_layout("train", abstract_train)
        params = reader.arrays("params", abstract_params)
        train = reader.arrays("train", abstract_train)
        reader.verify("params", tree_report(params), integrity.get("params"))
        reader.verify("train", tree_report({"opt_state": train["opt_state"], "rng": train["rng"]}),
                      integrity.get("train"))
        if "data" in integrity and json_digest(data) != integrity["data"]:
            raise CheckpointError(f"checkpoint step {step}: {reader.path('data')} does not match its digest")
        if int(train["step"]) != step:
            raise CheckpointError(f"checkpoint step {step}: {reader.path('train')} holds step {int(train['step'])}")
        return {"params": params, "opt_state": train["opt_state"], "step": step, "rng": train["rng"],
                "data": data, "meta": meta}

    def restore_newest_intact(self, **abstract) -> tuple[dict | None, list[tuple[int, str]]]:
        """The newest step that restores and verifies, and ``[(step, why)]`` of the newer damaged ones."""
        damaged = []
        for step in reversed(self.steps()):
            try:
                return self.restore(step, **abstract), damaged
            except CheckpointError as e:
                damaged.append((step, str(e)))
        return None, damaged

    def set_aside(self, step: int, destination: str) -> str:
        """Move a damaged step out of the checkpoint directory (kept, never deleted); returns where."""
        self._mgr.close()
        os.makedirs(destination, exist_ok=True)
        target = os.path.join(destination, str(step))
        n = 1
        while os.path.exists(target):
            target = os.path.join(destination, f"{step}.{n}")
            n += 1
        os.replace(os.path.join(self.directory, str(step)), target)
        self._mgr = _manager(self.directory, keep=self._keep, async_save=self._async)
        return target

    def close(self) -> None:
        try:
            if self._pending is not None:
                self.wait()
        finally:
            self._mgr.close()


# --------------------------------------------------------------------------------------------
# Reading one step


class _StepReader:
    """Reads the items of one step, naming the step and the item's directory in every error."""

    def __init__(self, mgr: ocp.CheckpointManager, directory: str, step: int):
        self.mgr, self.directory, self.step = mgr, directory, step
        self._trees: dict[str, Any] = {}

    def path(self, item: str) -> str:
        return os.path.join(self.directory, str(self.step), item)

    def _fail(self, item: str, e: BaseException) -> CheckpointError:
        return CheckpointError(f"checkpoint step {self.step} is damaged: {self.path(item)} cannot be read "
                               f"({type(e).__name__}: {_short(e, 300)})")

    def _restore(self, item: str, arg):
        try:
            return self.mgr.restore(self.step, args=ocp.args.Composite(**{item: arg}))[item]
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds for bad bytes
            raise self._fail(item, e) from e

    def json(self, item: str) -> dict:
        return self._restore(item, ocp.args.JsonRestore())

    def meta(self) -> dict:
        """The ``meta`` item, its model and run configs under the present key names
        (``hetclip.config.upgrade_stored``)."""
        from hetclip.config import upgrade_stored

        meta = self.json("meta")
        for key, prefix in (("model", "model."), ("config", "")):
            if isinstance(meta.get(key), dict):
                meta[key] = upgrade_stored(meta[key], prefix)
        return meta

    def _metadata_tree(self, item: str):
        """The item's own tree of array metadata (shape, dtype); read once."""
        if item not in self._trees:
            try:
                metadata = ocp.StandardCheckpointer().metadata(self.path(item))
            except Exception as e:  # noqa: BLE001
                raise self._fail(item, e) from e
            tree = getattr(metadata, "item_metadata", metadata)
            self._trees[item] = getattr(tree, "tree", tree)
        return self._trees[item]

    def layout(self, item: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{tensor path: (shape, dtype)}`` from the item's own metadata."""
        flat = jax.tree_util.tree_flatten_with_path(self._metadata_tree(item))[0]
        return {_path_name(p): (tuple(m.shape), str(np.dtype(m.dtype))) for p, m in flat}

    def check_complete(self, item: str, digests: dict[str, str] | None) -> None:
        """Every tensor written (named by the digests saved with it) is still listed by the item: damaged
        storage can hide entries, which must not pass for a checkpoint of another model."""
        if digests is None:
            return
        listed = self.layout(item)
        lost = sorted(n for n in digests if n not in listed)
        if lost:
            raise CheckpointError(f"checkpoint step {self.step} is damaged: {len(lost)} of the {len(digests)} tensors "
                                  f"written to {self.path(item)} cannot be found ({', '.join(lost[:3])}"
                                  f"{', ...' if len(lost) > 3 else ''})")

    def check_layout(self, item: str, abstract) -> None:
        saved = self.layout(item)
        wanted = {_path_name(p): (tuple(a.shape), str(np.dtype(a.dtype)))
                  for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        problems = [f"{k}: missing in the checkpoint" for k in wanted if k not in saved]
        problems += [f"{k}: not in this config's model" for k in saved if k not in wanted]
        problems += [f"{k}: saved {saved[k][0]} {saved[k][1]}, wanted {wanted[k][0]} {wanted[k][1]}"
                     for k in wanted if k in saved and saved[k][0] != wanted[k][0]]
        if problems:
            raise ValueError(f"checkpoint step {self.step} ({self.path(item)}) holds another model or optimizer "
                             f"than this config: " + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))

    def abstract_from_layout(self, item: str, sharding) -> Any:
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                            self._metadata_tree(item))

    def arrays(self, item: str, abstract):
        return self._restore(item, ocp.args.StandardRestore(abstract))

    def verify(self, item: str, report: dict[str, tuple[str, bool]], digests: dict[str, str] | None) -> None:
        if digests is not None and set(digests) - set(report):
            lost = sorted(set(digests) - set(report))
            raise CheckpointError(f"checkpoint step {self.step} is damaged: tensor {lost[0]!r} in {self.path(item)} "
                                  f"was written but not restored")
        for name, (digest, finite) in report.items():
            if digests is not None and digests.get(name) != digest:
                raise CheckpointError(f"checkpoint step {self.step} is damaged: tensor {name!r} in "
                                      f"{self.path(item)} does not match the digest written with it")
            if not finite:
                raise CheckpointError(f"checkpoint step {self.step} holds non-finite values in tensor {name!r} "
                                      f"({self.path(item)})")


# --------------------------------------------------------------------------------------------
# Reading a run (evaluation, export)


def checkpoint_dir(path: str) -> str:
    """Accept a work directory (with ``checkpoints/``) or the checkpoints directory itself."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints")
    return path


def run_dir(path: str) -> str:
    """The run (work) directory of a checkpoint path: the parent of ``checkpoints/``."""
    directory = checkpoint_dir(path)
    return os.path.dirname(directory) if os.path.basename(directory) == "checkpoints" else directory


def _open_step(path: str, step: int | None) -> tuple[ocp.CheckpointManager, str, int]:
    directory = checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}")
    mgr = _manager(directory, read_only=True, async_save=False)
    steps = sorted(mgr.all_steps())
    if not steps:
        mgr.close()
        raise FileNotFoundError(f"{directory!r} holds no complete checkpoint")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        mgr.close()
        raise FileNotFoundError(f"{directory!r} has no checkpoint for step {step}; it has {steps}")
    return mgr, directory, chosen


def read_meta(path: str, step: int | None = None) -> tuple[int, dict]:
    mgr, directory, step = _open_step(path, step)
    try:
        return step, _StepReader(mgr, directory, step).meta()
    finally:
        mgr.close()


def load_params(path: str, step: int | None = None):
    """``(step, params as numpy arrays, meta)`` of the latest (or given) checkpoint, verified.

    ``CheckpointError`` names the step, the file and the tensor of a damaged or non-finite checkpoint."""
    mgr, directory, step = _open_step(path, step)
    try:
        reader = _StepReader(mgr, directory, step)
        meta = reader.meta()
        reader.check_complete("params", (meta.get("integrity") or {}).get("params"))
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        params = reader.arrays("params", reader.abstract_from_layout("params", cpu))
        reader.verify("params", tree_report(params), (meta.get("integrity") or {}).get("params"))
    except CheckpointError as e:
        others = [s for s in sorted(mgr.all_steps()) if s != step]
        hint = f"; other steps in {directory}: {others} (pass --step)" if others else ""
        raise CheckpointError(f"{e}{hint}") from None
    finally:
        mgr.close()
    return step, jax.tree.map(np.asarray, params), meta


@dataclasses.dataclass
class RunCheckpoint:
    """What evaluation and export need from one step of a training run."""
    model_cfg: Any          # hetclip.model.ModelConfig
    params: dict            # numpy arrays
    tokenizer_spec: dict    # with absolute paths
    preprocess: dict
    meta: dict
    step: int
    run_dir: str

    def tokenizer(self):
        from hetclip.data.tokenizers import load_tokenizer

        return load_tokenizer(self.tokenizer_spec)


def load_run(path: str, step: int | None = None) -> RunCheckpoint:
    """One step (default: the latest) of the run at ``path`` (a work directory or its ``checkpoints/``).

    Works from any working directory and after the run directory was moved: the tokenizer's files
    are resolved inside the run directory."""
    from hetclip.model import ModelConfig
    from hetclip.workdir import resolve_tokenizer_spec

    step, params, meta = load_params(path, step)
    missing = [k for k in ("model", "tokenizer", "preprocess") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint {path!r} step {step} has no {missing} in its metadata; "
                         "it was not written by hetclip-train")
    root = run_dir(path)
    return RunCheckpoint(model_cfg=ModelConfig.from_dict(meta["model"]), params=params,
                         tokenizer_spec=resolve_tokenizer_spec(meta["tokenizer"], root),
                         preprocess=meta["preprocess"], meta=dict(meta, step=step, checkpoint=os.path.abspath(path)),
                         step=step, run_dir=root)
